"""Feature store: ``features/<modality>.safetensors`` with ``features``, ``mask``, ``item_ids``.

Integer-like item ids are stored as an int64 tensor ``item_ids`` (as peers expect);
other string ids go to the file's metadata as JSON, since safetensors holds tensors only.

A *multi-table* file (what ``mmrec extract`` writes) holds several modalities in one
file and stays readable by single-table readers::

    features, mask                    the fused table (absent when the modalities
                                      could not be fused, e.g. different sizes)
    <modality>.features, .mask        one pair per modality (image, text, audio)
    item_ids                          as above (int64 tensor or JSON metadata)
    metadata "mmrec_tables"           JSON {table name: its own metadata}

:func:`read_feature_tables` reads both layouts (a single-table file is ``{stem: table}``);
:func:`load_feature_file` also aligns the rows to a dataset's items.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmrec.datasets.schema import FeatureTable
from mmrec.errors import DataError
from mmrec.io import atomic_path


def _ids_as_tensor(item_ids: Sequence[str]) -> torch.Tensor | None:
    try:
        ints = np.array([int(x) for x in item_ids], dtype=np.int64)
    except (TypeError, ValueError):
        return None
    if any(str(i) != str(x) for i, x in zip(ints, item_ids)):  # '007' must stay '007'
        return None
    return torch.from_numpy(ints)


FUSED = "fused"
#: Metadata key of a multi-table file: JSON {table name: that table's metadata}.
TABLES_META = "mmrec_tables"
#: Annotations added on reading, never written back.
_READ_ONLY_META = ("path",)


def _id_entries(item_ids: Sequence[str], tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    ids = _ids_as_tensor(item_ids)
    if ids is not None:
        tensors["item_ids"] = ids
    else:
        meta["item_ids"] = json.dumps(list(item_ids))


def write_features(path: str | Path, table: FeatureTable, item_ids: Sequence[str]) -> None:
    """Write one modality atomically: a crash leaves no half-written file."""
    item_ids = [str(x) for x in item_ids]
    if len(item_ids) != table.features.shape[0]:
        raise ValueError(f"{len(item_ids)} item ids for {table.features.shape[0]} feature rows")
    tensors = {"features": table.features.detach().to(torch.float32).contiguous().cpu(),
               "mask": table.mask.to(torch.bool).contiguous().cpu()}
    meta = {k: str(v) for k, v in table.meta.items() if k not in _READ_ONLY_META}
    _id_entries(item_ids, tensors, meta)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def write_feature_tables(path: str | Path, tables: dict[str, FeatureTable], item_ids: Sequence[str],
                         meta: dict[str, str] | None = None) -> None:
    """Write several tables into one file atomically (the multi-table layout above).

    ``tables["fused"]``, when given, becomes the top-level ``features``/``mask`` so that
    single-table readers (and peers) still read the file; every other table is stored
    as ``<name>.features``/``<name>.mask``. ``meta`` is file-level metadata (str -> str).
    """
    item_ids = [str(x) for x in item_ids]
    if not tables:
        raise ValueError("no tables to write")
    tensors: dict[str, torch.Tensor] = {}
    for name, table in tables.items():
        if table.features.shape[0] != len(item_ids):
            raise ValueError(f"table '{name}' has {table.features.shape[0]} rows for {len(item_ids)} item ids")
        if name != FUSED and ("." in name or name in ("features", "mask", "item_ids")):
            raise ValueError(f"table name '{name}' is reserved or contains '.'")
        prefix = "" if name == FUSED else f"{name}."
        tensors[f"{prefix}features"] = table.features.detach().to(torch.float32).contiguous().cpu()
        tensors[f"{prefix}mask"] = table.mask.to(torch.bool).contiguous().cpu()
    file_meta = {k: str(v) for k, v in (meta or {}).items()}
    file_meta[TABLES_META] = json.dumps({name: {k: str(v) for k, v in t.meta.items() if k not in _READ_ONLY_META}
                                           for name, t in tables.items()})
    _id_entries(item_ids, tensors, file_meta)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=file_meta)


def _read_table(f, keys: set[str], prefix: str, path: Path, what: str) -> FeatureTable:
    feats = f.get_tensor(f"{prefix}features").to(torch.float32)
    mask_key = f"{prefix}mask"
    mask = f.get_tensor(mask_key).to(torch.bool) if mask_key in keys else torch.ones(len(feats), dtype=torch.bool)
    if feats.dim() != 2:
        raise DataError(f"{what}: features must be [n_items, d], got {tuple(feats.shape)}", file=path,
                        field=f"{prefix}features")
    if mask.shape != (feats.shape[0],):
        raise DataError(f"{what}: mask has shape {tuple(mask.shape)} for {feats.shape[0]} rows", file=path,
                        field=mask_key)
    if torch.isnan(feats[mask]).any():
        raise DataError(f"{what}: features contain NaN in rows marked present", file=path, field=f"{prefix}features")
    return FeatureTable(feats, mask)


def read_feature_tables(path: str | Path) -> tuple[dict[str, FeatureTable], list[str] | None]:
    """Every table of a feature file and its item ids (None if it has none).

    A single-table file gives ``{<file stem>: table}``; a multi-table file
    ``{<modality>: table, ..., "fused": table}`` (``fused`` only when stored).
    Each table's ``meta`` holds its own metadata plus ``path`` (for error messages).
    """
    path = Path(path)
    if not path.exists():
        raise DataError("feature file not found", file=path)
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            meta = dict(f.metadata() or {})
            names = sorted(k[: -len(".features")] for k in keys if k.endswith(".features"))
            if "features" not in keys and not names:
                raise DataError("no 'features' tensor (nor '<modality>.features' tensors)", file=path,
                                field="features")
            per_table = json.loads(meta.pop(TABLES_META)) if TABLES_META in meta else {}
            tables: dict[str, FeatureTable] = {}
            for name in names:
                tables[name] = _read_table(f, keys, f"{name}.", path, f"table '{name}'")
            if "features" in keys:
                top = FUSED if names else path.stem
                tables[top] = _read_table(f, keys, "", path, f"table '{top}'")
            ids: list[str] | None = None
            if "item_ids" in keys:
                ids = [str(int(x)) for x in f.get_tensor("item_ids").tolist()]
            elif "item_ids" in meta:
                ids = [str(x) for x in json.loads(meta.pop("item_ids"))]
    except DataError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"cannot read safetensors file: {e}", file=path) from e
    meta.pop("item_ids", None)
    n = {t.features.shape[0] for t in tables.values()}
    if len(n) > 1:
        raise DataError(f"tables have different row counts {sorted(n)}", file=path)
    if ids is not None and len(ids) != n.pop():
        raise DataError(f"{len(ids)} item_ids for {next(iter(tables.values())).features.shape[0]} rows",
                        file=path, field="item_ids")
    for name, t in tables.items():
        own = per_table.get(name, {}) if names else {}
        t.meta = {**(meta if not names else {}), **{k: str(v) for k, v in own.items()}, "path": str(path)}
    return tables, ids


def feature_file_metadata(path: str | Path) -> dict[str, str]:
    """The file-level metadata of a feature file (e.g. ``bad_media`` counts of an extract)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise DataError(f"cannot read safetensors file: {e}", file=path) from e
    for key in (TABLES_META, "item_ids"):
        meta.pop(key, None)
    return meta


