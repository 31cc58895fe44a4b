"""Feature store: ``features/<modality>.safetensors`` with ``features``, ``mask``, ``item_ids``.

Integer-like item ids are stored as an int64 tensor ``item_ids`` (as peers expect);
other string ids go to the file's metadata as JSON, since safetensors holds tensors only.
"""

from __future__ import annotations

import json
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


def write_features(path: str | Path, table: FeatureTable, item_ids: Sequence[str]) -> None:
    """Write one modality atomically: a crash leaves no half-written file."""
    item_ids = [str(x) for x in item_ids]
    if len(item_ids) != table.features.shape[0]:
        raise ValueError(f"{len(item_ids)} item ids for {table.features.shape[0]} feature rows")
    tensors = {"features": table.features.detach().to(torch.float32).contiguous().cpu(),
               "mask": table.mask.to(torch.bool).contiguous().cpu()}
    meta = {k: str(v) for k, v in table.meta.items()}
    ids = _ids_as_tensor(item_ids)
    if ids is not None:
        tensors["item_ids"] = ids
    else:
        meta["item_ids"] = json.dumps(item_ids)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_features(path: str | Path) -> tuple[FeatureTable, list[str] | None]:
    """Read a feature file; returns the table and its item ids (None if it has none)."""
    path = Path(path)
    if not path.exists():
        raise DataError("feature file not found", file=path)
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            meta = dict(f.metadata() or {})
            if "features" not in keys:
                raise DataError("no 'features' tensor", file=path, field="features")
            feats = f.get_tensor("features").to(torch.float32)
            mask = f.get_tensor("mask").to(torch.bool) if "mask" in keys else torch.ones(len(feats), dtype=torch.bool)
            ids: list[str] | None = None
            if "item_ids" in keys:
                ids = [str(int(x)) for x in f.get_tensor("item_ids").tolist()]
            elif "item_ids" in meta:
                ids = [str(x) for x in json.loads(meta.pop("item_ids"))]
    except DataError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"cannot read safetensors file: {e}", file=path) from e
    if mask.shape != (feats.shape[0],):
        raise DataError(f"mask has shape {tuple(mask.shape)} for {feats.shape[0]} rows", file=path, field="mask")
    if ids is not None and len(ids) != feats.shape[0]:
        raise DataError(f"{len(ids)} item_ids for {feats.shape[0]} rows", file=path, field="item_ids")
    if torch.isnan(feats[mask]).any():
        raise DataError("features contain NaN in rows marked present", file=path, field="features")
    meta.pop("item_ids", None)
    return FeatureTable(feats, mask, meta), ids


def align_features(table: FeatureTable, file_ids: Sequence[str] | None, item_ids: Sequence[str],
                   source: str | Path = "features") -> FeatureTable:
    """Reorder rows to the dataset's item order; items absent from the file are masked."""
    n = len(item_ids)
    if file_ids is None:
        if table.features.shape[0] != n:
            raise DataError(f"{table.features.shape[0]} rows without item_ids for {n} items", file=source)
        return table
    pos = {str(x): i for i, x in enumerate(file_ids)}
    rows = np.array([pos.get(str(x), -1) for x in item_ids], dtype=np.int64)
    found = rows >= 0
    feats = torch.zeros(n, table.dim, dtype=table.features.dtype)
    mask = torch.zeros(n, dtype=torch.bool)
    idx = torch.from_numpy(np.nonzero(found)[0])
    src = torch.from_numpy(rows[found])
    feats[idx] = table.features[src]
    mask[idx] = table.mask[src]
    return FeatureTable(feats, mask, dict(table.meta))


def load_feature_dir(directory: str | Path, item_ids: Sequence[str]) -> dict[str, FeatureTable]:
    """Every ``<modality>.safetensors`` in a directory, aligned to the dataset's items."""
    out: dict[str, FeatureTable] = {}
    directory = Path(directory)
    if not directory.is_dir():
        return out
    for p in sorted(directory.glob("*.safetensors")):
        table, ids = read_features(p)
        out[p.stem] = align_features(table, ids, item_ids, source=p)
    return out
