"""Labelled exposures from data: which (user, item) pairs a head trains on, with which labels.

A head needs rows of (user, item, scenario) with one 0/1 label per task, split like
the run (train / valid / test). Datasets carry them in different shapes, so a
registry of *task rules* (:data:`TASK_RULES`) derives them:

============== ===================================== ==========================================
rule           data                                  tasks (cascade order)
============== ===================================== ==========================================
exposures      ``Dataset.exposures`` (exposures.tsv, the label columns in file order, e.g.
               the synthetic world)                  ``click`` -> ``convert``
rated          a ``rating`` column (MovieLens)       ``watch`` (rated vs. sampled unrated pairs,
                                                     1:1 per user) -> ``like`` (rating >= 4
                                                     among the watched; 0 elsewhere)
multi-behavior behaviors (view, cart, buy, ...)      one task per behavior: pair had this
                                                     behavior or a later one (a buy implies the
                                                     view), on observed pairs + sampled negatives
============== ===================================== ==========================================

Held-out rows follow the run's split: an exposure whose (user, item) pair is in the
valid / test rows goes to valid / test. Sampled negatives are drawn per user and part
(as many as the user's positives there, times ``neg_ratio``), seeded; exposures of the
``exposures`` rule that are not tied to a held-out pair are split per user by ``holdout``
ratios, seeded. Labels follow the cascade: a later task is 1 only where the earlier
one is (ESMM's click∧convert), so a head's loss runs over the whole exposure space.

Scenarios: the data's ``scenario`` column (exposures / interactions; a sampled negative takes
its user's last positive's scenario) by default, none
(one scenario, ``all``), or a ``users.tsv`` column (``age`` in MovieLens-1M's bands,
any other column by value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmrec.datasets.sampling import sample_negatives
from mmrec.datasets.schema import Dataset, Interactions
from mmrec.errors import ConfigError, DataError
from mmrec.registry import Registry

#: name -> ``rule(data, rng, options) -> RuleOutput``
TASK_RULES: Registry = Registry("task rule")
#: user column name -> ``binning(values) -> (ids, names)``; columns not listed: one scenario per value
SCENARIO_BINS: Registry = Registry("scenario binning")
PARTS = ("train", "valid", "test")


@dataclass
class TaskOptions:
    """How exposures are derived (``--set head_args.<field>=...``)."""

    rule: str | None = None              # exposures | rated | multi-behavior (None: dataset.yaml, else derived)
    tasks: list[str] | None = None       # tasks to train, in cascade order (None: every task of the rule)
    scenario: str | None = None          # None: the data's scenario column | none | a users.tsv column
    like_threshold: float = 4.0          # rated: like = rating >= this
    neg_ratio: float = 1.0               # rated / multi-behavior: sampled negatives per positive, per user
    holdout: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # exposures not tied to held-out pairs

    def __post_init__(self) -> None:
        if self.neg_ratio <= 0:
            raise ConfigError(f"head_args.neg_ratio must be > 0, got {self.neg_ratio}")
        h = [float(v) for v in self.holdout]
        if len(h) != 3 or min(h) < 0 or abs(sum(h) - 1.0) > 1e-6 or h[0] <= 0:
            raise ConfigError(f"head_args.holdout must be 3 non-negative shares (train, valid, test) summing "
                              f"to 1, got {self.holdout}")


@dataclass
class RuleOutput:
    """What a task rule returns: rows, labels by task (cascade order), part per row."""

    user: np.ndarray
    item: np.ndarray
    labels: dict[str, np.ndarray]
    part: np.ndarray                      # int8: 0 train, 1 valid, 2 test
    scenario: np.ndarray | None = None    # the data's scenario ids, when the rows carry them
    source: str | None = None             # file the labels came from (for messages)


@dataclass
class ExposureTable:
    """Labelled exposures a head trains and is evaluated on."""

    user: np.ndarray          # int64 [N]
    item: np.ndarray          # int64 [N]
    scenario: np.ndarray      # int64 [N], index into ``scenarios``
    labels: np.ndarray        # float32 [N, T]
    part: np.ndarray          # int8 [N]: 0 train, 1 valid, 2 test
    tasks: list[str]
    scenarios: list[str]
    rule: str
    scenario_source: str

    def __len__(self) -> int:
        return len(self.user)

    def rows(self, part: str) -> np.ndarray:
        """Row indices of ``train`` / ``valid`` / ``test``."""
        if part not in PARTS:
            raise ConfigError(f"exposure part must be one of {PARTS}, not '{part}'")
        return np.flatnonzero(self.part == PARTS.index(part))

    def summary(self) -> dict[str, Any]:
        """Sizes and positive rates per part (goes into metrics.json's data report)."""
        out: dict[str, Any] = {"rule": self.rule, "tasks": list(self.tasks), "scenarios": list(self.scenarios),
                               "scenario_source": self.scenario_source}
        for p in PARTS:
            idx = self.rows(p)
            out[p] = {"rows": int(len(idx)),
                      **{f"{t}_rate": round(float(self.labels[idx, k].mean()), 4) if len(idx) else 0.0
                         for k, t in enumerate(self.tasks)}}
        return out


# -- helpers ---------------------------------------------------------------------------------

def _pool(data: Dataset) -> tuple[Interactions, np.ndarray]:
    """Every row (train, valid, test) and its part."""
    parts = [(r, k) for k, r in enumerate((data.train, data.valid, data.test)) if r is not None]
    pool = Interactions.concat([r for r, _ in parts])
    part = np.concatenate([np.full(len(r), k, np.int8) for r, k in parts]) if parts else np.zeros(0, np.int8)
    return pool, part


def _heldout_part(data: Dataset, keys: np.ndarray) -> np.ndarray:
    """Part of each pair key: 2 if the pair is in the test rows, 1 in the valid rows, else 0."""
    out = np.zeros(len(keys), np.int8)
    for k, rows in ((1, data.valid), (2, data.test)):
        if rows is not None and len(rows):
            out[np.isin(keys, rows.pair_keys(data.n_items))] = k
    return out


def _split_by_user(users: np.ndarray, rng: np.random.Generator, shares: list[float]) -> np.ndarray:
    """Per user, a seeded random ``shares`` (train, valid, test) of the rows; returns parts."""
    n = len(users)
    part = np.zeros(n, np.int8)
    if n == 0:
        return part
    order = np.lexsort((rng.random(n), users))
    u = users[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group = np.repeat(np.arange(len(starts)), sizes)
    frac = (np.arange(n) - starts[group] + 0.5) / sizes[group]
    r0, r1 = float(shares[0]), float(shares[0]) + float(shares[1])
    part[order] = np.where(frac < r0, 0, np.where(frac < r1, 1, 2)).astype(np.int8)
    return part


def _negatives(data: Dataset, pos_user: np.ndarray, pos_part: np.ndarray, known: np.ndarray,
               rng: np.random.Generator, ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampled (user, item, part): per user and part, ``ratio`` × the user's positives there.

    ``known``: sorted pair keys that must not be drawn (every observed pair).
    """
    users, items, parts = [], [], []
    for k in range(len(PARTS)):
        sel = pos_part == k
        if not sel.any():
            continue
        counts = np.bincount(pos_user[sel], minlength=data.n_users)
        n_neg = np.floor(counts * ratio + rng.random(data.n_users)).astype(np.int64)
        n_neg[counts == 0] = 0
        u = np.repeat(np.arange(data.n_users, dtype=np.int64), n_neg)
        users.append(u)
        items.append(sample_negatives(known, u, data.n_items, rng, 1)[:, 0])
        parts.append(np.full(len(u), k, np.int8))
    if not users:
        z = np.zeros(0, np.int64)
        return z, z.copy(), np.zeros(0, np.int8)
    return np.concatenate(users), np.concatenate(items), np.concatenate(parts)


def _with_user_scenario(pos_scen: np.ndarray, pos_user: np.ndarray, neg_user: np.ndarray,
                        n_users: int) -> np.ndarray:
    """Positives' scenarios, then each sampled negative's: its user's last positive's scenario
    (a sampled pair was never shown, so it borrows the context the user was last seen in)."""
    by_user = np.zeros(n_users, np.int64)
    by_user[pos_user] = pos_scen                      # later rows win
    return np.r_[np.asarray(pos_scen, np.int64), by_user[neg_user]]


def _last_per_pair(keys: np.ndarray) -> np.ndarray:
    """Index of the last row of each distinct key (in row order), sorted by row."""
    _, first_rev = np.unique(keys[::-1], return_index=True)
    return np.sort(len(keys) - 1 - first_rev)


# -- the rules ------------------------------------------------------------------------------

@TASK_RULES.register("exposures")
def rule_exposures(data: Dataset, rng: np.random.Generator, opts: TaskOptions) -> RuleOutput:
    """Logged exposures with their label columns (``exposures.tsv``; the synthetic world)."""
    exp = data.exposures
    source = str(Path(data.root) / "exposures.tsv") if data.root else "exposures"
    if exp is None or len(exp) == 0:
        raise DataError("task rule 'exposures' needs exposures (exposures.tsv with label columns); "
                        "the dataset has none", file=source)
    if not exp.labels:
        raise DataError("exposures have no label columns (e.g. click, convert)", file=source)
    for name, col in exp.labels.items():
        bad = ~np.isin(col, (0, 1))
        if bad.any():
            raise DataError(f"label values must be 0 or 1; {int(bad.sum())} row(s) hold others, e.g. "
                            f"{float(col[bad][0]):g} (user '{data.user_ids[exp.user[bad][0]]}', item "
                            f"'{data.item_ids[exp.item[bad][0]]}')", file=source, field=name)
    keys = exp.pair_keys(data.n_items)
    part = _heldout_part(data, keys)
    free = part == 0
    part[free] = _split_by_user(exp.user[free], rng, opts.holdout)
    return RuleOutput(exp.user, exp.item, dict(exp.labels), part, exp.scenario, source)


@TASK_RULES.register("rated")
def rule_rated(data: Dataset, rng: np.random.Generator, opts: TaskOptions) -> RuleOutput:
    """``watch``: rated pairs vs. sampled unrated ones; ``like``: rating >= threshold among the watched."""
    pool, part = _pool(data)
    if pool.rating is None:
        raise DataError("task rule 'rated' needs a 'rating' column in the interactions (and held-out rows)",
                        file=data.root, field="rating")
    ok = ~np.isnan(pool.rating)
    pool, part = pool.select(ok), part[ok]
    keys = pool.pair_keys(data.n_items)
    last = _last_per_pair(keys)                    # a re-rated pair counts once, with its latest rating
    pos_user, pos_item, pos_part = pool.user[last], pool.item[last], part[last]
    like = (pool.rating[last] >= opts.like_threshold).astype(np.float32)
    known = np.unique(keys)
    nu, ni, npart = _negatives(data, pos_user, pos_part, known, rng, opts.neg_ratio)
    n_pos, n_neg = len(last), len(nu)
    scen = None if pool.scenario is None else _with_user_scenario(pool.scenario[last], pos_user, nu, data.n_users)
    return RuleOutput(np.r_[pos_user, nu], np.r_[pos_item, ni],
                      {"watch": np.r_[np.ones(n_pos, np.float32), np.zeros(n_neg, np.float32)],
                       "like": np.r_[like, np.zeros(n_neg, np.float32)]},
                      np.r_[pos_part, npart].astype(np.int8), scen, "interactions")


@TASK_RULES.register("multi-behavior")
def rule_multi_behavior(data: Dataset, rng: np.random.Generator, opts: TaskOptions) -> RuleOutput:
    """One task per behavior in cascade order: the pair had it or any later behavior."""
    pool, _ = _pool(data)
    keys = pool.pair_keys(data.n_items)
    uniq, inverse = np.unique(keys, return_inverse=True)
    B = data.n_behaviors
    had = np.zeros((len(uniq), B), dtype=bool)
    had[inverse, pool.behavior] = True
    funnel = np.flip(np.logical_or.accumulate(np.flip(had, 1), axis=1), 1)   # a later stage implies earlier
    pos_user, pos_item = uniq // data.n_items, uniq % data.n_items
    pos_part = _heldout_part(data, uniq)
    nu, ni, npart = _negatives(data, pos_user, pos_part, uniq, rng, opts.neg_ratio)
    n_neg = len(nu)
    labels = {b: np.r_[funnel[:, k].astype(np.float32), np.zeros(n_neg, np.float32)]
              for k, b in enumerate(data.behaviors)}
    scen = None
    if pool.scenario is not None:
        last = _last_per_pair(keys)                                  # one row per pair, its latest
        pos_scen = pool.scenario[last][np.argsort(keys[last], kind="stable")]   # aligned with sorted uniq
        scen = _with_user_scenario(pos_scen, pos_user, nu, data.n_users)
    return RuleOutput(np.r_[pos_user, nu], np.r_[pos_item, ni], labels,
                      np.r_[pos_part, npart].astype(np.int8), scen, "interactions")


# -- scenarios from a user column ------------------------------------------------------------

#: Ages outside this range are typos (or a sentinel such as -1), not people: an error, not a band.
MAX_AGE = 150


class UserValueError(DataError):
    """A bad users.tsv value; ``index`` is the user's row in the column (for the file line)."""

    def __init__(self, message: str, index: int, field: str) -> None:
        super().__init__(message, field=field)
        self.message, self.index = message, index


@SCENARIO_BINS.register("age")
def bin_age(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """MovieLens-1M's age groups (under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+); empty: ``unknown``."""
    edges = [18, 25, 35, 45, 50, 56]
    names = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
    ages = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if v == "":
            continue
        try:
            ages[i] = float(v)
        except ValueError:
            raise UserValueError(f"age '{v}' is not a number", i, "age") from None
        if not 0 <= ages[i] <= MAX_AGE:  # also nan / inf: leave the field empty for an unknown age
            raise UserValueError(f"age '{v}' is not an age in years (0 to {MAX_AGE}; empty for unknown)", i, "age")
    ids = np.searchsorted(edges, ages, side="right").astype(np.int64)
    missing = np.isnan(ages)
    if missing.any():
        ids[missing] = len(names)
        names = names + ["unknown"]
    return ids, names


def _categorical(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    names = sorted({str(v) if v != "" else "unknown" for v in values})
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[str(v) if v != "" else "unknown"] for v in values], np.int64), names


def user_column(table: Any, column: str) -> tuple[np.ndarray, list[str]]:
    """(group id per user, group names) of a users.tsv column: binned (``age``) or by value.

    A bad value is a :class:`DataError` at its users.tsv line and field.
    """
    values = table.column(column)
    binning: Callable = SCENARIO_BINS.get(column) if column in SCENARIO_BINS else _categorical
    try:
        return binning(values)
    except UserValueError as e:
        raise table.error(e.index, e.field, e.message) from None


def _user_scenarios(data: Dataset, column: str, users: np.ndarray) -> tuple[np.ndarray, list[str]]:
    from mmrec.datasets.users import read_users
    table = read_users(data.root, list(data.user_ids))
    ids, names = user_column(table, column)
    return ids[users], names


# -- derivation -------------------------------------------------------------------------------

def default_rule(data: Dataset) -> str:
    """``exposures`` when the data has them, else ``rated`` with ratings, else ``multi-behavior``."""
    if data.exposures is not None and len(data.exposures) and data.exposures.labels:
        return "exposures"
    if data.train.rating is not None:
        return "rated"
    return "multi-behavior"


def _declared(data: Dataset) -> tuple[Any, str | None]:
    """``tasks`` / ``scenario_column`` of the data directory's dataset.yaml, if any."""
    if not data.root:
        return None, None
    from mmrec.datasets.canonical import read_meta
    meta = read_meta(Path(data.root) / "dataset.yaml")
    return meta.tasks, meta.scenario_column


def derive_tasks(data: Dataset, options: TaskOptions | dict[str, Any] | None = None, seed: int = 0) -> ExposureTable:
    """The labelled exposures of a (split) dataset, by the chosen or derived rule."""
    if options is None or isinstance(options, dict):
        from mmrec.config import from_dict
        options = from_dict(TaskOptions, options or {}, path="head_args")
    declared_tasks, declared_scenario = _declared(data)
    rule = options.rule
    names = options.tasks
    if isinstance(declared_tasks, str):
        rule = rule or declared_tasks
    elif isinstance(declared_tasks, list) and names is None:
        names = declared_tasks
    rule = rule or default_rule(data)
    out: RuleOutput = TASK_RULES.get(rule)(data, np.random.default_rng([seed, 1501]), options)

    from mmrec.heads.base import task_labels
    have = list(out.labels)
    task_names, y = task_labels(out.labels, names if names is not None else len(have),
                                source=out.source)
    if names is not None:  # cascade order is the data's, whatever order the list gives
        order = sorted(range(len(task_names)), key=lambda k: have.index(task_names[k]))
        task_names = [task_names[k] for k in order]
        y = y[:, order]

    scenario_source = options.scenario or declared_scenario or "scenario"
    if scenario_source == "none":
        scen, scen_names = np.zeros(len(out.user), np.int64), ["all"]
    elif scenario_source == "scenario":
        if out.scenario is None:
            scen, scen_names = np.zeros(len(out.user), np.int64), ["all"]
            scenario_source = "none"
        else:
            scen = np.asarray(out.scenario, np.int64)
            n = int(scen.max()) + 1 if len(scen) else 1
            scen_names = list(data.scenarios) if data.scenarios else [str(i) for i in range(n)]
            if len(scen) and (scen.min() < 0 or scen.max() >= len(scen_names)):
                bad = int(scen.min() if scen.min() < 0 else scen.max())
                raise DataError(f"scenario id {bad} out of range [0, {len(scen_names)})",
                                file=out.source, field="scenario")
    else:
        scen, scen_names = _user_scenarios(data, scenario_source, out.user)
    return ExposureTable(user=np.asarray(out.user, np.int64), item=np.asarray(out.item, np.int64),
                         scenario=scen, labels=y.numpy().astype(np.float32), part=out.part.astype(np.int8),
                         tasks=task_names, scenarios=scen_names, rule=rule, scenario_source=scenario_source)


__all__ = ["TASK_RULES", "SCENARIO_BINS", "TaskOptions", "ExposureTable", "UserValueError", "derive_tasks",
           "default_rule", "user_column"]