def read_features(path: str | Path) -> tuple[FeatureTable, list[str] | None]:
    """Read a feature file's one table; returns the table and its item ids (None if it has none).

    A multi-table file gives its fused table (or its only table); a file with several
    tables and no fused one is an error that points at :func:`read_feature_tables`.
    """
    tables, ids = read_feature_tables(path)
    if len(tables) == 1:
        table = next(iter(tables.values()))
    elif FUSED in tables:
        table = tables[FUSED]
    else:
        raise DataError(f"the file holds tables {', '.join(sorted(tables))} and no fused table; read it with "
                        "read_feature_tables (mmrec train --features takes it as is)", file=path)
    table.meta.pop("path", None)
    return table, ids


def align_features(table: FeatureTable, file_ids: Sequence[str] | None, item_ids: Sequence[str],
                   source: str | Path = "features", dataset: str | None = None) -> FeatureTable:
    """Reorder rows to the dataset's item order; items absent from the file are masked.

    A file that shares no item id with the dataset is an error naming both (``dataset``):
    features of other data, never a silently all-masked table.
    """
    n = len(item_ids)
    if file_ids is None:
        if table.features.shape[0] != n:
            raise DataError(f"{table.features.shape[0]} rows without item_ids for {n} items", file=source)
        return table
    pos: dict[str, int] = {}
    for i, x in enumerate(file_ids):
        if pos.setdefault(str(x), i) != i:  # which row would win is arbitrary: refuse
            raise DataError(f"item '{x}' has two rows ({pos[str(x)]} and {i})", file=source, field="item_ids")
    rows = np.array([pos.get(str(x), -1) for x in item_ids], dtype=np.int64)
    found = rows >= 0
    if n and len(file_ids) and not found.any():
        raise DataError(f"none of its {len(file_ids)} item ids (e.g. {', '.join(map(str, file_ids[:3]))}) is an item of "
                        f"dataset '{dataset or '?'}' (whose items are e.g. {', '.join(map(str, item_ids[:3]))}): "
                        f"features of other data?", file=source, field="item_ids")
    unmatched = len(file_ids) - int(found.sum())
    meta = dict(table.meta)
    if unmatched:  # rows for items the dataset does not have: skipped, and said so
        meta["unmatched_rows"] = str(unmatched)
        warnings.warn(f"{source}: {unmatched} of {len(file_ids)} feature rows are for items not in the dataset; "
                      f"skipped (counted in the table's meta['unmatched_rows'])", stacklevel=3)
    feats = torch.zeros(n, table.dim, dtype=table.features.dtype)
    mask = torch.zeros(n, dtype=torch.bool)
    idx = torch.from_numpy(np.nonzero(found)[0])
    src = torch.from_numpy(rows[found])
    feats[idx] = table.features[src]
    mask[idx] = table.mask[src]
    return FeatureTable(feats, mask, meta)


def load_feature_file(path: str | Path, item_ids: Sequence[str], dataset: str | None = None) -> dict[str, FeatureTable]:
    """Every table of one feature file, aligned to the dataset's items (absent items masked).

    What ``--features FILE`` attaches: ``{stem: table}`` for a single-table file,
    ``{modality: table, ..., "fused": table}`` for a file written by ``mmrec extract``.
    """
    tables, ids = read_feature_tables(path)
    return {name: align_features(t, ids, item_ids, source=path, dataset=dataset) for name, t in tables.items()}


def load_feature_dir(directory: str | Path, item_ids: Sequence[str]) -> dict[str, FeatureTable]:
    """Every ``<modality>.safetensors`` in a directory, aligned to the dataset's items."""
    out: dict[str, FeatureTable] = {}
    directory = Path(directory)
    if not directory.is_dir():
        return out
    for p in sorted(directory.glob("*.safetensors")):
        out.update(load_feature_file(p, item_ids))
    return out
