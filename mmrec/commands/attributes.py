"""``mmrec data attributes``: categorical columns of ``items.tsv`` as a multi-hot feature table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def cmd_data_attributes(args: argparse.Namespace) -> int:
    from mmrec.datasets.attributes import attribute_features
    from mmrec.datasets.canonical import read_item_rows
    from mmrec.datasets.features import write_features
    from mmrec.errors import DataError

    items = Path(args.data) / "items.tsv"
    if not items.is_file():
        raise DataError("not found: `mmrec data attributes` reads the items.tsv of a canonical directory "
                        "(`mmrec data convert` writes one from other formats)", file=items)
    rows = read_item_rows(items)
    table, vocab = attribute_features(rows, args.columns, sep=args.sep or None, min_count=args.min_count,
                                      max_tokens=args.max_tokens)
    write_features(args.out, table, rows.ids)
    n_masked = int((~table.mask).sum())
    print(f"wrote {args.out}: {len(rows.ids):,} items x {len(vocab):,} attribute values "
          f"from {', '.join(args.columns)}" + (f"; {table.meta['dropped_tokens']} rarer values left out"
                                               if table.meta["dropped_tokens"] != "0" else "")
          + (f"; {n_masked:,} items without a kept value are masked" if n_masked else ""))
    return 0


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction,
                common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = data_sub.add_parser("attributes", help="categorical items.tsv columns as a multi-hot feature table")
    p.add_argument("data", help="a canonical dataset directory (with items.tsv)")
    p.add_argument("--columns", nargs="+", required=True, help="items.tsv columns, e.g. year genres")
    p.add_argument("--sep", default="|", help="separator of multi-valued cells ('' = none; default '|')")
    p.add_argument("--min-count", type=int, default=1, help="keep values carried by at least this many items")
    p.add_argument("--max-tokens", type=int, default=1024, help="keep at most this many values (most frequent)")
    p.add_argument("--out", required=True, help="output .safetensors (its stem names the modality)")
    common(p)
    p.set_defaults(func=cmd_data_attributes)


__all__ = ["add_parsers", "cmd_data_attributes"]
