"""Splits: no held-out target pair in training, determinism, and each split's own rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmrec.datasets.schema import Dataset, Interactions
from mmrec.datasets.splits import apply_split, default_split_name
from mmrec.errors import ConfigError, DataError
from mmrec.registry import SPLITS

SPLIT_NAMES = ("loo", "random", "temporal", "cold")
BEHAVIORS = ["view", "cart", "buy"]


def make_data(n_users: int = 60, n_items: int = 50, n_rows: int = 4000, seed: int = 0,
              behaviors: list[str] | None = None, timestamps: bool = True) -> Dataset:
    """Random multi-behavior rows, with repeats of (user, item) pairs on purpose."""
    behaviors = behaviors or BEHAVIORS
    rng = np.random.default_rng(seed)
    rows = Interactions(rng.integers(0, n_users, n_rows), rng.integers(0, n_items, n_rows),
                        rng.integers(0, len(behaviors), n_rows),
                        timestamp=rng.permutation(n_rows) * 3 if timestamps else None)
    return Dataset("hand", behaviors, behaviors[-1], [f"u{i}" for i in range(n_users)],
                   [f"i{i}" for i in range(n_items)], rows)


def pairs(rows: Interactions, target: int) -> set[tuple[int, int]]:
    sel = rows.behavior == target
    return set(zip(rows.user[sel].tolist(), rows.item[sel].tolist()))


def assert_same(a: Interactions, b: Interactions) -> None:
    for col in ("user", "item", "behavior", "timestamp"):
        x, y = getattr(a, col), getattr(b, col)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


def test_registered_names():
    assert set(SPLIT_NAMES) | {"fixed"} <= set(SPLITS.names())


@pytest.mark.parametrize("name", SPLIT_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_heldout_pair_in_training_and_deterministic(name, seed):
    data = make_data(seed=seed)
    t = data.target_index
    a, b = apply_split(data, name, seed=seed), apply_split(data, name, seed=seed)
    train = pairs(a.train, t)
    held_valid, held_test = pairs(a.valid, t), pairs(a.test, t)
    assert held_test and held_valid
    assert not (train & held_valid) and not (train & held_test)
    assert not (held_valid & held_test)
    # only target rows are held out
    assert (a.valid.behavior == t).all() and (a.test.behavior == t).all()
    for part in ("train", "valid", "test"):
        assert_same(getattr(a, part), getattr(b, part))
    assert a.split == name and a.report["split"]["name"] == name and a.report["split"]["seed"] == seed
    sizes = a.report["split"]["sizes"]
    assert (sizes["train"], sizes["valid"], sizes["test"]) == (len(a.train), len(a.valid), len(a.test))
    # nothing is invented: every row comes from the original data
    orig = set(zip(data.train.user.tolist(), data.train.item.tolist(), data.train.behavior.tolist()))
    for part in (a.train, a.valid, a.test):
        assert set(zip(part.user.tolist(), part.item.tolist(), part.behavior.tolist())) <= orig


@pytest.mark.parametrize("name", ["random", "cold"])
def test_seed_changes_random_splits(name):
    data = make_data()
    a, b = apply_split(data, name, seed=0), apply_split(data, name, seed=1)
    t = data.target_index
    assert pairs(a.test, t) != pairs(b.test, t)


def test_non_target_rows_stay_in_training_for_loo_and_random():
    data = make_data()
    t = data.target_index
    for name in ("loo", "random"):
        s = apply_split(data, name)
        assert (s.train.behavior != t).sum() == (data.train.behavior != t).sum()


def test_loo_takes_latest_and_second_latest():
    # user 0: items 0..4 at times 50, 10, 40, 30, 20 -> test item 0, valid item 2
    # user 1: items 5, 6 only -> fewer than 3: all stays in training
    # user 2: times tie -> file order: the last two rows (items 9 then 8) win
    u = [0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    i = [0, 1, 2, 3, 4, 5, 6, 7, 9, 8, 7]
    ts = [50, 10, 40, 30, 20, 1, 2, 5, 5, 5, 3]
    rows = Interactions(u, i, np.zeros(len(u)), timestamp=ts)
    data = Dataset("loo", ["buy"], "buy", ["a", "b", "c"], [str(x) for x in range(10)], rows)
    s = apply_split(data, "loo")
    assert pairs(s.test, 0) == {(0, 0), (2, 8)}
    assert pairs(s.valid, 0) == {(0, 2), (2, 9)}
    assert pairs(s.train, 0) == {(0, 1), (0, 3), (0, 4), (1, 5), (1, 6), (2, 7)}
    # without timestamps the file order decides
    s2 = apply_split(data.replace(train=Interactions(u, i, np.zeros(len(u)))), "loo")
    assert pairs(s2.test, 0) == {(0, 4), (2, 7)}  # user 2: item 7 occurs last in the file
    assert pairs(s2.valid, 0) == {(0, 3), (2, 8)}


def test_loo_repeat_purchase_of_test_item_leaves_training():
    # item 1 bought at t=1 and t=9: the latest is the test pair, its t=1 copy must go too
    rows = Interactions([0, 0, 0, 0, 0], [1, 2, 3, 4, 1], [1, 1, 1, 0, 1], timestamp=[1, 2, 3, 4, 9])
    data = Dataset("rep", ["view", "buy"], "buy", ["a"], [str(x) for x in range(5)], rows)
    s = apply_split(data, "loo")
    assert pairs(s.test, 1) == {(0, 1)} and pairs(s.valid, 1) == {(0, 3)}
    assert pairs(s.train, 1) == {(0, 2)}
    assert pairs(s.train, 0) == {(0, 4)}  # the view stays
    assert s.report["split"]["removed_heldout_pairs_from_train"] == 3


def test_random_proportions_and_one_left_in_training():
    n_items = 100
    # 30 users with all 100 items bought once, 30 users with 2 items, 30 with 1
    u = np.r_[np.repeat(np.arange(30), n_items), np.repeat(np.arange(30, 60), 2), np.arange(60, 90)]
    i = np.r_[np.tile(np.arange(n_items), 30), np.tile([0, 1], 30), np.zeros(30, dtype=int)]
    data = Dataset("r", ["buy"], "buy", [str(x) for x in range(90)], [str(x) for x in range(n_items)],
                   Interactions(u, i, np.zeros(len(u))))
    s = apply_split(data, "random", seed=3)
    for part, expect in ((s.train, 80), (s.valid, 10), (s.test, 10)):
        counts = np.bincount(part.user, minlength=90)
        assert (counts[:30] == expect).all()
    train_counts = np.bincount(s.train.user, minlength=90)
    assert (train_counts[30:] == 1).all()  # 2 items: 1 test, 1 train; 1 item: kept
    assert (np.bincount(s.test.user, minlength=90)[30:60] == 1).all()
    custom = apply_split(data, "random", seed=3, ratios=(0.6, 0.2, 0.2))
    assert (np.bincount(custom.test.user, minlength=90)[:30] == 20).all()
    with pytest.raises(ConfigError):
        apply_split(data, "random", ratios=(0.5, 0.1, 0.1))
    with pytest.raises(ConfigError, match="no option"):
        apply_split(data, "random", share=0.3)


def test_temporal_time_order_and_future_leakage_dropped():
    data = make_data(seed=4)
    t = data.target_index
    s = apply_split(data, "temporal")
    t1, t2 = s.report["split"]["cut_times"]
    assert s.train.timestamp.max() < t1  # every behavior: nothing at/after the cut trains
    assert (s.valid.timestamp >= t1).all() and (s.valid.timestamp < t2).all()
    assert (s.test.timestamp >= t2).all()
    n_future_other = int(((data.train.timestamp >= t1) & (data.train.behavior != t)).sum())
    assert n_future_other > 0 and s.report["split"]["dropped_future_rows"] == n_future_other
    # the target rows before the cut are all kept unless their pair is held out
    held = pairs(s.valid, t) | pairs(s.test, t)
    early = data.train.select((data.train.timestamp < t1) & (data.train.behavior == t))
    kept = [(a, b) not in held for a, b in zip(early.user.tolist(), early.item.tolist())]
    assert (s.train.behavior == t).sum() == sum(kept)
    with pytest.raises(DataError, match="timestamp"):
        apply_split(make_data(timestamps=False), "temporal")


def test_cold_items_have_no_training_rows():
    data = make_data(n_items=80, seed=2)
    t = data.target_index
    s = apply_split(data, "cold", seed=5, share=0.25)
    test_cold, valid_cold = s.cold_items, np.asarray(s.report["cold_valid_items"])
    json.dumps(s.report)  # the report stays serialisable
    with_target = np.unique(data.train.item[data.train.behavior == t])
    assert len(test_cold) + len(valid_cold) == round(0.25 * len(with_target))
    assert not set(test_cold.tolist()) & set(valid_cold.tolist())
    cold = np.r_[test_cold, valid_cold]
    assert not np.isin(s.train.item, cold).any()  # every behavior
    # every target pair of a cold item is held out, in the right half
    src = data.train.select(data.train.behavior == t)
    for items, part in ((test_cold, s.test), (valid_cold, s.valid)):
        want = {(a, b) for a, b in zip(src.user.tolist(), src.item.tolist()) if b in set(items.tolist())}
        got = {(a, b) for a, b in pairs(part, t) if b in set(items.tolist())}
        assert want == got and want
    assert not np.isin(s.test.item, valid_cold).any() and not np.isin(s.valid.item, test_cold).any()
    # warm items are held out too (random split)
    assert (~np.isin(s.test.item, cold)).any() and (~np.isin(s.valid.item, cold)).any()
    assert s.report["split"]["dropped_cold_rows"] == int((np.isin(data.train.item, cold)
                                                          & (data.train.behavior != t)).sum())


def fixed_data(with_valid: bool) -> Dataset:
    data = make_data(seed=9)
    t = data.target_index
    # training copies of held-out pairs (a file may repeat them): they must leave training
    dups = Interactions([0, 1, 1], [1, 2, 6], [t] * 3, timestamp=[1, 2, 3])
    data = data.replace(train=Interactions.concat([data.train, dups]))
    test = Interactions([0, 1, 2, 3], [1, 2, 3, 4], [t] * 4)
    valid = Interactions([0, 1], [5, 6], [t] * 2) if with_valid else None
    return data.replace(test=test, valid=valid)


def test_fixed_keeps_files_and_removes_duplicates_from_training():
    data = fixed_data(with_valid=True)
    t = data.target_index
    assert default_split_name(data) == "fixed"
    s = apply_split(data)
    assert s.split == "fixed" and s.test is data.test and s.valid is data.valid
    held = pairs(data.test, t) | pairs(data.valid, t)
    assert not pairs(s.train, t) & held
    dup = int(np.isin(data.train.pair_keys(data.n_items)[data.train.behavior == t],
                      data.test.pair_keys(data.n_items).tolist() + data.valid.pair_keys(data.n_items).tolist()).sum())
    assert dup > 0 and s.report["split"]["removed_heldout_pairs_from_train"] == dup
    assert len(s.train) == len(data.train) - dup


def test_fixed_carves_validation_when_only_test_exists():
    data = fixed_data(with_valid=False)
    # add a user with a single target item: they keep it
    t = data.target_index
    extra = Interactions([59], [0], [t], timestamp=[1])
    base = data.train.select(data.train.user != 59)
    data = data.replace(train=Interactions.concat([base, extra]))
    a, b = apply_split(data, seed=2, valid_rule="random"), apply_split(data, seed=2, valid_rule="random")
    assert a.report["split"]["carved_valid"] and a.report["split"]["valid_rule"] == "random"
    assert_same(a.valid, b.valid)
    counts = np.bincount(a.valid.user, minlength=data.n_users)
    n_target = np.array([len({i for u, i in pairs(data.train, t) if u == x}) for x in range(data.n_users)])
    assert ((counts == 1) == (n_target >= 2)).all() and counts.max() == 1
    assert (59, 0) in pairs(a.train, t)
    assert not pairs(a.train, t) & (pairs(a.valid, t) | pairs(a.test, t))
    c = apply_split(data, seed=3, valid_rule="random")
    assert pairs(a.valid, t) != pairs(c.valid, t)
    with pytest.raises(DataError, match="test"):
        apply_split(make_data(), "fixed")


def test_fixed_carves_the_latest_buy_where_rows_have_times():
    data = fixed_data(with_valid=False)
    t = data.target_index
    a = apply_split(data, seed=2)  # auto: the fixture has timestamps
    assert a.report["split"]["valid_rule"] == "latest"
    assert_same(a.valid, apply_split(data, seed=5).valid)  # no randomness left
    tr = data.train
    for u, i in zip(a.valid.user, a.valid.item):
        mine = (tr.user == u) & (tr.behavior == t)
        latest = tr.item[mine][np.argmax(tr.timestamp[mine])]
        assert i == latest
    untimed = data.replace(train=Interactions(tr.user, tr.item, tr.behavior))
    assert apply_split(untimed, seed=2).report["split"]["valid_rule"] == "random"
    with pytest.raises(DataError, match="timestamps"):
        apply_split(untimed, valid_rule="latest")
    with pytest.raises(ConfigError, match="valid_rule"):
        apply_split(data, valid_rule="newest")


def test_default_names():
    assert default_split_name(make_data()) == "loo"
    single = make_data(behaviors=["click"])
    assert default_split_name(single) == "random"
    assert apply_split(single).split == "random"


def test_resplitting_is_well_defined():
    data = make_data()
    once = apply_split(data, "random", seed=0)
    twice = apply_split(once, "loo", seed=0)
    direct = apply_split(data, "loo", seed=0)
    t = data.target_index
    assert pairs(twice.test, t) == pairs(direct.test, t)


def test_synthetic_world_splits():
    synthetic = pytest.importorskip("mmrec.datasets.synthetic")
    world = synthetic.make_world("tiny")
    t = world.target_index
    for name in ("loo", "random", "cold"):
        s = apply_split(world.replace(valid=None, test=None), name, seed=0)
        assert not pairs(s.train, t) & (pairs(s.valid, t) | pairs(s.test, t))
