"""Data layer: schema, readers, the synthetic world, splits, sampling, feature store.

Heavy submodules are imported lazily so ``import mmrec.datasets`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmrec.datasets.schema import DEFAULT_BEHAVIOR, Dataset, FeatureTable, Interactions, ItemContent

_LAZY = {
    "load_dataset": "mmrec.datasets.loading",
    "detect_format": "mmrec.datasets.loading",
    "write_canonical": "mmrec.datasets.canonical",
    "read_canonical": "mmrec.datasets.canonical",
    "make_world": "mmrec.datasets.synthetic",
    "apply_split": "mmrec.datasets.splits",
    "read_features": "mmrec.datasets.features",
    "write_features": "mmrec.datasets.features",
}

__all__ = ["DEFAULT_BEHAVIOR", "Dataset", "FeatureTable", "Interactions", "ItemContent", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
