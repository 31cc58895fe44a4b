"""Ranking metrics (top-K lists vs ground truth) and binary metrics (joint-task heads).

Ranking metrics are torch-geometric's ``LinkPred*`` metrics, renamed to the names
of the metrics.json contract (``Recall@K``, ...). Their conventions, checked in
``tests/test_metrics.py``:

* NDCG@K divides by the ideal DCG over ``min(K, |relevant|)`` positions
  (``idcg[label_count.clamp(max=k)]``), not over K — a user with one relevant
  item ranked first scores 1.
* MAP@K divides the summed precisions by ``min(K, |relevant|)``.
* Precision@K divides by K even when fewer than K items were ranked.
* Averages run over users with at least one relevant item.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from sklearn import metrics as skm
from torch import Tensor
from torch_geometric.metrics import (
    LinkPredHitRatio,
    LinkPredMAP,
    LinkPredMetric,
    LinkPredMetricCollection,
    LinkPredNDCG,
    LinkPredPrecision,
    LinkPredRecall,
)

#: Ranking metric name (metrics.json contract) -> torch-geometric metric class.
RANKING_METRICS: dict[str, Callable[[int], LinkPredMetric]] = {
    "HR": LinkPredHitRatio,
    "Recall": LinkPredRecall,
    "NDCG": LinkPredNDCG,
    "Precision": LinkPredPrecision,
    "MAP": LinkPredMAP,
}

#: What the full-ranking protocol reports by default (DESIGN.md).
FULL_RANKING_METRICS = ("Recall", "NDCG", "Precision", "MAP")


class RankingMetrics:
    """Accumulates ranking metrics over batches of users, then averages them.

    >>> m = RankingMetrics(ks=(2,), names=("NDCG",))
    >>> m.update(torch.tensor([[0, 5]]), torch.tensor([[0, 0, 0], [0, 1, 2]]))
    >>> round(m.compute()["NDCG@2"], 4)   # DCG 1 / IDCG (1 + 1/log2 3)
    0.6131
    """

    def __init__(self, ks: Iterable[int] = (5, 10, 20, 50), names: Sequence[str] = FULL_RANKING_METRICS) -> None:
        self.ks = tuple(int(k) for k in ks)
        unknown = [n for n in names if n not in RANKING_METRICS]
        if unknown or not self.ks:
            raise ValueError(f"unknown ranking metric(s) {unknown}; known: {list(RANKING_METRICS)}"
                             if unknown else "at least one K is needed")
        self.names = tuple(names)
        self.collection = LinkPredMetricCollection(
            {f"{n}@{k}": RANKING_METRICS[n](k) for n in self.names for k in self.ks})
        self.n_users = 0

    @property
    def max_k(self) -> int:
        return max(self.ks)

    def update(self, pred_index: Tensor, label_index: Tensor) -> None:
        """Add a batch: ``pred_index`` [B, K] top-K items, best first (K may be less than
        ``max_k`` when fewer items exist); ``label_index`` [2, E] (row in the batch, item)
        pairs of relevant items, without duplicates. Rows without labels are not counted.
        """
        pred_index = pred_index.detach().to("cpu", torch.long)
        label_index = label_index.detach().to("cpu", torch.long)
        if label_index.dim() != 2 or label_index.size(0) != 2:
            raise ValueError(f"label_index must be [2, E], got {tuple(label_index.shape)}")
        self.collection.update(pred_index, label_index)
        self.n_users += int(torch.unique(label_index[0]).numel())

    def compute(self) -> dict[str, float]:
        out = self.collection.compute()
        return {name: float(out[name]) for name in self.collection.keys()}


def ranking_metrics(pred_index: Tensor, label_index: Tensor, ks: Iterable[int] = (5, 10, 20, 50),
                    names: Sequence[str] = FULL_RANKING_METRICS) -> dict[str, float]:
    """One-shot :class:`RankingMetrics` (see there for the argument shapes)."""
    m = RankingMetrics(ks, names)
    m.update(pred_index, label_index)
    return m.compute()


def metrics_from_ranks(ranks: Tensor | np.ndarray, ks: Iterable[int] = (10,)) -> dict[str, float]:
    """HR@K and NDCG@K when each query has exactly one relevant item at 0-based ``rank``.

    NDCG@K is then ``1 / log2(rank + 2)`` if ``rank < K`` else 0 (the ideal DCG is 1).
    """
    r = torch.as_tensor(np.asarray(ranks) if not isinstance(ranks, Tensor) else ranks).to(torch.float64)
    if r.numel() == 0:
        raise ValueError("no ranks to average")
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = float(hit.double().mean())
        out[f"NDCG@{k}"] = float(torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean())
    return out


# -- binary metrics (joint-task heads: CTR / CVR) ----------------------------------------

def _binary_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must be 0/1")
    return y.astype(np.int64)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (ties count one half); needs both classes."""
    y = _binary_labels(labels)
    if y.min(initial=1) == y.max(initial=0):
        raise ValueError("AUC needs both positive and negative labels")
    return float(skm.roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: per-user AUC averaged with weights = the user's number of impressions.

    Users whose impressions are all of one class are skipped (their AUC is undefined).
    Vectorised with mid-ranks inside each user's group (the Mann-Whitney form of AUC),
    so it equals a per-user ``roc_auc_score`` loop.
    """
    y = _binary_labels(labels)
    u = np.asarray(users, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if not (len(u) == len(y) == len(s)):
        raise ValueError("users, labels and scores must have the same length")
    order = np.lexsort((s, u))
    u, y, s = u[order], y[order], s[order]
    n = len(u)
    if n == 0:
        raise ValueError("GAUC of no impressions")
    user_start = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    group = np.repeat(np.arange(len(user_start)), np.diff(np.r_[user_start, n]))
    # tie blocks: equal (user, score) runs share their mid-rank (1-based within the user)
    tie_start = np.flatnonzero(np.r_[True, (u[1:] != u[:-1]) | (s[1:] != s[:-1])])
    tie_len = np.diff(np.r_[tie_start, n])
    tie_mid = tie_start + (tie_len - 1) / 2.0
    rank = np.repeat(tie_mid, tie_len) - user_start[group] + 1.0
    n_imp = np.bincount(group).astype(np.float64)
    n_pos = np.bincount(group, weights=y).astype(np.float64)
    n_neg = n_imp - n_pos
    pos_rank_sum = np.bincount(group, weights=rank * y)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        raise ValueError("GAUC needs at least one user with both positive and negative labels")
    user_auc = (pos_rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.sum(user_auc * n_imp[ok]) / np.sum(n_imp[ok]))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary cross-entropy of predicted probabilities (clipped away from 0 and 1 by sklearn)."""
    y = _binary_labels(labels)
    p = np.asarray(probs, dtype=np.float64)
    if ((p < 0) | (p > 1) | np.isnan(p)).any():
        raise ValueError("LogLoss needs probabilities in [0, 1]")
    return float(skm.log_loss(y, p, labels=[0, 1]))


def binary_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray | None = None) -> dict[str, float]:
    """``AUC``, ``LogLoss`` and, given the user of each impression, ``GAUC``."""
    out = {"AUC": auc(labels, probs), "LogLoss": log_loss(labels, probs)}
    if users is not None:
        out["GAUC"] = gauc(users, labels, probs)
    return out
