"""Vectorised negative sampling: no Python loop per user or per row."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor


def positive_keys(matrix: sp.csr_matrix) -> np.ndarray:
    """Sorted ``user * n_items + item`` keys of the matrix's non-zeros."""
    m = matrix.tocoo()
    keys = m.row.astype(np.int64) * np.int64(matrix.shape[1]) + m.col.astype(np.int64)
    keys.sort()
    return keys


def is_positive(keys: np.ndarray, users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Membership test of (user, item) pairs in sorted ``keys`` (binary search)."""
    q = users.astype(np.int64) * np.int64(n_items) + items.astype(np.int64)
    if len(keys) == 0:
        return np.zeros(len(q), dtype=bool)
    pos = np.searchsorted(keys, q)
    pos = np.minimum(pos, len(keys) - 1)
    return keys[pos] == q


def sample_negatives(keys: np.ndarray, users: np.ndarray, n_items: int, rng: np.random.Generator,
                     n_neg: int = 1, max_rounds: int = 20) -> np.ndarray:
    """Uniform items that are not positives of each user, shape [len(users), n_neg].

    Rejection sampling on the whole batch at once; a user who has (almost) every
    item keeps the last draw after ``max_rounds`` (documented, not hidden: such a
    user has no valid negative).
    """
    users_rep = np.repeat(users.astype(np.int64), n_neg)
    neg = rng.integers(0, n_items, size=len(users_rep), dtype=np.int64)
    bad = is_positive(keys, users_rep, neg, n_items)
    for _ in range(max_rounds):
        if not bad.any():
            break
        idx = np.nonzero(bad)[0]
        neg[idx] = rng.integers(0, n_items, size=len(idx), dtype=np.int64)
        bad[idx] = is_positive(keys, users_rep[idx], neg[idx], n_items)
    return neg.reshape(len(users), n_neg)


def bpr_batches(matrix: sp.csr_matrix, batch_size: int, rng: np.random.Generator,
                n_neg: int = 1) -> Iterator[dict[str, Tensor]]:
    """One epoch = every positive pair once, shuffled, each with ``n_neg`` negatives."""
    m = matrix.tocoo()
    users = m.row.astype(np.int64)
    items = m.col.astype(np.int64)
    if len(users) == 0:
        return
    keys = positive_keys(matrix)
    order = rng.permutation(len(users))
    n_items = matrix.shape[1]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        u, i = users[idx], items[idx]
        j = sample_negatives(keys, u, n_items, rng, n_neg)
        yield {"user": torch.from_numpy(u), "pos": torch.from_numpy(i),
               "neg": torch.from_numpy(j[:, 0] if n_neg == 1 else j)}
