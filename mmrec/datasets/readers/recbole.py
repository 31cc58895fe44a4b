"""RecBole atomic files: ``<name>.inter`` and ``<name>.item`` with typed headers.

Headers say what each column is (``user_id:token``, ``rating:float``,
``movie_title:token_seq``). The user / item / rating / timestamp / label fields are
found by name (RecBole's defaults; ``user_field=`` / ``item_field=`` change them).
Benchmark splits ``<name>.train.inter`` / ``.valid.inter`` / ``.test.inter`` are used
when present. In ``<name>.item``, ``token`` and ``token_seq`` columns that hold
text (not all numbers) become item text; float columns are not text.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from mmrec.datasets.canonical import DatasetMeta, ItemRows, assemble, default_text_columns, read_item_rows
from mmrec.datasets.readers import check_on_unseen, register_reader
from mmrec.datasets.readers.table import FLOAT, ID, TIME, read_header, read_table
from mmrec.datasets.schema import Dataset
from mmrec.errors import DataError

SPLIT_SUFFIXES = ("train", "valid", "test")
TYPES = ("token", "token_seq", "float", "float_seq")


def _split_field(h: str) -> tuple[str, str | None]:
    name, _, typ = h.rpartition(":")
    return (name, typ) if name else (h, None)


def _typed(path: Path) -> bool:
    try:
        header = read_header(path)
    except DataError:
        return False
    return bool(header) and all(_split_field(h)[1] in TYPES for h in header)


def _names(path: Path) -> dict[str, dict[str, Path]]:
    """dataset name -> {"inter" | "train" | "valid" | "test": file} for typed ``.inter`` files."""
    out: dict[str, dict[str, Path]] = {}
    for p in sorted(path.glob("*.inter")):
        if not _typed(p):
            continue
        stem = p.stem
        base, _, suffix = stem.rpartition(".")
        if base and suffix in SPLIT_SUFFIXES:
            out.setdefault(base, {})[suffix] = p
        else:
            out.setdefault(stem, {})["inter"] = p
    return out


def _detect(path: Path) -> bool:
    return bool(_names(path))


@register_reader("recbole", detect=_detect, priority=20,
                 looks_for="<name>.inter with typed headers like user_id:token (RecBole atomic files)")
def read_recbole(path: str | Path, *, on_unseen: str = "drop", name: str | None = None,
                 user_field: str = "user_id", item_field: str = "item_id") -> Dataset:
    """Read RecBole atomic files (one interaction type: behavior ``interact``)."""
    check_on_unseen(on_unseen)
    root = Path(path)
    names = _names(root)
    if name is None:
        name = next(iter(names)) if len(names) == 1 else root.resolve().name
    if name not in names:
        raise DataError(f"cannot choose among RecBole datasets {sorted(names) or 'none'}; pass name=...", file=root)
    files = names[name]
    fields = {user_field: ("user", ID), item_field: ("item", ID), "rating": ("rating", FLOAT),
              "timestamp": ("timestamp", TIME), "label": ("label", FLOAT)}

    def spec(h: str) -> tuple[str, str] | None:
        fname, typ = _split_field(h)
        m = fields.get(fname)
        if m is None or (m[1] != ID and typ not in (None, "float")):
            return None
        return m

    train_file = files.get("train") or files.get("inter")
    if train_file is None:
        raise DataError(f"no {name}.inter or {name}.train.inter", file=root)
    train = read_table(train_file, spec, required=("user", "item"))
    held = {s: read_table(files[s], spec, required=("user", "item")) for s in ("valid", "test")
            if "train" in files and s in files}
    items = _items(root / f"{name}.item", item_field)
    if (root / f"{name}.user").is_file():
        warnings.warn(f"{root / f'{name}.user'}: user features are not used", stacklevel=2)
    meta = DatasetMeta(name=name, text_columns=_text_columns(items) if items is not None else None)
    data = assemble(name=name, root=root, train=train, held_out=held, items=items, exposures=None, meta=meta,
                    meta_file=None, on_unseen=on_unseen, features_dir=root / "features")
    if (root / f"{name}.user").is_file():
        data.report["ignored_files"] = [f"{name}.user"]
    return data


def _items(path: Path, item_field: str) -> ItemRows | None:
    if not path.is_file():
        return None
    header = read_header(path)
    id_col = next((h for h in header if _split_field(h)[0] == item_field), None)
    if id_col is None:
        raise DataError(f"no '{item_field}' column (header has: {', '.join(header)})", file=path, line=1,
                        field=item_field)
    rows = read_item_rows(path, id_field=id_col)
    columns, types = {}, {}
    for h, values in rows.columns.items():
        fname, typ = _split_field(h)
        columns[fname] = values
        types[fname] = typ or "token"
    return ItemRows(rows.path, rows.ids, columns, rows.lines, types)


def _text_columns(items: ItemRows) -> list[str]:
    tokens = {c: v for c, v in items.columns.items() if items.types.get(c) in ("token", "token_seq")}
    return default_text_columns(tokens)
