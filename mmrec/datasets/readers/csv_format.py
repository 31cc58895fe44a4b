"""Comma-separated files: the canonical layout with ``.csv`` instead of ``.tsv``.

What most exports look like (a database dump, a spreadsheet, ``pandas.to_csv``):
``interactions.csv`` (``user``, ``item``; optional ``behavior``, ``timestamp``,
``rating``, ``scenario``, ``label``), optional ``test.csv`` / ``valid.csv``, ``items.csv``
(``item``, text columns, ``image`` / ``audio`` paths; standard CSV quoting), ``exposures.csv``,
``dataset.yaml`` and ``features/``. Every rule of the canonical reader holds (ids are
strings, behaviors, cold items, media, errors naming file, line and field);
``mmrec data convert DIR --out CANONICAL`` writes the tab-separated directory.
"""

from __future__ import annotations

from pathlib import Path

from mmrec.datasets.canonical import (HELD_OUT, INTERACTION_COLUMNS, _exposure_spec, assemble, read_item_rows,
                                      read_meta)
from mmrec.datasets.readers import check_on_unseen, register_reader
from mmrec.datasets.readers.table import named, read_table
from mmrec.datasets.schema import Dataset
from mmrec.errors import DataError


def _detect(path: Path) -> bool:
    return (path / "interactions.csv").is_file()


@register_reader("csv", detect=_detect, priority=5,
                 looks_for="interactions.csv (plus optional test.csv, valid.csv, items.csv, dataset.yaml, features/)")
def read_csv_dir(path: str | Path, *, on_unseen: str = "drop", verify_media: bool = False) -> Dataset:
    """Read a directory of comma-separated files laid out as the canonical directory."""
    check_on_unseen(on_unseen)
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a directory", file=root)
    meta_file = root / "dataset.yaml"
    meta = read_meta(meta_file)
    train = read_table(root / "interactions.csv", named(INTERACTION_COLUMNS), required=("user", "item"),
                       int_ids=("user", "item"))
    held = {s: read_table(root / f"{s}.csv", named(INTERACTION_COLUMNS), required=("user", "item"))
            for s in HELD_OUT if (root / f"{s}.csv").is_file()}
    items = read_item_rows(root / "items.csv") if (root / "items.csv").is_file() else None
    exposures = None
    if (root / "exposures.csv").is_file():
        exposures = read_table(root / "exposures.csv", _exposure_spec, required=("user", "item"))
    return assemble(name=meta.name or root.resolve().name, root=root, train=train, held_out=held, items=items,
                    exposures=exposures, meta=meta, meta_file=meta_file, on_unseen=on_unseen,
                    verify_media=verify_media, features_dir=root / "features")


__all__ = ["read_csv_dir"]
