"""Full and sampled ranking protocols on tiny hand-made datasets with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmrec.datasets.schema import Dataset, Interactions
from mmrec.errors import ConfigError
from mmrec.eval.protocols import (evaluate, evaluate_full, evaluate_sampled, sample_eval_negatives,
                                  sampled_candidates)

N_USERS, N_ITEMS = 1000, 200


def make_data(n_users: int = N_USERS, n_items: int = N_ITEMS, seed: int = 0) -> Dataset:
    """Per user 10 distinct buys: 6 train, 2 valid, 2 test; plus views that may overlap anything."""
    rng = np.random.default_rng(seed)
    items = np.argsort(rng.random((n_users, n_items)), axis=1)[:, :10]
    users = np.repeat(np.arange(n_users), 10).reshape(n_users, 10)

    def part(cols: slice) -> Interactions:
        u, i = users[:, cols].ravel(), items[:, cols].ravel()
        return Interactions(u, i, np.ones(len(u)))

    views = Interactions(rng.integers(0, n_users, 3 * n_users), rng.integers(0, n_items, 3 * n_users),
                         np.zeros(3 * n_users))
    return Dataset("hand", ["view", "buy"], "buy", [f"u{x}" for x in range(n_users)],
                   [f"i{x}" for x in range(n_items)], Interactions.concat([part(slice(0, 6)), views]),
                   valid=part(slice(6, 8)), test=part(slice(8, 10)))


class MatrixScorer:
    """Scores from a fixed dense matrix; counts prepare_eval calls."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores
        self.prepared = 0

    def prepare_eval(self) -> None:
        self.prepared += 1

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.scores[users]

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.scores[users[:, None], items]


def indicator(data: Dataset, split: str) -> torch.Tensor:
    m = torch.zeros(data.n_users, data.n_items)
    rows = data.split_rows(split)
    sel = rows.behavior == data.target_index
    m[torch.from_numpy(rows.user[sel]), torch.from_numpy(rows.item[sel])] = 1.0
    return m


@pytest.fixture(scope="module")
def data() -> Dataset:
    return make_data()


def test_oracle_is_perfect(data):
    oracle = MatrixScorer(indicator(data, "test"))
    full = evaluate_full(oracle, data, ks=(5, 10, 20, 50))
    assert oracle.prepared == 1
    for k in (5, 10, 20, 50):
        assert full[f"Recall@{k}"] == pytest.approx(1.0)
        assert full[f"NDCG@{k}"] == pytest.approx(1.0)
        assert full[f"MAP@{k}"] == pytest.approx(1.0)
        assert full[f"Precision@{k}"] == pytest.approx(2 / k)
    assert full.n_users == N_USERS and full.n_pairs == 2 * N_USERS
    sampled = evaluate_sampled(oracle, data, ks=(1, 10))
    whole = {k: v for k, v in sampled.items() if "/" not in k}  # repeat/ and discovery/ parts beside it
    assert whole == pytest.approx({"HR@1": 1.0, "NDCG@1": 1.0, "HR@10": 1.0, "NDCG@10": 1.0})
    assert all(v == pytest.approx(1.0) for k, v in sampled.items() if k.endswith("HR@10"))
    assert sampled.n_pairs == 2 * N_USERS and sampled.n_skipped == 0
    valid = evaluate_full(MatrixScorer(indicator(data, "valid")), data, split="valid", ks=(5,))
    assert valid["Recall@5"] == pytest.approx(1.0)


def test_masking_known_positives(data):
    # training positives on top, then valid ones, then the test items: masking must remove the first two
    scores = 10 * indicator(data, "train") + 5 * indicator(data, "valid") + indicator(data, "test")
    scorer = MatrixScorer(scores)
    masked = evaluate_full(scorer, data, ks=(2, 5))
    assert masked["Recall@2"] == pytest.approx(1.0) and masked["NDCG@2"] == pytest.approx(1.0)
    # masking train only: the 2 valid items take the first places
    train_only = evaluate_full(scorer, data, ks=(2, 5), mask_splits=("train",))
    assert train_only["Recall@2"] == 0.0 and train_only["Recall@5"] == pytest.approx(1.0)
    assert train_only["NDCG@5"] < 1.0
    unmasked = evaluate_full(scorer, data, ks=(5,), mask_splits=())
    assert unmasked["Recall@5"] == 0.0
    # evaluating valid masks train only by default (test is unknown at that point)
    v = evaluate_full(MatrixScorer(10 * indicator(data, "train") + indicator(data, "valid")), data,
                      split="valid", ks=(2,))
    assert v["NDCG@2"] == pytest.approx(1.0)


def test_adversarial_scorer_scores_zero(data):
    adv = MatrixScorer(-indicator(data, "test"))
    full = evaluate_full(adv, data, ks=(5, 50))
    assert all(v == 0.0 for v in full.values())
    sampled = evaluate_sampled(adv, data, ks=(10,))
    assert sampled["HR@10"] == 0.0 and sampled["NDCG@10"] == 0.0


