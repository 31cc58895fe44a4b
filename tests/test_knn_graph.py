"""The blockwise kNN graph equals the dense LATTICE/MICRO construction, sparse."""

from __future__ import annotations

import pytest
import torch

from mmrec.errors import ConfigError, DataError
from mmrec.fusion.bridge import knn as knn_mod
from mmrec.fusion.bridge import KNN_BACKENDS, exact_topk, knn_graph

NEG_INF = float("-inf")


def dense_reference(x: torch.Tensor, k: int, mask: torch.Tensor | None = None, *,
                    exclude_self: bool = True, symmetric: bool = False,
                    weighted: bool = True, normalize: str | None = "sym") -> torch.Tensor:
    """The dense N x N formulas of LATTICE/MICRO (build_sim, build_knn_neighbourhood,
    compute_normalized_laplacian / get_dense_laplacian), with masked items removed."""
    xn = x / x.norm(dim=1, keepdim=True)
    s = xn @ xn.T
    if mask is not None:
        s[~mask] = NEG_INF
        s[:, ~mask] = NEG_INF
    if exclude_self:
        s.fill_diagonal_(NEG_INF)
    val, ind = s.topk(k, dim=-1)
    a = torch.zeros_like(s).scatter_(-1, ind, val if weighted else torch.ones_like(val))
    if mask is not None:
        a[~mask] = 0
    if symmetric:
        a = a + a.T
    if normalize is None:
        return a
    rowsum = a.sum(-1)
    d = rowsum.pow(-0.5 if normalize == "sym" else -1.0)
    d[torch.isinf(d)] = 0.0
    if normalize == "sym":
        return torch.diagflat(d) @ a @ torch.diagflat(d)
    return torch.diagflat(d) @ a


def clustered(n: int, d: int, n_clusters: int, seed: int = 0) -> torch.Tensor:
    """Unit vectors around random centres (a mixture of Gaussians on the sphere),
    overlapping enough that IVF misses some true neighbours (recall ~0.97, not 1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g)
    assign = torch.randint(n_clusters, (n,), generator=g)
    x = centres[assign] + 1.5 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def assert_sorted_edges(g) -> None:
    """to_sparse_coo() declares the edges coalesced: sorted by (row, col), no duplicates."""
    n = g.num_nodes
    ref = torch.sparse_coo_tensor(g.edge_index, g.edge_weight, (n, n), check_invariants=True).coalesce()
    assert torch.equal(g.edge_index, ref.indices())
    assert torch.equal(g.edge_weight, ref.values())


def rand(n: int = 97, d: int = 16, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("block_size", [1, 7, 32, 96, 97, 500, None])
def test_matches_dense_reference_for_any_block_size(block_size):
    x = rand()  # 97 rows: a prime, so no block size > 1 divides it
    g = knn_graph(x, k=5, block_size=block_size)
    ref = dense_reference(x, 5)
    torch.testing.assert_close(g.to_sparse_coo().to_dense(), ref, rtol=0, atol=1e-12)
    xn = x / x.norm(dim=1, keepdim=True)
    s = (xn @ xn.T).fill_diagonal_(NEG_INF)
    val, ind = s.topk(5, dim=1)
    assert torch.equal(g.neighbors, ind)
    torch.testing.assert_close(g.similarity, val, rtol=0, atol=1e-12)
    assert g.num_edges == 97 * 5
    assert_sorted_edges(g)


def test_float32_blocks_pick_the_same_neighbours():
    x = rand(300, 32, seed=1, dtype=torch.float32)
    full = knn_graph(x, k=10, block_size=300)
    for b in (1, 13, 64):
        g = knn_graph(x, k=10, block_size=b)
        assert torch.equal(g.neighbors, full.neighbors)
        torch.testing.assert_close(g.edge_weight, full.edge_weight, rtol=1e-6, atol=1e-6)


def test_memory_budget_sets_block_size():
    assert knn_mod.auto_block_size(1000, 4, torch.device("cpu"), memory_budget=40_000) == 10
    assert knn_mod.auto_block_size(10**9, 4, torch.device("cpu"), memory_budget=1) == 1
    x = rand(50, 8)
    g = knn_graph(x, k=3, memory_budget=50 * 8 * 3)  # 3 rows per block
    torch.testing.assert_close(g.to_sparse_coo().to_dense(), dense_reference(x, 3), rtol=0, atol=1e-12)


def test_column_tiles_when_a_block_would_have_few_rows(monkeypatch):
    # at ~1M items the budget leaves few rows per GEMM; then columns are tiled (same buffer)
    monkeypatch.setattr(knn_mod, "MIN_BLOCK_ROWS", 16)
    x = rand(97, 8)
    budget = 97 * 8 * 3  # 3 rows of 97 -> 16 rows of 18 columns: 6 tiles, the last partial
    g = knn_graph(x, k=5, memory_budget=budget)
    torch.testing.assert_close(g.to_sparse_coo().to_dense(), dense_reference(x, 5), rtol=0, atol=1e-12)
    rows = torch.tensor([96, 0, 40, 41, 17] * 4)
    xn = torch.nn.functional.normalize(x, dim=1)
    val, ind = exact_topk(xn, 5, rows=rows, memory_budget=budget)
    s = (xn @ xn.T).fill_diagonal_(NEG_INF)[rows]
    ref_val, ref_ind = s.topk(5, dim=1)
    assert torch.equal(ind, ref_ind)
    torch.testing.assert_close(val, ref_val, rtol=0, atol=1e-12)
    mask = torch.rand(97, generator=torch.Generator().manual_seed(3)) > 0.3
    g = knn_graph(x, k=4, mask=mask, memory_budget=budget)
    torch.testing.assert_close(g.to_sparse_coo().to_dense(), dense_reference(x, 4, mask), rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalize", ["sym", "row", None])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("weighted", [True, False])
def test_normalisations_equal_dense_formulas(normalize, symmetric, weighted):
    x = rand(61, 12, seed=2)
    g = knn_graph(x, k=4, block_size=10, normalize=normalize, symmetric=symmetric, weighted=weighted)
    ref = dense_reference(x, 4, normalize=normalize, symmetric=symmetric, weighted=weighted)
    torch.testing.assert_close(g.to_sparse_coo().to_dense(), ref, rtol=0, atol=1e-12)
    if symmetric and normalize != "row":  # D^-1 A is not symmetric, the other two are
        dense = g.to_sparse_coo().to_dense()
        torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-12)


def test_lattice_with_self_reproduces_its_numbers():
    """exclude_self=False: each item is its own top-1 neighbour, as in LATTICE's code."""
    x = rand(40, 10, seed=3)
    g = knn_graph(x, k=6, exclude_self=False, block_size=9)
    ref = dense_reference(x, 6, exclude_self=False)
    torch.testing.assert_close(g.to_sparse_coo().to_dense(), ref, rtol=0, atol=1e-12)
    assert torch.equal(g.neighbors[:, 0], torch.arange(40))


