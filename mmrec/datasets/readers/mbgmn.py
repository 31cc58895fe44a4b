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

from mmrec.datasets.readers import (CASCADE_RANK, cascade_order, check_index_space, check_on_unseen,
                                   register_reader)
from mmrec.datasets.schema import Dataset, Interactions
from mmrec.errors import DataError

MBGMN_TRAIN = re.compile(r"trn_(.+)")
SSLREC_TRAIN = re.compile(r"train_mat_(.+)\.pkl")
_BUILTINS = {"list", "tuple", "dict", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
             "bytearray", "slice", "range", "object"}
_NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer", "frombuffer"}


class _SafeUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD step can be checked
    """Builds only numpy arrays, scipy sparse matrices and builtin containers.

    A numpy dtype's pickled state (flags, item size) is applied unchecked by numpy; a
    flipped byte there gives a float64 that claims to hold object references and
    corrupts numpy (found by tests/faults/test_fuzz_readers.py). So a dtype's state must
    be exactly the one numpy writes for that type, and object dtypes are refused.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self) -> None:
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.dtype):
            ref = None
            if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
                try:
                    ref = (inst.newbyteorder(state[1]) if state[1] in "<>" else inst).__reduce__()[2]
                except (TypeError, ValueError):
                    ref = None
            if inst.hasobject or ref is None or state != ref:
                raise pickle.UnpicklingError(f"refusing a numpy dtype with a non-standard state {state!r}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

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
        if not np.issubdtype(obj.dtype, np.number) and obj.dtype != bool:
            raise DataError(f"expected a numeric matrix, got dtype {obj.dtype}", file=path)
        obj = sp.csr_matrix(obj)
    if not sp.issparse(obj):
        raise DataError(f"expected a 2-D scipy.sparse user x item matrix, got {type(obj).__name__}", file=path)
    _check_sparse(obj, path)  # before any scipy method: a corrupt pickle may lack attributes they use
    m = sp.csr_matrix(obj)
    m.eliminate_zeros()  # explicit zeros are not interactions (peers test != 0)
    m.sum_duplicates()
    if m.nnz and not np.all(np.isfinite(m.data)):
        raise DataError("matrix holds NaN or infinite values", file=path)
    return m


def _check_sparse(obj: Any, path: Path) -> None:
    """Check an unpickled sparse matrix's arrays before scipy's C++ routines touch them.

    Unpickling sets ``indptr`` / ``indices`` / ``coords`` as stored, unchecked; a corrupt
    file with an index past the shape makes ``tocoo`` / ``sum_duplicates`` write out of
    bounds (a segfault found by tests/faults/test_fuzz_readers.py). Only csr, csc and coo
    are accepted: the formats MB-GMN and SSLRec write.
    """
    fmt = getattr(obj, "format", None)
    try:
        shape = tuple(int(s) for s in obj._shape)
        data = np.asarray(obj.data)
        if fmt in ("csr", "csc"):
            arrays = {"indptr": np.asarray(obj.indptr), "indices": np.asarray(obj.indices)}
        elif fmt == "coo":
            coords = obj.coords if "coords" in vars(obj) else (obj.row, obj.col)
            arrays = {"row": np.asarray(coords[0]), "col": np.asarray(coords[1])}
        else:
            raise DataError(f"sparse format '{fmt}' is not supported; save the matrix as csr or coo", file=path)
    except DataError:
        raise
    except Exception as e:  # attributes missing or of the wrong kind in a corrupt pickle
        raise DataError(f"not a well-formed sparse matrix ({type(e).__name__}: {e})", file=path) from None
    if len(shape) != 2 or min(shape) < 0:
        raise DataError(f"bad matrix shape {shape}", file=path, field="shape")
    if data.ndim != 1 or not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise DataError(f"matrix values must be a 1-D numeric array, got {data.dtype} {data.shape}", file=path)
    for name, a in arrays.items():
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"'{name}' must be a 1-D integer array, got {a.dtype} {a.shape}", file=path, field=name)
    if fmt in ("csr", "csc"):
        major, minor = shape if fmt == "csr" else shape[::-1]
        indptr, indices = arrays["indptr"], arrays["indices"]
        if len(indptr) != major + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) \
                or indptr[-1] != len(indices) or len(indices) != len(data):
            raise DataError(f"inconsistent {fmt} arrays for shape {shape} (indptr / indices / data lengths)",
                            file=path, field="indptr")
        bounds = {"indices": minor}
    else:
        if not len(arrays["row"]) == len(arrays["col"]) == len(data):
            raise DataError("coo row / col / data lengths differ", file=path, field="row")
        bounds = {"row": shape[0], "col": shape[1]}
    for name, limit in bounds.items():
        a = arrays[name]
        if len(a) and (a.min() < 0 or a.max() >= limit):
            raise DataError(f"'{name}' holds index {a.min() if a.min() < 0 else a.max()} outside 0..{limit - 1} "
                            f"(shape {shape})", file=path, field=name)
    # csr / csc store one indptr entry per row / column, so only the other axis costs nothing to claim
    free = {"csr": (1,), "csc": (0,)}.get(fmt, (0, 1))
    for axis in free:
        check_index_space(shape[axis], len(data), path, f"{('users', 'items')[axis]} (matrix shape {shape})")


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
            except (TypeError, ValueError, OverflowError):
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
