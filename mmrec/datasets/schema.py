"""The in-memory dataset every reader produces and every model consumes.

Ids are contiguous ``int64`` indices; ``Dataset.user_ids`` / ``item_ids`` map them
back to the strings found in the files. Interactions are columnar numpy arrays
(fast to build, to split and to turn into sparse matrices).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from mmrec.errors import DataError

DEFAULT_BEHAVIOR = "interact"
MODALITIES = ("image", "text", "audio")


@dataclass
class Interactions:
    """Rows of (user, item, behavior) with optional per-row columns.

    ``behavior`` and ``scenario`` index into ``Dataset.behaviors`` / ``Dataset.scenarios``.
    ``labels`` holds 0/1 or real-valued targets by name: the canonical ``label``
    column lands in ``labels["label"]``; exposures carry ``click`` and ``convert``.
    ``line`` optionally keeps the 1-based source line of each row (for error messages).
    """

    user: np.ndarray
    item: np.ndarray
    behavior: np.ndarray
    timestamp: np.ndarray | None = None
    rating: np.ndarray | None = None
    scenario: np.ndarray | None = None
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.user = np.asarray(self.user, dtype=np.int64)
        self.item = np.asarray(self.item, dtype=np.int64)
        self.behavior = np.asarray(self.behavior, dtype=np.int64)
        n = len(self.user)
        for name in ("item", "behavior", "timestamp", "rating", "scenario"):
            col = getattr(self, name)
            if col is not None and len(col) != n:
                raise ValueError(f"column '{name}' has {len(col)} rows, expected {n}")
        for name, col in self.labels.items():
            if len(col) != n:
                raise ValueError(f"label '{name}' has {len(col)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def empty(cls) -> "Interactions":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z.copy(), z.copy())

    def _optional_columns(self) -> dict[str, np.ndarray | None]:
        return {"timestamp": self.timestamp, "rating": self.rating, "scenario": self.scenario}

    def select(self, index: np.ndarray) -> "Interactions":
        """Rows by boolean mask or integer index (keeps every column aligned)."""
        return Interactions(
            self.user[index], self.item[index], self.behavior[index],
            **{k: (v[index] if v is not None else None) for k, v in self._optional_columns().items()},
            labels={k: v[index] for k, v in self.labels.items()},
        )

    def for_behavior(self, behavior_index: int) -> "Interactions":
        return self.select(self.behavior == behavior_index)

    @staticmethod
    def concat(parts: Sequence["Interactions"]) -> "Interactions":
        """Concatenate; an optional column survives only if every part has it."""
        parts = [p for p in parts]
        if not parts:
            return Interactions.empty()

        def cat(name: str) -> np.ndarray | None:
            cols = [getattr(p, name) for p in parts]
            return None if any(c is None for c in cols) else np.concatenate(cols)

        label_names = set.intersection(*(set(p.labels) for p in parts)) if parts else set()
        return Interactions(
            np.concatenate([p.user for p in parts]),
            np.concatenate([p.item for p in parts]),
            np.concatenate([p.behavior for p in parts]),
            timestamp=cat("timestamp"), rating=cat("rating"), scenario=cat("scenario"),
            labels={k: np.concatenate([p.labels[k] for p in parts]) for k in label_names},
        )

    def pair_keys(self, n_items: int) -> np.ndarray:
        """``user * n_items + item`` as int64: a fast hashable id of each (user, item) pair."""
        return self.user * np.int64(n_items) + self.item


@dataclass
class FeatureTable:
    """Precomputed item features of one modality, row i = item i of the dataset.

    ``mask[i]`` is False where the item has no such content: consumers must use
    the mask, never feed the zero row into a cosine or a normalisation.
    """

    features: torch.Tensor
    mask: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features.dim() != 2:
            raise ValueError(f"features must be 2-D [n_items, d], got {tuple(self.features.shape)}")
        self.mask = self.mask.to(torch.bool)
        if self.mask.shape != (self.features.shape[0],):
            raise ValueError("mask must have one entry per feature row")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


@dataclass
class ItemContent:
    """What items look like, per modality; every list has one entry per item.

    ``image`` / ``audio`` entries are absolute paths or raw encoded bytes (PNG/JPEG,
    WAV; None: no such content); the sequences may be lazy (the synthetic world renders
    on indexing). ``text`` maps a column name to strings ('' missing).
    """

    text: dict[str, list[str]] = field(default_factory=dict)
    image: Sequence[str | bytes | None] | None = None
    audio: Sequence[str | bytes | None] | None = None
    features: dict[str, FeatureTable] = field(default_factory=dict)

    def modalities(self) -> list[str]:
        """Modalities with raw content or precomputed features."""
        out = []
        if self.image is not None and n_present(self.image):
            out.append("image")
        if self.text:
            out.append("text")
        if self.audio is not None and n_present(self.audio):
            out.append("audio")
        for m in self.features:
            if m not in out:
                out.append(m)
        return out

    def item_text(self, i: int, columns: Iterable[str] | None = None) -> str:
        """One string per item: the chosen text columns joined, empties skipped."""
        cols = list(columns) if columns is not None else list(self.text)
        return ". ".join(s for s in (self.text[c][i] for c in cols) if s)


@dataclass
class Dataset:
    """A recommendation dataset: ids, ordered behaviors, interactions, item content.

    ``train`` holds every training interaction of every behavior. ``valid`` / ``test``
    hold held-out rows (normally of the target behavior) once a split is applied or
    when the files fix them. ``report`` counts what loading skipped or dropped, so
    nothing disappears silently.
    """

    name: str
    behaviors: list[str]
    target: str
    user_ids: np.ndarray
    item_ids: np.ndarray
    train: Interactions
    valid: Interactions | None = None
    test: Interactions | None = None
    scenarios: list[str] | None = None
    items: ItemContent = field(default_factory=ItemContent)
    exposures: Interactions | None = None
    cold_items: np.ndarray | None = None
    ground_truth: dict[str, Any] | None = None
    root: str | None = None
    split: str | None = None
    report: dict[str, Any] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.behaviors:
            raise DataError("dataset has no behaviors")
        if self.target not in self.behaviors:
            raise DataError(f"target behavior '{self.target}' is not one of the behaviors {self.behaviors}",
                            file=self.root, field="target")
        self.user_ids = np.asarray(self.user_ids, dtype=object)
        self.item_ids = np.asarray(self.item_ids, dtype=object)

    # -- sizes -----------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_behaviors(self) -> int:
        return len(self.behaviors)

    @property
    def target_index(self) -> int:
        return self.behaviors.index(self.target)

    def behavior_index(self, name: str) -> int:
        if name not in self.behaviors:
            raise DataError(f"unknown behavior '{name}'; the dataset has {self.behaviors}")
        return self.behaviors.index(name)

    def replace(self, **changes: Any) -> "Dataset":
        """A copy with some fields changed and fresh caches (used by splits)."""
        changes.setdefault("_cache", {})
        return dataclasses.replace(self, **changes)

    # -- matrices ---------------------------------------------------------------
    def matrix(self, behavior: str | int | None = None, split: str = "train") -> sp.csr_matrix:
        """Binary user x item CSR matrix of one behavior (default: the target) in a split."""
        b = self.target_index if behavior is None else (
            behavior if isinstance(behavior, int) else self.behavior_index(behavior))
        key = ("matrix", b, split)
        if key not in self._cache:
            rows = self.split_rows(split)
            sel = rows.behavior == b
            self._cache[key] = _binary_csr(rows.user[sel], rows.item[sel], self.n_users, self.n_items)
        return self._cache[key]

    def matrices(self, split: str = "train") -> dict[str, sp.csr_matrix]:
        """One binary CSR matrix per behavior, in cascade order."""
        return {b: self.matrix(i, split) for i, b in enumerate(self.behaviors)}

    def merged_matrix(self, split: str = "train") -> sp.csr_matrix:
        """All behaviors merged into one binary matrix (LightGCN over all behaviors)."""
        key = ("merged", split)
        if key not in self._cache:
            rows = self.split_rows(split)
            self._cache[key] = _binary_csr(rows.user, rows.item, self.n_users, self.n_items)
        return self._cache[key]

    def edge_index(self, behavior: str | int | None = None, split: str = "train") -> torch.Tensor:
        """torch-geometric ``edge_index`` [2, E] (user row, item column) of one behavior."""
        m = self.matrix(behavior, split).tocoo()
        return torch.from_numpy(np.vstack([m.row, m.col]).astype(np.int64))

    def sparse_tensor(self, behavior: str | int | None = None, split: str = "train") -> torch.Tensor:
        """The same matrix as a torch sparse CSR tensor."""
        m = self.matrix(behavior, split)
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                       torch.from_numpy(m.indices.astype(np.int64)),
                                       torch.from_numpy(m.data.astype(np.float32)),
                                       size=m.shape)

    def split_rows(self, split: str) -> Interactions:
        rows = {"train": self.train, "valid": self.valid, "test": self.test}.get(split)
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be train, valid or test, not '{split}'")
        if rows is None:
            raise DataError(f"dataset '{self.name}' has no {split} rows; apply a split first")
        return rows

    # -- summaries --------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Counts for ``mmrec data describe`` (training interactions; held-out apart)."""
        counts = np.bincount(self.train.behavior, minlength=self.n_behaviors)
        out: dict[str, Any] = {
            "name": self.name,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "behaviors": list(self.behaviors),
            "target": self.target,
            "interactions": {b: int(counts[i]) for i, b in enumerate(self.behaviors)},
        }
        n_cells = max(self.n_users * self.n_items, 1)
        out["density"] = {b: self.matrix(i).nnz / n_cells for i, b in enumerate(self.behaviors)}
        held = {}
        for split in ("valid", "test"):
            rows = getattr(self, split)
            if rows is not None:
                c = np.bincount(rows.behavior, minlength=self.n_behaviors)
                held[split] = {b: int(c[i]) for i, b in enumerate(self.behaviors) if c[i]}
        if held:
            out["held_out"] = held
        if self.scenarios:
            out["scenarios"] = list(self.scenarios)
        mods = {}
        for m in self.items.modalities():
            entry: dict[str, Any] = {}
            if m in self.items.features:
                ft = self.items.features[m]
                entry["features"] = {"dim": ft.dim, "present": int(ft.mask.sum())}
            if m == "image" and self.items.image is not None:
                entry["raw"] = n_present(self.items.image)
            if m == "audio" and self.items.audio is not None:
                entry["raw"] = n_present(self.items.audio)
            if m == "text" and self.items.text:
                entry["columns"] = list(self.items.text)
                first = next(iter(self.items.text.values()))
                entry["raw"] = sum(1 for i in range(self.n_items)
                                   if any(self.items.text[c][i] for c in self.items.text)) if first else 0
            mods[m] = entry
        out["modalities"] = mods
        if self.exposures is not None:
            out["exposures"] = {"rows": len(self.exposures),
                                **{k: float(v.mean()) for k, v in self.exposures.labels.items()}}
        if self.cold_items is not None:
            out["cold_items"] = int(len(self.cold_items))
        if self.report:
            out["report"] = self.report
        return out


def n_present(content: Sequence[Any]) -> int:
    """Entries that are not None; lazy sequences report it without rendering (``n_present``)."""
    known = getattr(content, "n_present", None)
    if known is not None:
        return int(known() if callable(known) else known)
    return sum(x is not None for x in content)


def _binary_csr(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(user), dtype=np.float32), (user, item)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m