def test_self_is_never_a_neighbour_even_with_duplicates():
    x = rand(30, 6, seed=4)
    x[7] = x[3]  # an exact duplicate: similarity 1 with item 3, same as self
    g = knn_graph(x, k=4, block_size=8)
    row, col = g.edge_index
    assert not bool((row == col).any())
    assert g.neighbors[3, 0] == 7 and g.neighbors[7, 0] == 3
    assert not bool((g.neighbors == torch.arange(30).unsqueeze(1)).any())


def test_masked_items_have_no_edges_in_or_out():
    x = rand(80, 10, seed=5)
    mask = torch.ones(80, dtype=torch.bool)
    missing = torch.tensor([0, 3, 4, 41, 79])
    mask[missing] = False
    x[missing] = 0.0  # a zero row is fine when masked: it never enters a cosine
    g = knn_graph(x, k=6, mask=mask, block_size=11, symmetric=True)
    assert_sorted_edges(g)
    assert_sorted_edges(knn_graph(x, k=6, mask=mask, block_size=11))
    row, col = g.edge_index
    assert not bool(torch.isin(row, missing).any()) and not bool(torch.isin(col, missing).any())
    assert bool((g.neighbors[missing] == -1).all())
    assert not bool(torch.isin(g.neighbors[mask], missing).any())
    x_ref = x.clone()
    x_ref[missing] = 1.0  # any value: the reference masks these rows and columns out
    ref = dense_reference(x_ref, 6, mask=mask, symmetric=True)
    torch.testing.assert_close(g.to_sparse_coo().to_dense(), ref, rtol=0, atol=1e-12)
    # the graph on the present items equals the graph of the compacted matrix
    keep = mask.nonzero().squeeze(1)
    sub = knn_graph(x[keep], k=6, symmetric=True)
    torch.testing.assert_close(g.to_sparse_coo().to_dense()[keep][:, keep],
                               sub.to_sparse_coo().to_dense(), rtol=0, atol=1e-12)


def test_present_zero_row_is_an_error_naming_the_item():
    x = rand(20, 4)
    x[13] = 0.0
    with pytest.raises(DataError, match=r"\[13\].*mask"):
        knn_graph(x, k=3)
    x[13] = float("nan")
    with pytest.raises(DataError, match="features"):
        knn_graph(x, k=3)
    with pytest.raises(DataError, match="mask"):
        knn_graph(rand(20, 4), k=3, mask=torch.ones(20))


def test_k_is_capped_by_the_items_present():
    x = rand(10, 4)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 5, 6, 9]] = True
    g = knn_graph(x, k=10, mask=mask)
    assert g.k == 3 and g.num_edges == 12
    one = knn_graph(x, k=3, mask=torch.arange(10) == 4)
    assert one.num_edges == 0 and one.k == 0


