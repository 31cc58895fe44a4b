"""Train / valid / test splits, each registered by name in :data:`mmrec.registry.SPLITS`.

Every split is seeded (``np.random.default_rng(seed)``) and vectorised: rows are
grouped per user with ``np.lexsort`` and group boundaries, never a Python loop per
user. A split only *chooses held-out rows* of the target behavior (one row per
held-out (user, item) pair: its latest occurrence); :func:`apply_split` then
removes every training row of the target behavior whose pair is held out (repeat
interactions included), so no held-out pair can leak into training. Rows of the
other behaviors stay in training unless a split says otherwise (``temporal`` drops
future rows, ``cold`` drops every row of a cold item); what is dropped is counted
in ``report["split"]``.

Splits other than ``fixed`` re-split everything the dataset holds (train, valid and
test rows together), so applying one to already split data is well defined.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mmrec.datasets.schema import Dataset, Interactions
from mmrec.errors import ConfigError, DataError
from mmrec.registry import SPLITS

__all__ = ["apply_split", "default_split_name", "SplitParts"]


@dataclass
class SplitParts:
    """What a split function returns: training rows (before pair removal) and held-out rows."""

    train: Interactions
    valid: Interactions
    test: Interactions
    cold_items: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def default_split_name(data: Dataset) -> str:
    """``fixed`` with held-out files, else ``loo`` for multi-behavior data, else ``random``."""
    if data.test is not None:
        return "fixed"
    return "loo" if data.n_behaviors > 1 else "random"


def apply_split(data: Dataset, name: str | None = None, seed: int = 0, **kw: Any) -> Dataset:
    """Split ``data`` by a registered split (default: :func:`default_split_name`).

    Returns a copy with ``train``/``valid``/``test``, ``split`` and ``cold_items`` set
    and ``report["split"] = {name, seed, sizes, ...}``. ``kw`` are the split's options
    (e.g. ``ratios=`` for ``random``, ``share=`` for ``cold``).
    """
    name = default_split_name(data) if name is None else name.lower()
    fn: Callable[..., SplitParts] = SPLITS.get(name)
    options = [p for p in inspect.signature(fn).parameters if p not in ("data", "rng")]
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise ConfigError(f"split '{name}' has no option {', '.join(unknown)}; "
                          f"its options: {', '.join(options) or '(none)'}")
    parts = fn(data, np.random.default_rng(seed), **kw)

    t = data.target_index
    held = np.unique(np.concatenate([_target_keys(parts.valid, t, data.n_items),
                                     _target_keys(parts.test, t, data.n_items)]))
    leak = (parts.train.behavior == t) & np.isin(parts.train.pair_keys(data.n_items), held)
    train = parts.train.select(~leak)

    report = dict(data.report)
    info: dict[str, Any] = {
        "name": name, "seed": int(seed),
        "sizes": {"train": len(train), "valid": len(parts.valid), "test": len(parts.test),
                  "valid_users": int(len(np.unique(parts.valid.user))),
                  "test_users": int(len(np.unique(parts.test.user)))},
        # training rows of the target behavior removed because their pair is held out
        "removed_heldout_pairs_from_train": int(leak.sum()),
    }
    cold_valid = parts.info.pop("cold_valid_items", None)
    info.update(parts.info)
    if kw:
        info["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
    report["split"] = info
    report.pop("cold_valid_items", None)
    if cold_valid is not None:
        report["cold_valid_items"] = cold_valid
    return data.replace(train=train, valid=parts.valid, test=parts.test, split=name,
                        cold_items=parts.cold_items, report=report)


# -- helpers ---------------------------------------------------------------------------

def _target_keys(rows: Interactions, target: int, n_items: int) -> np.ndarray:
    sel = rows.behavior == target
    return rows.user[sel] * np.int64(n_items) + rows.item[sel]


def _pool(data: Dataset) -> Interactions:
    """Every row the dataset holds (train, then valid, then test: file order is kept)."""
    return Interactions.concat([r for r in (data.train, data.valid, data.test) if r is not None])


def _latest_pairs(rows: Interactions, index: np.ndarray, n_items: int) -> np.ndarray:
    """One row per distinct (user, item) pair among ``rows[index]``: its latest occurrence.

    "Latest" is by timestamp, ties and missing timestamps broken by row order. The
    result (indices into ``rows``) is ordered by user, then by that latest time.
    """
    index = np.asarray(index, dtype=np.int64)
    if rows.timestamp is not None:
        order = np.lexsort((index, rows.timestamp[index], rows.user[index]))
    else:
        order = np.lexsort((index, rows.user[index]))
    ordered = index[order]
    keys = rows.user[ordered] * np.int64(n_items) + rows.item[ordered]
    # the last occurrence of each key in this order = the first one in reversed order
    _, first_rev = np.unique(keys[::-1], return_index=True)
    last = np.sort(len(keys) - 1 - first_rev)
    return ordered[last]


def _groups(sorted_users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each row in its user group and the group's size (rows sorted by user)."""
    n = len(sorted_users)
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group = np.repeat(np.arange(len(starts)), sizes)
    return np.arange(n) - starts[group], sizes[group]


