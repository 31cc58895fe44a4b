"""Ranking metrics (torch-geometric conventions checked by hand) and binary metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mmrec.eval.metrics import (RankingMetrics, auc, binary_metrics, gauc, log_loss, metrics_from_ranks,
                                ranking_metrics)

LOG2_3 = math.log2(3)


def labels(rows: list[list[int]]) -> torch.Tensor:
    """Per-row relevant items -> label_index [2, E]."""
    pairs = [(r, i) for r, items in enumerate(rows) for i in items]
    return torch.tensor(pairs, dtype=torch.long).t()


def test_ndcg_idcg_uses_min_k_and_relevant():
    # 3 relevant items, K=2; top-2 = [relevant, irrelevant]: DCG = 1, IDCG = 1 + 1/log2(3)
    pred = torch.tensor([[10, 99, 11]])
    out = ranking_metrics(pred, labels([[10, 11, 12]]), ks=(2,), names=("NDCG", "Recall", "Precision", "MAP", "HR"))
    assert out["NDCG@2"] == pytest.approx(1 / (1 + 1 / LOG2_3), rel=1e-6)
    assert out["Recall@2"] == pytest.approx(1 / 3)
    assert out["Precision@2"] == pytest.approx(1 / 2)
    assert out["MAP@2"] == pytest.approx(1 / 2)  # precision@1 = 1 summed, / min(2, 3)
    assert out["HR@2"] == 1.0
    # one relevant item at rank 1 of K=10: IDCG over min(10, 1) = 1, so NDCG = 1 (not 1 / sum_10)
    out = ranking_metrics(torch.tensor([[4, 1, 2, 3, 5, 6, 7, 8, 9, 0]]), labels([[4]]), ks=(10,))
    assert out["NDCG@10"] == pytest.approx(1.0)
    assert out["Recall@10"] == 1.0 and out["Precision@10"] == pytest.approx(0.1)


def test_hand_computed_two_users_several_k():
    # user 0 relevant {1, 3}; ranking [3, 0, 1, 2]; user 1 relevant {2}; ranking [0, 1, 2, 3]
    pred = torch.tensor([[3, 0, 1, 2], [0, 1, 2, 3]])
    out = ranking_metrics(pred, labels([[1, 3], [2]]), ks=(1, 3), names=("Recall", "NDCG", "Precision", "MAP", "HR"))
    ndcg3_u0 = (1 + 1 / math.log2(4)) / (1 + 1 / LOG2_3)
    ndcg3_u1 = (1 / math.log2(4)) / 1.0
    expect = {
        "Recall@1": (1 / 2 + 0) / 2, "Recall@3": (1 + 1) / 2,
        "NDCG@1": (1 + 0) / 2, "NDCG@3": (ndcg3_u0 + ndcg3_u1) / 2,
        "Precision@1": (1 + 0) / 2, "Precision@3": (2 / 3 + 1 / 3) / 2,
        "MAP@1": (1 + 0) / 2, "MAP@3": ((1 + 2 / 3) / 2 + (1 / 3) / 1) / 2,
        "HR@1": 0.5, "HR@3": 1.0,
    }
    assert out.keys() == expect.keys()
    for k, v in expect.items():
        assert out[k] == pytest.approx(v, rel=1e-6), k


def test_accumulates_over_batches_and_skips_users_without_labels():
    pred = torch.tensor([[3, 0, 1, 2], [0, 1, 2, 3], [2, 1, 0, 3]])
    rows = [[1, 3], [2], []]
    whole = ranking_metrics(pred, labels(rows), ks=(1, 3))  # row 2 has no label: not averaged
    m = RankingMetrics(ks=(1, 3))
    m.update(pred[:1], labels(rows[:1]))
    m.update(pred[1:], labels(rows[1:]))
    parts = m.compute()
    assert m.n_users == 2
    for k in whole:
        assert parts[k] == pytest.approx(whole[k], rel=1e-6)
    assert whole["Recall@3"] == pytest.approx(1.0)


def test_fewer_ranked_items_than_k():
    # only 3 candidates but K=5: precision still divides by K, recall/NDCG are complete
    out = ranking_metrics(torch.tensor([[2, 0, 1]]), labels([[0, 1]]), ks=(5,), names=("Recall", "NDCG", "Precision"))
    assert out["Recall@5"] == 1.0
    assert out["Precision@5"] == pytest.approx(2 / 5)
    assert out["NDCG@5"] == pytest.approx((1 / LOG2_3 + 1 / 2) / (1 + 1 / LOG2_3), rel=1e-6)


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="unknown"):
        RankingMetrics(ks=(5,), names=("F1",))


def test_metrics_from_ranks_matches_ranking_metrics():
    ranks = np.array([0, 3, 9, 10, 50])
    out = metrics_from_ranks(ranks, ks=(1, 10))
    assert out["HR@10"] == pytest.approx(3 / 5) and out["HR@1"] == pytest.approx(1 / 5)
    assert out["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(11)) / 5)
    # the same as torch-geometric with one relevant item placed at each rank
    n = 100
    pred = torch.stack([torch.roll(torch.arange(n), int(r)) for r in ranks])  # item 0 sits at rank r
    pyg = ranking_metrics(pred, labels([[0]] * len(ranks)), ks=(1, 10), names=("HR", "NDCG"))
    for k in out:
        assert out[k] == pytest.approx(pyg[k], rel=1e-6)


def test_auc_and_log_loss():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    assert auc(y, p) == pytest.approx(5 / 6)
    expect = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert log_loss(y, p) == pytest.approx(expect)
    with pytest.raises(ValueError, match="both"):
        auc(np.ones(3), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="probabilities"):
        log_loss(y, p * 2)


def test_gauc_matches_per_user_loop_with_ties():
    rng = np.random.default_rng(0)
    n = 3000
    users = rng.integers(0, 80, n)
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(rng.random(n) + 0.3 * y, 1)  # rounded: many ties inside users
    num = den = 0.0
    for u in np.unique(users):
        sel = users == u
        if 0 < y[sel].sum() < sel.sum():
            num += roc_auc_score(y[sel], s[sel]) * sel.sum()
            den += sel.sum()
    assert gauc(users, y, s) == pytest.approx(num / den, rel=1e-12)
    # users with one class only are skipped, not counted as 0 or 1
    users2 = np.r_[users, np.full(50, 999)]
    assert gauc(users2, np.r_[y, np.ones(50, int)], np.r_[s, rng.random(50)]) == pytest.approx(num / den)
    out = binary_metrics(y, np.clip(s, 0, 1), users)
    assert set(out) == {"AUC", "GAUC", "LogLoss"}