def test_csr_and_pyg_views_agree():
    from torch_geometric.nn import LGConv

    x = rand(45, 8, seed=6)
    g = knn_graph(x, k=5, block_size=16, symmetric=False)
    h = rand(45, 3, seed=7)
    expected = g.to_sparse_coo().to_dense() @ h
    torch.testing.assert_close(torch.sparse.mm(g.to_sparse_coo(), h), expected)
    torch.testing.assert_close(g.to_sparse_csr() @ h, expected)
    torch.testing.assert_close(LGConv(normalize=False)(h, *g.pyg()), expected)


def test_gradients_equal_the_dense_construction():
    x1 = rand(35, 6, seed=8).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    h = rand(35, 4, seed=9)
    g = knn_graph(x1, k=4, block_size=6, symmetric=True)
    (torch.sparse.mm(g.to_sparse_coo(), h) ** 2).sum().backward()
    ((dense_reference(x2, 4, symmetric=True) @ h) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)


def test_exact_topk_of_a_row_subset():
    x = torch.nn.functional.normalize(rand(70, 8, seed=10), dim=1)
    val, ind = exact_topk(x, 5, block_size=9)
    rows = torch.tensor([69, 0, 33, 12])
    v2, i2 = exact_topk(x, 5, rows=rows, block_size=3)
    assert torch.equal(i2, ind[rows])
    torch.testing.assert_close(v2, val[rows], rtol=0, atol=1e-12)


def test_deterministic():
    x = rand(200, 16, seed=11, dtype=torch.float32)
    a, b = knn_graph(x, k=8, symmetric=True), knn_graph(x, k=8, symmetric=True)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_weight, b.edge_weight)


def test_backends_are_a_registry():
    assert {"exact", "faiss", "faiss-hnsw", "faiss-ivf"} <= set(KNN_BACKENDS.names())
    with pytest.raises(ConfigError, match="known: exact"):
        knn_graph(rand(10, 3), k=2, backend="annoy")
    with pytest.raises(ConfigError, match="known: none, row, sym"):
        knn_graph(rand(10, 3), k=2, normalize="laplacian")


def test_auto_switches_to_faiss_above_threshold(monkeypatch):
    x = rand(60, 8, dtype=torch.float32)
    assert knn_graph(x, k=3, backend="auto").backend == "exact"
    monkeypatch.setattr(knn_mod, "AUTO_EXACT_MAX", 50)
    assert knn_graph(x, k=3, backend="auto").backend == "faiss"


def _recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = (approx.unsqueeze(2) == exact.unsqueeze(1)).any(2).sum()
    return float(hits) / exact.numel()


def test_faiss_results_drop_self_or_else_the_worst_candidate():
    import numpy as np

    class FakeIndex:  # what an ANN index may return: self missing, or too few results
        def search(self, xs, kk):
            assert kk == 3
            ids = np.array([[0, 2, 1], [2, 3, 0], [3, 2, -1], [1, 2, 3]], dtype=np.int64)
            sims = np.array([[1.0, .9, .8], [.9, .7, .6], [1.0, .5, -3e38], [.9, .8, .7]],
                            dtype=np.float32)
            return sims[: len(xs)], ids[: len(xs)]

    xs = np.zeros((4, 2), dtype=np.float32)
    val, idx = knn_mod._faiss_search(FakeIndex(), xs, 2, True, torch.device("cpu"))
    assert idx.tolist() == [[2, 1], [2, 3], [3, -1], [1, 2]]
    torch.testing.assert_close(val, torch.tensor([[.9, .8], [.9, .7], [1.0, 0.0], [.9, .8]]))


@pytest.mark.parametrize("backend", ["faiss-hnsw", "faiss-ivf"])
def test_faiss_recall_on_clustered_points(backend):
    faiss = pytest.importorskip("faiss")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        x = clustered(5000, 64, n_clusters=50)
        mask = torch.ones(5000, dtype=torch.bool)
        mask[::97] = False
        exact = knn_graph(x, k=10, mask=mask)
        approx = knn_graph(x, k=10, mask=mask, backend=backend)
        again = knn_graph(x, k=10, mask=mask, backend=backend)
    finally:
        faiss.omp_set_num_threads(threads)
    present = mask.nonzero().squeeze(1)
    assert _recall(approx.neighbors[present], exact.neighbors[present]) >= 0.9
    assert bool((approx.neighbors[~mask] == -1).all())
    assert not bool(torch.isin(approx.neighbors, (~mask).nonzero().squeeze(1)).any())
    assert not bool((approx.edge_index[0] == approx.edge_index[1]).any())
    assert_sorted_edges(approx)
    assert torch.equal(approx.edge_index, again.edge_index)  # one faiss thread: deterministic
    assert torch.equal(approx.edge_weight, again.edge_weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = rand(500, 32, seed=12, dtype=torch.float32)
    cpu = knn_graph(x, k=10, block_size=77)
    gpu = knn_graph(x, k=10, device="cuda", block_size=77)
    assert gpu.edge_index.device.type == "cuda"
    assert torch.equal(cpu.neighbors, gpu.neighbors.cpu())
    torch.testing.assert_close(cpu.edge_weight, gpu.edge_weight.cpu(), rtol=1e-5, atol=1e-6)