def _random_heldout(rows: Interactions, index: np.ndarray, n_items: int, rng: np.random.Generator,
                    ratios: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per user, a random share of distinct target pairs for valid and test (RecBole's rule).

    Counts are ``floor(ratio * n)``; a user whose share is between 0 and 1 still gets
    one test (then one valid) pair while more than one pair stays in training, so a
    user always keeps at least one training pair.
    """
    r_train, r_valid, r_test = (float(r) for r in ratios)
    if min(r_train, r_valid, r_test) < 0 or abs(r_train + r_valid + r_test - 1.0) > 1e-6 or r_train <= 0:
        raise ConfigError(f"split ratios must be non-negative, sum to 1 and keep some training; got {ratios}")
    rep = _latest_pairs(rows, index, n_items)
    rep = rep[np.lexsort((rng.random(len(rep)), rows.user[rep]))]  # shuffled within each user
    pos, n = _groups(rows.user[rep])
    n_test = np.floor(r_test * n + 1e-9).astype(np.int64)
    n_valid = np.floor(r_valid * n + 1e-9).astype(np.int64)
    n_train = n - n_test - n_valid
    for count, r in ((n_test, r_test), (n_valid, r_valid)):
        bump = (n_train > 1) & (r * n > 0) & (r * n < 1)
        count += bump
        n_train -= bump
    test = rep[pos < n_test]
    valid = rep[(pos >= n_test) & (pos < n_test + n_valid)]
    return valid, test


def _target_rows(rows: Interactions, target: int) -> np.ndarray:
    return np.flatnonzero(rows.behavior == target)


# -- the splits --------------------------------------------------------------------------

@SPLITS.register("fixed")
def split_fixed(data: Dataset, rng: np.random.Generator, min_items: int = 2,
                valid_rule: str = "auto") -> SplitParts:
    """The held-out rows the files give (``test.tsv``, ``valid.tsv``).

    Without a validation file, validation is carved from training: one target item per
    user; users with fewer than ``min_items`` distinct target items in training keep
    them all. ``valid_rule``: ``latest`` carves the user's latest training target item
    (by timestamp), so validation looks like a test set of later purchases; ``random``
    a seeded random one; ``auto`` (default) is ``latest`` where the rows carry times and
    ``random`` otherwise. The rule used is recorded as ``report["split"]["valid_rule"]``.
    """
    if data.test is None:
        raise DataError(f"split 'fixed' needs held-out rows (test.tsv) but dataset '{data.name}' has none; "
                        "use loo, random, temporal or cold", file=data.root)
    if valid_rule not in ("auto", "latest", "random"):
        raise ConfigError(f"split option valid_rule must be auto, latest or random, not '{valid_rule}'")
    info: dict[str, Any] = {"carved_valid": data.valid is None}
    if data.valid is not None:
        return SplitParts(data.train, data.valid, data.test, data.cold_items, info)
    train = data.train
    if valid_rule == "auto":
        valid_rule = "latest" if train.timestamp is not None else "random"
    if valid_rule == "latest" and train.timestamp is None:
        raise DataError(f"split option valid_rule=latest needs timestamps, but dataset '{data.name}' has none",
                        file=data.root)
    info["valid_rule"] = valid_rule
    rep = _latest_pairs(train, _target_rows(train, data.target_index), data.n_items)  # by user, then time
    if valid_rule == "random":
        rep = rep[np.lexsort((rng.random(len(rep)), train.user[rep]))]
    pos, n = _groups(train.user[rep])
    pick = (n - 1 - pos == 0) if valid_rule == "latest" else (pos == 0)
    valid = train.select(rep[pick & (n >= min_items)])
    return SplitParts(train, valid, data.test, data.cold_items, info)


@SPLITS.register("loo")
def split_loo(data: Dataset, rng: np.random.Generator, min_items: int = 3) -> SplitParts:
    """Leave-one-out by time on the target behavior (CIGF, MB-GMN).

    Per user, the latest distinct target item goes to test and the second latest to
    valid; users with fewer than ``min_items`` distinct target items keep all in
    training. Ties and missing timestamps fall back to row (file) order.
    """
    pool = _pool(data)
    rep = _latest_pairs(pool, _target_rows(pool, data.target_index), data.n_items)
    pos, n = _groups(pool.user[rep])
    from_end = n - 1 - pos
    keep = n >= min_items
    return SplitParts(pool, pool.select(rep[keep & (from_end == 1)]), pool.select(rep[keep & (from_end == 0)]))


@SPLITS.register("random")
def split_random(data: Dataset, rng: np.random.Generator,
                 ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> SplitParts:
    """Per user, a random ``ratios`` (train, valid, test) share of distinct target items."""
    pool = _pool(data)
    valid, test = _random_heldout(pool, _target_rows(pool, data.target_index), data.n_items, rng, tuple(ratios))
    return SplitParts(pool, pool.select(valid), pool.select(test))


@SPLITS.register("temporal")
def split_temporal(data: Dataset, rng: np.random.Generator,
                   cuts: tuple[float, float] = (0.8, 0.9)) -> SplitParts:
    """A global time cut: target rows before the ``cuts[0]`` quantile of target times
    train, up to ``cuts[1]`` validate, later ones test.

    Rows of other behaviors at or after the training cut are dropped (they are the
    future: keeping them would leak it) and counted. A pair held out in both windows
    is tested only (its latest occurrence decides).
    """
    pool = _pool(data)
    if pool.timestamp is None:
        raise DataError(f"split 'temporal' needs timestamps; dataset '{data.name}' has none",
                        file=data.root, field="timestamp")
    q1, q2 = (float(c) for c in cuts)
    if not 0 < q1 <= q2 < 1:
        raise ConfigError(f"temporal cuts must satisfy 0 < cut1 <= cut2 < 1; got {cuts}")
    ts = pool.timestamp
    is_t = pool.behavior == data.target_index
    if not is_t.any():
        raise DataError(f"dataset '{data.name}' has no '{data.target}' rows to split", file=data.root)
    t1, t2 = np.quantile(ts[is_t], [q1, q2])
    before = ts < t1
    if not (before & is_t).any() or not (is_t & (ts >= t2)).any():
        raise DataError(f"split 'temporal': timestamps of '{data.target}' do not spread across the cuts "
                        f"{cuts} (times {t1} and {t2})", file=data.root, field="timestamp")
    test = _latest_pairs(pool, np.flatnonzero(is_t & (ts >= t2)), data.n_items)
    valid = _latest_pairs(pool, np.flatnonzero(is_t & (ts >= t1) & (ts < t2)), data.n_items)
    valid = valid[~np.isin(pool.pair_keys(data.n_items)[valid], pool.pair_keys(data.n_items)[test])]
    train = pool.select(before)
    train_users = np.unique(train.user)
    info = {"cut_times": [t1.item(), t2.item()],
            "dropped_future_rows": int((~before & ~is_t).sum()),
            # later repeats of a held-out pair (one row per pair is kept)
            "dropped_repeat_rows": int((~before & is_t).sum() - len(test) - len(valid)),
            "new_users": {"valid": int(len(np.setdiff1d(pool.user[valid], train_users))),
                          "test": int(len(np.setdiff1d(pool.user[test], train_users)))}}
    return SplitParts(train, pool.select(valid), pool.select(test), info=info)


@SPLITS.register("cold")
def split_cold(data: Dataset, rng: np.random.Generator, share: float = 0.2,
               ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> SplitParts:
    """Cold-start items: a ``share`` of the items with target rows lose every training row.

    Cold items are split into two disjoint halves: validation-cold items, whose target
    pairs go to valid, and test-cold items (``Dataset.cold_items``), whose target pairs
    go to test; their rows of other behaviors are dropped (counted). Warm items get the
    ``random`` split, and their held-out rows join valid / test too.
    ``report["cold_valid_items"]`` lists the validation-cold items (ints).
    """
    if not 0 < share < 1:
        raise ConfigError(f"cold share must be in (0, 1); got {share}")
    pool = _pool(data)
    t = data.target_index
    is_t = pool.behavior == t
    candidates = np.unique(pool.item[is_t])
    n_cold = int(round(share * len(candidates)))
    if n_cold < 2:
        raise DataError(f"split 'cold': share {share} of {len(candidates)} items with '{data.target}' rows "
                        "leaves fewer than 2 cold items (one for valid, one for test)", file=data.root)
    chosen = rng.permutation(candidates)[:n_cold]
    valid_cold, test_cold = np.sort(chosen[:n_cold // 2]), np.sort(chosen[n_cold // 2:])
    is_cold = np.isin(pool.item, chosen)
    cold_rep = _latest_pairs(pool, np.flatnonzero(is_t & is_cold), data.n_items)
    warm_valid, warm_test = _random_heldout(pool, np.flatnonzero(is_t & ~is_cold), data.n_items, rng,
                                            tuple(ratios))
    valid = np.concatenate([warm_valid, cold_rep[np.isin(pool.item[cold_rep], valid_cold)]])
    test = np.concatenate([warm_test, cold_rep[np.isin(pool.item[cold_rep], test_cold)]])
    info = {"cold_items": {"valid": int(len(valid_cold)), "test": int(len(test_cold))},
            # every row of a cold item leaves training; those of other behaviors are gone
            "cold_rows_removed_from_train": int(is_cold.sum()),
            "dropped_cold_rows": int((is_cold & ~is_t).sum()),
            "cold_valid_items": valid_cold.tolist()}  # a list: the report stays JSON-serialisable
    return SplitParts(pool.select(~is_cold), pool.select(valid), pool.select(test), test_cold, info)
