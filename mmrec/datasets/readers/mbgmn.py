"""MB-GMN / SSLRec multi-behavior pickles: one ``scipy.sparse`` user x item matrix per behavior.

Two namings:

* MB-GMN: ``trn_<behavior>`` (e.g. ``trn_pv``, ``trn_fav``, ``trn_cart``, ``trn_buy``)
  and ``tst_int``: per user, the held-out target item or None.
* SSLRec: ``train_mat_<behavior>.pkl`` and ``test_mat.pkl``, a sparse user x item
  matrix of held-out target items.

A name joining two or more known behavior words (``train_mat_view_buy.pkl``) is a
derived meta-path matrix, not a behavior: it is skipped and listed in
``report["skipped_files"]``. Behaviors are ordered by the known cascade
(pv/view/click < fav/collect < cart < buy/purchase); the target is the last one.
Other names need ``behaviors=[...]`` (cascade order, target last). Non-zero values
that are not all 1 are kept as timestamps (SSLRec stores interaction times there).

Pickles can run code when loaded, so these are read with an unpickler that only
builds numpy arrays, scipy sparse matrices and plain Python containers.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from mmrec.datasets.readers import CASCADE_RANK, cascade_order, check_on_unseen, register_reader
from mmrec.datasets.schema import Dataset, Interactions
from mmrec.errors import DataError

MBGMN_TRAIN = re.compile(r"trn_(.+)")
SSLREC_TRAIN = re.compile(r"train_mat_(.+)\.pkl")
_BUILTINS = {"list", "tuple", "dict", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
             "bytearray", "slice", "range", "object"}
_NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer", "frombuffer"}


class _SafeUnpickler(pickle.Unpickler):
    """Builds only numpy arrays, scipy sparse matrices and builtin containers."""

    def find_class(self, module: str, name: str) -> Any:
        ok = (module == "builtins" and name in _BUILTINS) \
            or (module in ("copyreg",) and name == "_reconstructor") \
            or (module == "collections" and name == "OrderedDict") \
            or (module.split(".")[0] == "numpy" and (name in _NUMPY or module == "numpy" and name.endswith("64"))) \
            or (module.startswith("scipy.sparse") and re.fullmatch(r"[a-z]{3}_(matrix|array)", name))
        if not ok:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a numpy / scipy.sparse object")
        return super().find_class(module, name)


def load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f).load()
    except Exception as e:  # corrupt or unsafe pickles: one clear error
        raise DataError(f"cannot load pickle: {e}", file=path) from None


def _train_files(path: Path) -> dict[str, tuple[Path, str]]:
    """Behavior-token -> (file, naming) for every training-matrix file name."""
    out = {}
    for p in sorted(path.iterdir()):
        for pattern, naming in ((MBGMN_TRAIN, "mbgmn"), (SSLREC_TRAIN, "sslrec")):
            m = pattern.fullmatch(p.name)
            if m and p.is_file():
                out[m.group(1)] = (p, naming)
    return out


def _detect(path: Path) -> bool:
    return bool(_train_files(path))


def _is_derived(token: str) -> bool:
    """``view_buy`` joins two known behavior words: a derived matrix, not a behavior."""
    return sum(part.lower() in CASCADE_RANK for part in token.split("_")) > 1


@register_reader("mbgmn", detect=_detect, priority=30,
                 looks_for="trn_<behavior> and tst_int (MB-GMN) or train_mat_<behavior>.pkl and test_mat.pkl "
                           "(SSLRec) pickled scipy.sparse matrices")
def read_mbgmn(path: str | Path, *, on_unseen: str = "drop", behaviors: list[str] | None = None,
               name: str | None = None) -> Dataset:
    """Read MB-GMN or SSLRec multi-behavior pickles into a Dataset (ids are the matrix indices)."""
    check_on_unseen(on_unseen)
    root = Path(path)
    found = _train_files(root)
    if not found:
        raise DataError("no trn_<behavior> (MB-GMN) or train_mat_<behavior>.pkl (SSLRec) files", file=root)
    namings = {naming for _, naming in found.values()}
    if len(namings) > 1:
        raise DataError("both MB-GMN (trn_*) and SSLRec (train_mat_*.pkl) files are present; keep one set",
                        file=root)
    skipped = sorted(p.name for tok, (p, _) in found.items() if _is_derived(tok))
    tokens = [tok for tok in found if not _is_derived(tok)]
    if behaviors is not None:
        missing = [b for b in behaviors if b not in found]
        if missing:
            raise DataError(f"no training matrix for behavior(s) {missing}; found {sorted(found)}", file=root)
        order = list(behaviors)
        skipped += sorted(found[t][0].name for t in tokens if t not in order)
    else:
        order = cascade_order(tokens)
        if order is None:
            unknown = [t for t in tokens if t.lower() not in CASCADE_RANK]
            raise DataError(f"behavior name(s) {unknown} are not known cascade stages "
                            f"({', '.join(CASCADE_RANK)}); pass behaviors=[...] in cascade order, target last",
                            file=root)
    mats = {b: _matrix(found[b][0]) for b in order}
    shapes = {m.shape for m in mats.values()}
    if len(shapes) != 1:
        raise DataError(f"behavior matrices differ in shape: {{{', '.join(f'{b}: {m.shape}' for b, m in mats.items())}}}",
                        file=root, field="shape")
    n_users, n_items = shapes.pop()
    parts = [_interactions(m, k) for k, m in enumerate(mats.values())]
    train = Interactions.concat(parts)  # timestamps survive only if every behavior has them
    target = order[-1]
    naming = namings.pop()
    test = _test_rows(root, naming, n_users, n_items, len(order) - 1)
    report: dict[str, Any] = {}
    if skipped:
        report["skipped_files"] = skipped
    return Dataset(
        name=name or root.resolve().name, behaviors=order, target=target,
        user_ids=np.array([str(i) for i in range(n_users)], dtype=object),
        item_ids=np.array([str(i) for i in range(n_items)], dtype=object),
        train=train, test=test, root=str(root), split="fixed" if test is not None else None, report=report,
    )


def _matrix(path: Path) -> sp.csr_matrix:
    obj = load_pickle(path)
    if isinstance(obj, np.ndarray) and obj.ndim == 2 and obj.dtype != object:
        obj = sp.csr_matrix(obj)
    if not sp.issparse(obj) or obj.ndim != 2:
        raise DataError(f"expected a 2-D scipy.sparse user x item matrix, got {type(obj).__name__}", file=path)
    m = sp.csr_matrix(obj)
    m.eliminate_zeros()  # explicit zeros are not interactions (peers test != 0)
    m.sum_duplicates()
    if m.nnz and not np.all(np.isfinite(m.data)):
        raise DataError("matrix holds NaN or infinite values", file=path)
    return m


def _interactions(m: sp.csr_matrix, behavior: int) -> Interactions:
    coo = m.tocoo()
    order = np.lexsort((coo.col, coo.row))
    user, item, value = coo.row[order], coo.col[order], coo.data[order]
    timestamp = None
    if len(value) and not np.all(value == 1):
        timestamp = value.astype(np.int64) if np.all(value == np.round(value)) else value.astype(np.float64)
    return Interactions(user, item, np.full(len(user), behavior, dtype=np.int64), timestamp=timestamp)


def _test_rows(root: Path, naming: str, n_users: int, n_items: int, target: int) -> Interactions | None:
    if naming == "mbgmn":
        path = root / "tst_int"
        if not path.is_file():
            return None
        raw = load_pickle(path)
        try:
            values = list(raw)
        except TypeError:
            raise DataError(f"expected a per-user list of items, got {type(raw).__name__}", file=path) from None
        if len(values) != n_users:
            raise DataError(f"{len(values)} entries for {n_users} users", file=path)
        users, items = [], []
        for u, v in enumerate(values):
            if v is None:
                continue
            try:
                i = int(v)
            except (TypeError, ValueError):
                raise DataError(f"entry of user {u} is {v!r}, not an item index or None", file=path,
                                field=f"user {u}") from None
            if not 0 <= i < n_items:
                raise DataError(f"item {i} of user {u} is outside 0..{n_items - 1}", file=path, field=f"user {u}")
            users.append(u)
            items.append(i)
        user, item = np.array(users, dtype=np.int64), np.array(items, dtype=np.int64)
    else:
        path = root / "test_mat.pkl"
        if not path.is_file():
            return None
        m = _matrix(path)
        if m.shape != (n_users, n_items):
            raise DataError(f"shape {m.shape} differs from the training matrices' {(n_users, n_items)}",
                            file=path, field="shape")
        coo = m.tocoo()
        order = np.lexsort((coo.col, coo.row))
        user, item = coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)
    return Interactions(user, item, np.full(len(user), target, dtype=np.int64))
