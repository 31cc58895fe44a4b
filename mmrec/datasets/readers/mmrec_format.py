"""MMRec format: ``<name>.inter`` + ``<modality>_feat.npy``.

``<name>.inter`` is tab separated with a header ``userID itemID rating timestamp
x_label``; ids are already 0-based indices and ``x_label`` 0/1/2 marks a row as
train/valid/test. ``image_feat.npy`` / ``text_feat.npy`` (and ``audio_feat.npy``
where a dataset has one) hold row i = item i. As in MMRec, the number of users
(items) is the largest index + 1 (items: or the feature row count, if larger).
A feature row of all zeros is an item without that content: its mask is False.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmrec.datasets.readers import check_index_space, check_on_unseen, index_space_limit, register_reader
from mmrec.datasets.readers.table import FLOAT, INT, TIME, Table, as_numpy, read_header, read_table
from mmrec.datasets.schema import DEFAULT_BEHAVIOR, Dataset, FeatureTable, Interactions, ItemContent
from mmrec.errors import DataError

COLUMNS = {"userID": ("user", INT), "itemID": ("item", INT), "rating": ("rating", FLOAT),
           "timestamp": ("timestamp", TIME), "x_label": ("x_label", INT)}
SPLITS = {0: "train", 1: "valid", 2: "test"}
# Feature file prefixes seen in MMRec-style datasets -> our modality names.
MODALITY_ALIASES = {"image": "image", "img": "image", "v": "image", "visual": "image", "vision": "image",
                    "text": "text", "txt": "text", "t": "text", "audio": "audio", "a": "audio", "acoustic": "audio"}


def _untyped_inter_files(path: Path) -> list[tuple[Path, list[str]]]:
    """``.inter`` files whose header is untyped (RecBole's are ``name:type``)."""
    out = []
    for p in sorted(path.glob("*.inter")):
        try:
            header = read_header(p)
        except DataError:
            continue
        if header and not any(":" in h for h in header):
            out.append((p, header))
    return out


def _detect(path: Path) -> bool:
    files = _untyped_inter_files(path)
    return bool(files) and (any("x_label" in h for _, h in files) or any(path.glob("*_feat.npy")))


def _pick_inter(path: Path, name: str | None) -> Path:
    files = [p for p, _ in _untyped_inter_files(path)]
    if name is not None:
        chosen = [p for p in files if p.stem == name]
    elif len(files) == 1:
        chosen = files
    else:
        chosen = [p for p in files if p.stem == path.resolve().name]
    if len(chosen) != 1:
        raise DataError(f"cannot choose the .inter file among {[p.name for p in files] or 'none'}; "
                        f"pass name=<file stem>", file=path)
    return chosen[0]


@register_reader("mmrec", detect=_detect, priority=10,
                 looks_for="<name>.inter with an x_label column, or <name>.inter plus *_feat.npy (MMRec)")
def read_mmrec(path: str | Path, *, on_unseen: str = "drop", name: str | None = None) -> Dataset:
    """Read an MMRec dataset directory.

    Ids are indices shared by all splits, so no held-out id is unseen in the sense
    of the canonical reader; held-out rows whose user has no training row are
    counted in ``report["held_out_without_train"]`` (``on_unseen`` is accepted for a
    uniform interface and checked, nothing is dropped).
    """
    check_on_unseen(on_unseen)
    root = Path(path)
    inter = _pick_inter(root, name)
    table = read_table(inter, lambda h: COLUMNS.get(h), required=("user", "item", "x_label"))
    if table.n_rows == 0:
        raise DataError("no interaction rows (the file has only a header)", file=inter, line=2)
    user, item, split = (as_numpy(table.columns[c]).astype(np.int64) for c in ("user", "item", "x_label"))
    for col, values in (("user", user), ("item", item)):
        if values.min() < 0:
            raise table.error(int(np.argmax(values < 0)), col, f"negative index {values.min()}")
    bad = ~np.isin(split, list(SPLITS))
    if bad.any():
        raise table.error(int(np.argmax(bad)), "x_label",
                          f"x_label must be 0 (train), 1 (valid) or 2 (test), not {split[bad][0]}")
    for col, values in (("user", user), ("item", item)):
        top = int(np.argmax(values))
        if int(values[top]) + 1 <= index_space_limit(table.n_rows):
            continue  # (the line scan below runs only for a bad file)
        check_index_space(int(values[top]) + 1, table.n_rows, inter, f"{col}s (largest {table.fields[col]} + 1)",
                          line=table.line_of(top), field=table.fields[col])
    features = _features(root)
    n_items = max(int(item.max()) + 1, *(int(t.features.shape[0]) for t in features.values()), 0)
    for modality, t in features.items():
        if t.features.shape[0] < n_items:
            raise DataError(f"{t.features.shape[0]} feature rows but item ids go up to {n_items - 1}",
                            file=root / t.meta["file"], field=modality)
    n_users = int(user.max()) + 1
    rows = {s: _rows(table, user, item, split == k) for k, s in SPLITS.items()}
    train = rows["train"]
    if len(train) == 0:
        raise DataError("no training rows (x_label 0)", file=inter, field="x_label")
    has_train = np.zeros(n_users, dtype=bool)
    has_train[train.user] = True
    report = {"held_out_without_train": {s: {"rows": int((~has_train[r.user]).sum())}
                                         for s, r in rows.items() if s != "train" and len(r)}}
    counts = np.bincount(train.item, minlength=n_items)
    cold = np.flatnonzero(counts == 0)
    return Dataset(
        name=inter.stem, behaviors=[DEFAULT_BEHAVIOR], target=DEFAULT_BEHAVIOR,
        user_ids=np.array([str(i) for i in range(n_users)], dtype=object),
        item_ids=np.array([str(i) for i in range(n_items)], dtype=object),
        train=train, valid=rows["valid"] if len(rows["valid"]) else None,
        test=rows["test"] if len(rows["test"]) else None,
        items=ItemContent(features=features), cold_items=cold if len(cold) else None,
        root=str(root), split="fixed" if len(rows["test"]) or len(rows["valid"]) else None, report=report,
    )


def _rows(table: Table, user: np.ndarray, item: np.ndarray, sel: np.ndarray) -> Interactions:
    opt = {c: as_numpy(table.columns[c])[sel] for c in ("timestamp", "rating") if table.has(c)}
    return Interactions(user[sel], item[sel], np.zeros(int(sel.sum()), dtype=np.int64), **opt)


def _features(root: Path) -> dict[str, FeatureTable]:
    out: dict[str, FeatureTable] = {}
    for p in sorted(root.glob("*_feat.npy")):
        prefix = p.name[: -len("_feat.npy")]
        modality = MODALITY_ALIASES.get(prefix.lower(), prefix.lower())
        if modality in out:
            raise DataError(f"two feature files for modality '{modality}'", file=p)
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:
            raise DataError(f"cannot read numpy array: {e}", file=p) from None
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"expected a 2-D numeric array [n_items, dim], got {arr.dtype} {arr.shape}", file=p)
        feats = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if not torch.isfinite(feats).all():
            row = int(torch.nonzero(~torch.isfinite(feats).all(dim=1))[0])
            raise DataError(f"row {row} (item {row}) has NaN or infinite values", file=p, field=modality)
        mask = (feats != 0).any(dim=1)  # all-zero rows: no content for that item
        out[modality] = FeatureTable(feats, mask, {"file": p.name, "source": "mmrec"})
    return out