def test_constant_scorer_gets_no_lucky_ties(data):
    out = evaluate_sampled(MatrixScorer(torch.zeros(data.n_users, data.n_items)), data, ks=(10, 99))
    assert out["HR@10"] == 0.0 and out["HR@99"] == 0.0


def test_random_scorer_hr10_near_one_tenth(data):
    g = torch.Generator().manual_seed(0)
    out = evaluate_sampled(MatrixScorer(torch.rand(data.n_users, data.n_items, generator=g)), data, ks=(10,))
    assert out["HR@10"] == pytest.approx(0.1, abs=0.035)  # 2000 pairs: sd ~ 0.007
    expected_ndcg = sum(1 / math.log2(r + 2) for r in range(10)) / 100
    assert out["NDCG@10"] == pytest.approx(expected_ndcg, abs=0.02)


def reference_full(scores: torch.Tensor, data: Dataset, split: str, ks, items=None, mask_splits=("train", "valid")):
    """Per-user Python loop over the definitions (slow on purpose: it is the reference)."""
    cols = np.arange(data.n_items) if items is None else np.asarray(items)
    truth = {}
    rows = data.split_rows(split)
    for u, i in zip(rows.user.tolist(), rows.item.tolist()):
        if i in set(cols.tolist()):
            truth.setdefault(u, set()).add(i)
    masked = {}
    for s in mask_splits:
        r = data.split_rows(s)
        for u, i, b in zip(r.user.tolist(), r.item.tolist(), r.behavior.tolist()):
            if b == data.target_index:
                masked.setdefault(u, set()).add(i)
    out = {f"{m}@{k}": [] for m in ("Recall", "NDCG", "Precision", "MAP") for k in ks}
    for u, rel in truth.items():
        s = scores[u, cols].clone()
        for j, i in enumerate(cols.tolist()):
            if i in masked.get(u, set()) and i not in rel:
                s[j] = -math.inf
        ranked = cols[torch.argsort(s, descending=True, stable=True).numpy()]
        for k in ks:
            hits = [1.0 if i in rel else 0.0 for i in ranked[:k]]
            out[f"Recall@{k}"].append(sum(hits) / len(rel))
            out[f"Precision@{k}"].append(sum(hits) / k)
            dcg = sum(h / math.log2(p + 2) for p, h in enumerate(hits))
            idcg = sum(1 / math.log2(p + 2) for p in range(min(k, len(rel))))
            out[f"NDCG@{k}"].append(dcg / idcg)
            ap = sum(h * sum(hits[:p + 1]) / (p + 1) for p, h in enumerate(hits))
            out[f"MAP@{k}"].append(ap / min(k, len(rel)))
    return {name: float(np.mean(v)) for name, v in out.items()}


def test_full_matches_reference_with_batches_and_subset():
    data = make_data(n_users=60, n_items=40, seed=3)
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(data.n_users, data.n_items, generator=g) + 0.5 * indicator(data, "test")
    scorer = MatrixScorer(scores)
    ks = (1, 3, 5, 20)
    want = reference_full(scores, data, "test", ks)
    for bs in (7, 1024):
        got = evaluate_full(scorer, data, ks=ks, batch_size=bs)
        for name, v in want.items():
            assert got[name] == pytest.approx(v, rel=1e-5), (bs, name)
    # subset ranking: only 15 items ranked (fewer than K=20), users without a held-out one skipped
    subset = np.arange(25, 40)
    want = reference_full(scores, data, "test", ks, items=subset)
    got = evaluate_full(scorer, data, ks=ks, items=torch.from_numpy(subset), batch_size=5)
    for name, v in want.items():
        assert got[name] == pytest.approx(v, rel=1e-5), name
    n_users = len({u for u, i in zip(data.test.user.tolist(), data.test.item.tolist()) if i >= 25})
    assert got.n_users == n_users < data.n_users
    # an oracle restricted to the subset is perfect there
    assert evaluate_full(MatrixScorer(indicator(data, "test")), data, ks=(20,), items=subset)["Recall@20"] == 1.0


def test_hand_computed_ndcg_min_k_relevant():
    # one user, 3 test items {0, 1, 2}; the scorer ranks 0 first, then an irrelevant item 5
    data = Dataset("one", ["buy"], "buy", ["u"], [str(i) for i in range(6)],
                   Interactions([0], [4], [0]), test=Interactions([0, 0, 0], [0, 1, 2], [0, 0, 0]))
    scorer = MatrixScorer(torch.tensor([[6.0, 3.0, 2.0, 0.0, 9.0, 5.0]]))  # item 4 is a train item: masked
    out = evaluate_full(scorer, data, ks=(2, 4))
    assert out["NDCG@2"] == pytest.approx(1 / (1 + 1 / math.log2(3)), rel=1e-6)
    assert out["Recall@2"] == pytest.approx(1 / 3)
    # K=4: ranks 0 (item 0), 2 (item 1), 3 (item 2) -> DCG over min(4, 3) = 3 ideal places
    dcg = 1 + 1 / math.log2(4) + 1 / math.log2(5)
    assert out["NDCG@4"] == pytest.approx(dcg / (1 + 1 / math.log2(3) + 1 / math.log2(4)), rel=1e-6)


