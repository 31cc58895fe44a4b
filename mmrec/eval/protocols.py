"""Evaluation protocols: full ranking (MMRec) and sampled ranking (CIGF, MB-GMN).

Eval knows protocols, not models: a *scorer* is any object with

* ``prepare_eval()`` — called once, under ``torch.no_grad``, before scoring;
* ``score_all(users: LongTensor[B]) -> FloatTensor[B, n_items]``;
* ``score(users: LongTensor[B], items: LongTensor[B, k]) -> FloatTensor[B, k]``;
* optionally ``device`` (users are sent there) and ``eval()``/``train()`` (an
  ``nn.Module`` is put in eval mode while scored and restored afterwards).

``score_all`` should return a fresh tensor: full ranking writes -inf over masked
items in place (a returned view of the scorer's storage is copied first; a cached
tensor returned as is would be overwritten).

Ground truth is always the target behavior's rows of the evaluated split.
Both protocols batch users (or pairs), so memory stays bounded by
``batch_size x n_items`` scores whatever the number of users.

On multi-behavior data both protocols also report every metric on two parts of the
held-out pairs (:data:`HISTORY_PARTS`): ``repeat/<metric>`` over pairs whose item the
user already had in training under *any* behavior (what the ``behavior-prior`` rule
memorises), ``discovery/<metric>`` over the others (where only generalisation helps);
:attr:`EvalResult.parts` holds each part's counts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from mmrec.datasets.sampling import is_positive, positive_keys
from mmrec.datasets.schema import Dataset
from mmrec.errors import DataError
from mmrec.eval.metrics import FULL_RANKING_METRICS, RankingMetrics, metrics_from_ranks
from mmrec.registry import Registry

__all__ = ["EvalResult", "HISTORY_PARTS", "PROTOCOLS", "history_parts", "evaluate", "evaluate_full", "evaluate_sampled",
           "sample_eval_negatives", "sampled_candidates"]

PROTOCOLS: Registry = Registry("evaluation protocol")

#: Pairs whose negatives are drawn together (fixed, so negatives do not depend on batch_size).
NEG_CHUNK = 4096


class EvalResult(dict):
    """Metric name -> value (a plain dict for metrics.json), plus what was evaluated.

    ``n_users``: users with at least one held-out target item; ``n_pairs``: held-out
    (user, item) pairs; ``n_skipped``: pairs that could not be evaluated (sampled
    protocol: a user who had every item under the target behavior has no negative).
    """

    def __init__(self, metrics: dict[str, float], *, protocol: str, split: str,
                 n_users: int, n_pairs: int, n_skipped: int = 0,
                 parts: dict[str, dict[str, int]] | None = None) -> None:
        super().__init__(metrics)
        self.protocol, self.split = protocol, split
        self.n_users, self.n_pairs, self.n_skipped = n_users, n_pairs, n_skipped
        #: part name -> {"n_users", "n_pairs"} of the ``repeat`` / ``discovery`` parts (multi-behavior data)
        self.parts = parts or {}

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self)

    def counts(self) -> dict[str, int]:
        return {"n_users": self.n_users, "n_pairs": self.n_pairs, "n_skipped": self.n_skipped}


# -- shared helpers ---------------------------------------------------------------------

#: The parts of a multi-behavior test set: the item was in the user's training rows (any behavior) or not.
HISTORY_PARTS = ("repeat", "discovery")


def history_parts(data: Dataset, keys: np.ndarray) -> dict[str, np.ndarray] | None:
    """Boolean masks over held-out ``user * n_items + item`` keys: ``repeat`` where the user
    had the item in *training* under any behavior, ``discovery`` elsewhere.

    ``None`` on single-behavior data (DESIGN.md reports the parts on multi-behavior data).
    Built from the train split only, so a held-out row never decides its own part.
    """
    if data.n_behaviors < 2:
        return None
    history = positive_keys(data.merged_matrix("train"))
    repeat = is_positive(history, keys // data.n_items, keys % data.n_items, data.n_items)
    return {"repeat": repeat, "discovery": ~repeat}


def _prefixed(part: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{part}/{name}": value for name, value in metrics.items()}

def _target_keys(data: Dataset, split: str) -> np.ndarray:
    """Sorted distinct ``user * n_items + item`` keys of the target rows of a split."""
    rows = data.split_rows(split)
    sel = rows.behavior == data.target_index
    return np.unique(rows.user[sel] * np.int64(data.n_items) + rows.item[sel])


@contextlib.contextmanager
def _scoring(scorer: Any) -> Iterator[torch.device]:
    """no_grad + eval mode (restored after) + ``prepare_eval()`` once; yields the device."""
    module = scorer if isinstance(scorer, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    try:
        with torch.no_grad():
            if module is not None:
                module.eval()
            scorer.prepare_eval()
            yield torch.device(getattr(scorer, "device", None) or "cpu")
    finally:
        if module is not None:
            module.train(was_training)


def _check_scores(scores: Tensor, shape: tuple[int, int], what: str) -> Tensor:
    if tuple(scores.shape) != shape:
        raise ValueError(f"scorer.{what} returned shape {tuple(scores.shape)}, expected {shape}")
    if torch.isnan(scores).any():
        raise ValueError(f"scorer.{what} returned NaN scores")
    return scores


# -- full ranking ------------------------------------------------------------------------

@PROTOCOLS.register("full")
def evaluate_full(scorer: Any, data: Dataset, split: str = "test", ks: Sequence[int] = (5, 10, 20, 50),
                  batch_size: int = 1024, items: Tensor | np.ndarray | None = None,
                  mask_splits: Sequence[str] | None = None,
                  metrics: Sequence[str] = FULL_RANKING_METRICS) -> EvalResult:
    """Rank every item for each user with held-out target items in ``split``.

    ``mask_splits``: splits whose target positives of the user are set to -inf before
    ranking, so known items do not count as misses. Default ``None`` means the
    standard practice: ``("train",)`` when evaluating valid, ``("train", "valid")``
    when evaluating test (valid items are known by then). A pair that is itself
    ground truth of ``split`` is never masked.

    ``items``: rank only this subset of item ids (e.g. the cold-start block: each
    user's held-out cold items among all cold items); ground truth is restricted to
    the subset and users without a held-out item in it are skipped.

    Returns ``Recall``, ``NDCG``, ``Precision``, ``MAP`` @ each K (``metrics=`` may add
    ``HR``), averaged over evaluated users; NDCG's ideal DCG is over min(K, |relevant|).
    """
    n_items = data.n_items
    gt = _target_keys(data, split)
    if mask_splits is None:
        mask_splits = ("train", "valid") if split == "test" and data.valid is not None else ("train",)
    masked = [_target_keys(data, s) for s in mask_splits if s != split]
    mask = np.unique(np.concatenate(masked)) if masked else np.zeros(0, dtype=np.int64)
    mask = mask[~np.isin(mask, gt, assume_unique=True)]

    columns = None  # position of each item among the ranked columns (-1: not ranked)
    n_cols = n_items
    if items is not None:
        subset = torch.as_tensor(items).cpu().numpy().astype(np.int64).ravel()
        if len(np.unique(subset)) != len(subset):
            raise ValueError("items= holds duplicate ids")
        if len(subset) and (subset.min() < 0 or subset.max() >= n_items):
            raise ValueError(f"items= holds ids outside [0, {n_items})")
        columns = np.full(n_items, -1, dtype=np.int64)
        columns[subset] = np.arange(len(subset))
        n_cols = len(subset)
        gt = gt[columns[gt % n_items] >= 0]
        mask = mask[columns[mask % n_items] >= 0]
        subset_t = torch.from_numpy(subset)

    parts = history_parts(data, gt)
    gt_user, gt_col = gt // n_items, gt % n_items
    mask_user, mask_col = mask // n_items, mask % n_items
    if columns is not None:
        gt_col, mask_col = columns[gt_col], columns[mask_col]
    mask_csr = sp.csr_matrix((np.ones(len(mask), dtype=np.bool_), (mask_user, mask_col)),
                             shape=(data.n_users, max(n_cols, 1)))
    users = np.unique(gt_user)
    acc = RankingMetrics(ks, metrics)
    part_acc = {p: RankingMetrics(ks, metrics) for p, sel in (parts or {}).items() if sel.any()}
    if len(users) == 0 or n_cols == 0:
        raise DataError(f"dataset '{data.name}' has no held-out '{data.target}' items in {split}"
                        + (" among the given items" if items is not None else ""))
    k = min(acc.max_k, n_cols)
    with _scoring(scorer) as device:
        if columns is not None:
            subset_t = subset_t.to(device)
        for start in range(0, len(users), batch_size):
            bu = users[start:start + batch_size]
            scores = scorer.score_all(torch.from_numpy(bu).to(device))
            if tuple(scores.shape) != (len(bu), n_items):
                raise ValueError(f"scorer.score_all returned shape {tuple(scores.shape)}, "
                                 f"expected {(len(bu), n_items)}")
            sub = mask_csr[bu]
            if columns is not None:
                scores = scores.index_select(1, subset_t)
            elif sub.nnz and (scores._base is not None or scores.requires_grad):
                scores = scores.clone()  # a view of the scorer's own storage: never write into it
            if sub.nnz:
                rows = np.repeat(np.arange(len(bu)), np.diff(sub.indptr))
                scores[torch.from_numpy(rows).to(device),
                       torch.from_numpy(sub.indices.astype(np.int64)).to(device)] = float("-inf")
            top_values, top = torch.topk(scores, k, dim=1)
            if torch.isnan(top_values).any():  # topk ranks NaN above every number
                raise ValueError("scorer.score_all returned NaN scores")
            lo = np.searchsorted(gt_user, bu[0], side="left")
            hi = np.searchsorted(gt_user, bu[-1], side="right")
            label_rows = np.searchsorted(bu, gt_user[lo:hi])
            labels = np.vstack([label_rows, gt_col[lo:hi]])
            acc.update(top, torch.from_numpy(labels))
            for p, part in part_acc.items():
                sel = parts[p][lo:hi]
                if sel.any():
                    part.update(top, torch.from_numpy(labels[:, sel]))
    values = acc.compute()
    for p, part in part_acc.items():
        values.update(_prefixed(p, part.compute()))
    counts = {p: {"n_users": int(len(np.unique(gt_user[sel]))), "n_pairs": int(sel.sum())}
              for p, sel in (parts or {}).items()}
    return EvalResult(values, protocol="full", split=split,
                      n_users=int(len(users)), n_pairs=int(len(gt)), parts=counts)


# -- sampled ranking ---------------------------------------------------------------------

def sample_eval_negatives(keys: np.ndarray, users: np.ndarray, n_items: int, rng: np.random.Generator,
                          n_neg: int = 99, rounds: int = 4) -> np.ndarray:
    """``n_neg`` distinct items per row, uniform among those not in ``keys`` for its user.

    ``keys``: sorted ``user * n_items + item`` positives. Vectorised rejection
    sampling: each round draws a block of candidates per pending row, rejects
    positives and repeats, and keeps the first ``n_neg`` survivors (in draw order, so
    a uniform sample without replacement); rows still short after ``rounds`` (users
    with few allowed items) get an exact draw from a random permutation of their
    allowed items. A user with fewer than ``n_neg`` allowed items gets those items
    repeated cyclically; one with none gets ``-1`` (the caller skips the row).
    Returns int64 [len(users), n_neg].
    """
    users = np.asarray(users, dtype=np.int64)
    out = np.full((len(users), n_neg), -1, dtype=np.int64)
    todo = np.arange(len(users))
    draw = 2 * n_neg + 16
    for _ in range(rounds):
        if not len(todo):
            break
        cand = rng.integers(0, n_items, size=(len(todo), draw), dtype=np.int64)
        ok = ~is_positive(keys, np.repeat(users[todo], draw), cand.ravel(), n_items).reshape(cand.shape)
        order = np.argsort(cand, axis=1, kind="stable")  # later copies of an item are repeats
        srt = np.take_along_axis(cand, order, axis=1)
        rep_sorted = np.zeros_like(ok)
        rep_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        rep = np.empty_like(ok)
        np.put_along_axis(rep, order, rep_sorted, axis=1)
        ok &= ~rep
        done = ok.sum(axis=1) >= n_neg
        rows = np.flatnonzero(done)
        take = ok[rows] & (np.cumsum(ok[rows], axis=1) <= n_neg)
        out[todo[rows]] = cand[rows][take].reshape(len(rows), n_neg)
        todo = todo[~done]
        draw *= 2
    # exact fallback for the few rows left: a random permutation of the allowed items
    step = max(1, (1 << 22) // max(n_items, 1))
    for start in range(0, len(todo), step):
        rows = todo[start:start + step]
        grid = np.broadcast_to(np.arange(n_items, dtype=np.int64), (len(rows), n_items))
        allowed = ~is_positive(keys, np.repeat(users[rows], n_items), grid.ravel(), n_items)
        allowed = allowed.reshape(len(rows), n_items)
        noise = np.where(allowed, rng.random((len(rows), n_items)), np.inf)
        perm = np.argsort(noise, axis=1)
        n_allowed = allowed.sum(axis=1)
        cyc = np.arange(n_neg)[None, :] % np.maximum(n_allowed, 1)[:, None]
        picked = np.take_along_axis(perm, cyc, axis=1)
        out[rows] = np.where(n_allowed[:, None] > 0, picked, -1)
    return out


def sampled_candidates(data: Dataset, split: str = "test", n_neg: int = 99,
                       seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of (users [c], items [c, 1 + n_neg]): column 0 the held-out item, then
    ``n_neg`` negatives the user never had under the target behavior (train, valid or
    test). One row per distinct held-out (user, item) pair; rows are seeded and do not
    depend on any batch size. Rows with no possible negative are left out.
    """
    pairs = _target_keys(data, split)
    known = np.unique(np.concatenate([_target_keys(data, s) for s in ("train", "valid", "test")
                                      if getattr(data, s) is not None]))
    rng = np.random.default_rng(seed)
    n_items = data.n_items
    for start in range(0, len(pairs), NEG_CHUNK):
        chunk = pairs[start:start + NEG_CHUNK]
        users, pos = chunk // n_items, chunk % n_items
        neg = sample_eval_negatives(known, users, n_items, rng, n_neg)
        keep = neg[:, 0] >= 0
        yield users[keep], np.concatenate([pos[keep, None], neg[keep]], axis=1)


@PROTOCOLS.register("sampled")
def evaluate_sampled(scorer: Any, data: Dataset, split: str = "test", ks: Sequence[int] = (10,),
                     n_neg: int = 99, seed: int = 0, batch_size: int = 1024) -> EvalResult:
    """Rank each held-out target item among ``n_neg`` sampled negatives; HR@K and NDCG@K.

    The rank is pessimistic and deterministic: the number of negatives scoring
    higher than *or equal to* the held-out item, so a constant scorer gets HR@K = 0
    instead of a lucky tie-break. Averaged over held-out (user, item) pairs (one per
    user under leave-one-out).
    """
    pairs = _target_keys(data, split)
    if len(pairs) == 0:
        raise DataError(f"dataset '{data.name}' has no held-out '{data.target}' items in {split}")
    ranks: list[Tensor] = []
    evaluated_users: list[np.ndarray] = []
    evaluated_keys: list[np.ndarray] = []
    with _scoring(scorer) as device:
        for users, cand in sampled_candidates(data, split, n_neg, seed):
            evaluated_users.append(users)
            evaluated_keys.append(users * np.int64(data.n_items) + cand[:, 0])
            for start in range(0, len(users), batch_size):
                u = torch.from_numpy(users[start:start + batch_size]).to(device)
                c = torch.from_numpy(cand[start:start + batch_size]).to(device)
                s = _check_scores(scorer.score(u, c), tuple(c.shape), "score")
                ranks.append((s[:, 1:] >= s[:, :1]).sum(dim=1).cpu())
    n_done = sum(len(u) for u in evaluated_users)
    if n_done == 0:
        raise DataError(f"no held-out pair in {split} of '{data.name}' has a possible negative item")
    users_all = np.concatenate(evaluated_users)
    all_ranks = torch.cat(ranks)
    values = metrics_from_ranks(all_ranks, ks)
    parts = history_parts(data, np.concatenate(evaluated_keys))
    counts: dict[str, dict[str, int]] = {}
    for p, sel in (parts or {}).items():
        counts[p] = {"n_users": int(len(np.unique(users_all[sel]))), "n_pairs": int(sel.sum())}
        if sel.any():
            values.update(_prefixed(p, metrics_from_ranks(all_ranks[torch.from_numpy(sel)], ks)))
    return EvalResult(values, protocol="sampled", split=split,
                      n_users=int(len(np.unique(users_all))), n_pairs=n_done,
                      n_skipped=int(len(pairs) - n_done), parts=counts)


def evaluate(scorer: Any, data: Dataset, protocol: str = "full", split: str = "test", **kw: Any) -> EvalResult:
    """Run a registered protocol (``full`` or ``sampled``) with its options."""
    fn: Callable[..., EvalResult] = PROTOCOLS.get(protocol)
    return fn(scorer, data, split=split, **kw)
