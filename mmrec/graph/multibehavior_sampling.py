"""Per-behavior BPR triples, sampled per user as CIGF and MB-GMN train.

Both original implementations (``sampleTrainBatch`` in MC-CV/CIGF and akaxlh/MB-GMN)
walk over a shuffled list of users; for every user of a batch and every behavior
they draw up to ``samples_per_user`` positives of that behavior (with replacement)
and as many negatives the user never had *under that behavior*. A batch therefore
holds triples of every behavior for the same users, which is what their multi-task
losses need. Vectorised here: no Python loop over users or rows.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from mmrec.datasets.sampling import positive_keys, sample_negatives


def sample_user_positives(matrix: sp.csr_matrix, users: np.ndarray, per_user: int,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_user`` positives of each user, drawn with replacement (users without any: none)."""
    indptr = matrix.indptr.astype(np.int64)
    deg = indptr[users + 1] - indptr[users]
    take = np.minimum(deg, per_user)
    rep_users = np.repeat(users, take)
    rep_deg = np.repeat(deg, take)
    offsets = np.repeat(indptr[users], take) + np.floor(rng.random(len(rep_users)) * rep_deg).astype(np.int64)
    return rep_users, matrix.indices[offsets].astype(np.int64)


def multibehavior_batches(matrices: Sequence[sp.csr_matrix], batch_users: int, per_user: int,
                          rng: np.random.Generator, users_per_epoch: int = 0,
                          users: np.ndarray | None = None) -> Iterator[dict[str, Tensor]]:
    """One epoch of batches ``{user, pos, neg, behavior}`` (concatenated over behaviors).

    ``behavior[r]`` is the index (cascade order) of the behavior row ``r`` was drawn
    from; negatives exclude that behavior's positives only, as in the originals.
    ``users``: who is trained on (default: users with any training interaction);
    ``users_per_epoch > 0`` keeps a random subset each epoch (the originals' ``trnNum``).
    """
    if batch_users < 1 or per_user < 1:
        raise ValueError("batch_users and per_user must be positive")
    mats = [sp.csr_matrix(m) for m in matrices]
    n_items = mats[0].shape[1]
    if users is None:
        active = np.zeros(mats[0].shape[0], dtype=bool)
        for m in mats:
            active |= np.diff(m.indptr) > 0
        users = np.nonzero(active)[0]
    users = rng.permutation(np.asarray(users, dtype=np.int64))
    if users_per_epoch > 0:
        users = users[:users_per_epoch]
    keys = [positive_keys(m) for m in mats]
    for start in range(0, len(users), batch_users):
        batch = users[start:start + batch_users]
        parts = []
        for b, m in enumerate(mats):
            u, i = sample_user_positives(m, batch, per_user, rng)
            if len(u) == 0:
                continue
            j = sample_negatives(keys[b], u, n_items, rng)[:, 0]
            parts.append((u, i, j, np.full(len(u), b, dtype=np.int64)))
        if not parts:
            continue
        u, i, j, beh = (np.concatenate(c) for c in zip(*parts))
        yield {"user": torch.from_numpy(u), "pos": torch.from_numpy(i), "neg": torch.from_numpy(j),
               "behavior": torch.from_numpy(beh)}