def test_sampled_negatives_are_seeded_distinct_and_never_positive(data):
    def collect(seed):
        chunks = list(sampled_candidates(data, "test", n_neg=99, seed=seed))
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    u1, c1 = collect(5)
    u2, c2 = collect(5)
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(c1, c2)
    assert not np.array_equal(c1, collect(6)[1])
    assert c1.shape == (2 * N_USERS, 100)
    known = {}
    for split in ("train", "valid", "test"):
        r = data.split_rows(split)
        for u, i, b in zip(r.user.tolist(), r.item.tolist(), r.behavior.tolist()):
            if b == data.target_index:
                known.setdefault(u, set()).add(i)
    test_pairs = set(zip(data.test.user.tolist(), data.test.item.tolist()))
    for u, row in zip(u1.tolist(), c1.tolist()):
        assert (u, row[0]) in test_pairs
        negs = row[1:]
        assert len(set(negs)) == 99  # without replacement
        assert not set(negs) & known[u]
    # a view of an item does not stop it being a negative: views are not target positives
    assert (c1 >= 0).all() and (c1 < N_ITEMS).all()


def test_sampled_is_batch_size_invariant(data):
    g = torch.Generator().manual_seed(2)
    scorer = MatrixScorer(torch.rand(data.n_users, data.n_items, generator=g))
    a = evaluate_sampled(scorer, data, ks=(5, 10), batch_size=37, seed=3)
    b = evaluate(scorer, data, protocol="sampled", ks=(5, 10), seed=3)
    assert a == b


def test_negatives_for_users_with_few_allowed_items():
    n_items = 120
    keys = np.r_[np.arange(110), n_items + np.arange(n_items)]  # user 0: 10 allowed items; user 1: none
    rng = np.random.default_rng(0)
    neg = sample_eval_negatives(keys, np.array([0, 1, 2]), n_items, rng, n_neg=99)
    assert set(neg[0].tolist()) == set(range(110, 120))  # all 10, cycled
    assert (neg[1] == -1).all()
    assert len(set(neg[2].tolist())) == 99
    # a user who has every item cannot be evaluated: counted as skipped
    data = Dataset("full", ["buy"], "buy", ["a", "b"], [str(i) for i in range(n_items)],
                   Interactions(np.r_[np.zeros(n_items - 1, int), [1]], np.r_[np.arange(n_items - 1), [0]],
                                np.zeros(n_items)),
                   test=Interactions([0, 1], [n_items - 1, 5], [0, 0]))
    out = evaluate_sampled(MatrixScorer(torch.rand(2, n_items)), data)
    assert out.n_skipped == 1 and out.n_pairs == 1


class ModuleScorer(torch.nn.Module):
    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scores", scores)
        self.modes: list[bool] = []

    def prepare_eval(self) -> None:
        self.modes.append(self.training)

    def score_all(self, users):
        assert not torch.is_grad_enabled()
        return self.scores[users]

    def score(self, users, items):
        return self.scores[users[:, None], items]


def test_module_scorer_in_eval_mode_and_restored(data):
    m = ModuleScorer(indicator(data, "test"))
    m.train()
    evaluate(m, data, protocol="full", ks=(5,))
    assert m.modes == [False] and m.training


def test_bad_inputs(data):
    with pytest.raises(ConfigError, match="unknown evaluation protocol"):
        evaluate(MatrixScorer(indicator(data, "test")), data, protocol="nope")
    nan = indicator(data, "test")
    nan[0] = float("nan")  # NaN on masked items is overwritten; elsewhere it must be caught
    with pytest.raises(ValueError, match="NaN"):
        evaluate_full(MatrixScorer(nan), data, ks=(5,))
    with pytest.raises(ValueError, match="shape"):
        evaluate_full(MatrixScorer(indicator(data, "test")[:, :10]), data, ks=(5,))


class ViewScorer(MatrixScorer):
    """Returns a view of its own storage (users arrive in contiguous batches here)."""

    def score_all(self, users):
        lo = int(users[0])
        assert torch.equal(users, torch.arange(lo, lo + len(users)))
        return self.scores[lo:lo + len(users)]


def test_scorer_storage_is_not_overwritten_by_masking(data):
    scores = 10 * indicator(data, "train") + indicator(data, "test")
    scorer = ViewScorer(scores.clone())
    out = evaluate_full(scorer, data, ks=(2,), batch_size=100)
    assert out["Recall@2"] == pytest.approx(1.0)
    assert torch.equal(scorer.scores, scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scorer_matches_cpu(data):
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(data.n_users, data.n_items, generator=g)

    class CudaScorer(MatrixScorer):
        device = torch.device("cuda")

    gpu = CudaScorer(scores.cuda())
    cpu = MatrixScorer(scores)
    subset = torch.arange(100, 200)
    for kw in ({}, {"items": subset}):
        a, b = evaluate_full(gpu, data, ks=(5, 20), **kw), evaluate_full(cpu, data, ks=(5, 20), **kw)
        assert a == pytest.approx(b)
    assert evaluate_sampled(gpu, data, seed=1) == pytest.approx(evaluate_sampled(cpu, data, seed=1))
