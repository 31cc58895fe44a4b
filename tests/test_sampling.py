import numpy as np
import scipy.sparse as sp

from mmrec.datasets.sampling import bpr_batches, is_positive, positive_keys, sample_negatives


def _matrix():
    rng = np.random.default_rng(0)
    dense = rng.random((50, 30)) < 0.3
    return sp.csr_matrix(dense.astype(np.float32)), dense


def test_negatives_are_never_positives():
    m, dense = _matrix()
    keys = positive_keys(m)
    users = np.repeat(np.arange(50), 20)
    neg = sample_negatives(keys, users, 30, np.random.default_rng(1), n_neg=3)
    assert neg.shape == (1000, 3)
    assert not dense[np.repeat(users, 3), neg.ravel()].any()


def test_membership_matches_dense():
    m, dense = _matrix()
    u, i = np.nonzero(np.ones_like(dense))
    assert np.array_equal(is_positive(positive_keys(m), u, i, 30), dense[u, i])


def test_epoch_covers_every_positive_once_and_is_seeded():
    m, _ = _matrix()
    a = list(bpr_batches(m, 64, np.random.default_rng(5)))
    b = list(bpr_batches(m, 64, np.random.default_rng(5)))
    pairs = {(int(u), int(i)) for x in a for u, i in zip(x["user"], x["pos"])}
    assert len(pairs) == m.nnz == sum(len(x["user"]) for x in a)
    assert all((x["neg"] == y["neg"]).all() for x, y in zip(a, b))
