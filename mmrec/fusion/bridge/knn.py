"""Item-item kNN graphs from content features, built blockwise and kept sparse.

LATTICE (Zhang et al., MM'21, Sec. 3.1.1) and MICRO build the modality graph as

    S_ij = x_i . x_j / (|x_i| |x_j|)                   (eq. 1, cosine)
    A_ij = S_ij if j in top-k(S_i) else 0              (eq. 2, kNN sparsification)
    L    = D^-1/2 A D^-1/2,  D_ii = sum_j A_ij         (eq. 3, normalisation)

with a dense N x N ``S`` (``build_sim`` + ``build_knn_neighbourhood`` +
``compute_normalized_laplacian``), which is what runs out of memory on real
catalogues. Here ``S`` is computed ``B`` rows at a time (``X_b @ X.T``, one GEMM
per block into a reused buffer) and only the top-k of each row is kept: memory is
O(N*k + B*N), time is one full matrix product plus a ``topk`` per block. The
numbers are those of the dense formulas (tests check it); two deliberate
differences: self is excluded by default (``exclude_self=False`` gives LATTICE's
own behaviour, where each item is its own nearest neighbour), and a non-positive
degree gives weight 0 instead of NaN.

Items whose ``mask`` is False have no features for this modality: they get no
edges and are never anyone's neighbour (DESIGN: a missing modality is a mask,
never a zero row fed into a cosine).

Backends (``KNN_BACKENDS``) return the top-k lists; ``exact`` is the blockwise
GEMM above, ``faiss-hnsw`` (alias ``faiss``) and ``faiss-ivf`` are approximate
searches for millions of items, ``auto`` picks exact up to ``AUTO_EXACT_MAX`` items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from mmrec.errors import ConfigError, DataError
from mmrec.registry import Registry

# A backend maps unit-norm rows x [n, d] to (similarity [n, k], index [n, k]); index -1 = no neighbour.
Backend = Callable[..., tuple[Tensor, Tensor]]
KNN_BACKENDS: Registry[Backend] = Registry("knn backend")
# A normalisation maps (edge_index, edge_weight, num_nodes) to new edge weights.
NORMALIZATIONS: Registry = Registry("graph normalisation")

AUTO_EXACT_MAX = 200_000          # `auto`: exact search up to this many items, faiss above
DEFAULT_CPU_BUDGET = 256 * 2**20  # bytes for the [B, N] similarity block on CPU
MIN_BLOCK_ROWS = 512  # fewer query rows per GEMM than this: tile the columns instead
MAX_CUDA_BUDGET = 2 * 2**30       # on CUDA: a quarter of free memory, at most this


@dataclass(frozen=True)
class KnnGraph:
    """A sparse item-item graph: ``A[edge_index[0], edge_index[1]] = edge_weight``.

    Edges are sorted by (row, col), so the COO form is already coalesced.
    ``neighbors``/``similarity`` keep the raw top-k lists ([N, k], most similar
    first, -1 / 0.0 where an item has no neighbour, e.g. masked items) for
    callers that want the lists rather than the normalised graph.
    """

    edge_index: Tensor
    edge_weight: Tensor
    num_nodes: int
    neighbors: Tensor
    similarity: Tensor
    k: int
    backend: str

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to_sparse_coo(self) -> Tensor:
        """``torch.sparse_coo_tensor`` [N, N]; ``torch.sparse.mm(A, H)`` propagates over it."""
        n = self.num_nodes
        return torch.sparse_coo_tensor(self.edge_index, self.edge_weight, (n, n), is_coalesced=True,
                                       check_invariants=False)

    def to_sparse_csr(self) -> Tensor:
        """``torch.sparse_csr_tensor`` [N, N] (rows already sorted, so no conversion pass)."""
        n = self.num_nodes
        row, col = self.edge_index
        counts = torch.bincount(row, minlength=n)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return torch.sparse_csr_tensor(crow, col, self.edge_weight, (n, n), check_invariants=False)

    def pyg(self) -> tuple[Tensor, Tensor]:
        """``(edge_index, edge_weight)`` for torch-geometric message passing.

        PyG aggregates at ``edge_index[1]`` messages from ``edge_index[0]``
        (flow source_to_target), so the matrix (row, col) pairs are flipped:
        ``LGConv(normalize=False)(x, *g.pyg())`` equals ``A @ x``.
        """
        return self.edge_index.flip(0), self.edge_weight


def knn_graph(
    features: Tensor,
    k: int = 10,
    mask: Tensor | None = None,
    *,
    backend: str = "exact",
    block_size: int | None = None,
    memory_budget: int | None = None,
    normalize: str | None = "sym",
    symmetric: bool = False,
    weighted: bool = True,
    exclude_self: bool = True,
    device: torch.device | str | None = None,
    backend_options: dict[str, Any] | None = None,
) -> KnnGraph:
    """Top-k cosine graph of the rows of ``features`` [N, d], sparse and normalised.

    Args:
        k: neighbours per item (fewer when fewer items have the modality).
        mask: bool [N]; False = the item lacks this modality (no edges in or out).
        backend: a ``KNN_BACKENDS`` name (``exact``, ``faiss``/``faiss-hnsw``,
            ``faiss-ivf``) or ``auto`` (exact up to ``AUTO_EXACT_MAX`` items).
        block_size: rows per similarity block (exact); default from ``memory_budget``
            (bytes for the [B, N] block; 256 MiB on CPU, 1/4 of free memory on CUDA).
        normalize: ``sym`` (D^-1/2 A D^-1/2, LATTICE/MICRO), ``row`` (D^-1 A,
            MICRO's ``rw``) or None; degrees are row sums of A after symmetrising.
        symmetric: use A + A^T (mutual neighbours get both weights summed).
        weighted: edge value = cosine (LATTICE/MICRO); False = 1 (FREEDOM).
        exclude_self: an item is not its own neighbour (LATTICE includes itself).
        device: where to compute (default: the features' device); faiss runs on CPU.
        backend_options: extra keyword arguments of the backend (e.g. ``ef_search``).

    If ``features`` requires grad, edge weights are recomputed differentiably
    from the selected pairs (the neighbour selection itself is not differentiable),
    as LATTICE needs for its learned graph.
    """
    if features.dim() != 2:
        raise ConfigError(f"features must be [N, d], got shape {tuple(features.shape)}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    normalize_fn = NORMALIZATIONS.get("none" if normalize is None else normalize)  # fail early
    n = features.shape[0]
    dev = torch.device(device) if device is not None else features.device
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    x = features.to(device=dev, dtype=dtype)
    valid = _valid_rows(mask, n, dev)
    xv = x if valid is None else x[valid]
    nv = xv.shape[0]
    ids = torch.arange(n, device=dev) if valid is None else valid
    norms = xv.norm(dim=1, keepdim=True)
    _check_rows(norms, ids)
    xn = xv / norms if nv else xv

    name = _resolve_backend(backend, nv)
    k_eff = max(0, min(k, nv - int(exclude_self)))
    if k_eff == 0:
        sim = xn.new_zeros(nv, 0)
        idx = torch.zeros(nv, 0, dtype=torch.long, device=dev)
    else:
        with torch.no_grad():
            sim, idx = KNN_BACKENDS.get(name)(
                xn.detach(), k_eff, exclude_self=exclude_self, block_size=block_size,
                memory_budget=memory_budget, **(backend_options or {}))
        sim, idx = sim.to(dev), idx.to(dev)

    # Edges in (row, col) order: rows come out of the backend in order, so sorting the
    # k columns of each row suffices (and a top-k row has no duplicates to merge).
    col_sorted, order = idx.sort(dim=1)  # missing neighbours (-1) sort first, dropped below
    sim_sorted = sim.gather(1, order)
    found = col_sorted >= 0
    if bool(found.all()):  # the usual case: no boolean gathers (slow on a busy machine)
        src_local = torch.arange(nv, device=dev).repeat_interleave(k_eff)
        dst_local, w = col_sorted.reshape(-1), sim_sorted.reshape(-1)
    else:
        src_local = torch.arange(nv, device=dev).unsqueeze(1).expand_as(idx)[found]
        dst_local, w = col_sorted[found], sim_sorted[found]
    if torch.is_grad_enabled() and xn.requires_grad:
        w = (xn[src_local] * xn[dst_local]).sum(-1)  # eq. 1 on the kept pairs only
    if not weighted:
        w = torch.ones_like(w)
    row, col = (src_local, dst_local) if valid is None else (ids[src_local], ids[dst_local])
    if symmetric:  # A + A^T: merge the two directions of mutual pairs
        edge_index, w = _coalesce(torch.cat([row, col]), torch.cat([col, row]), torch.cat([w, w]), n)
    else:
        edge_index = torch.stack([row, col])
    w = normalize_fn(edge_index, w, n)

    present = idx >= 0
    neighbors, similarity = idx, torch.where(present, sim.to(dtype), 0.0)
    if valid is not None:  # back to item ids; masked items keep -1 / 0.0
        neighbors = torch.full((n, k_eff), -1, dtype=torch.long, device=dev)
        neighbors[ids] = torch.where(present, ids[idx.clamp(min=0)], -1)
        similarity = torch.zeros((n, k_eff), dtype=dtype, device=dev).index_copy(0, ids, similarity)
    return KnnGraph(edge_index, w, n, neighbors, similarity, k_eff, name)


# --------------------------------------------------------------------------- inputs

def _valid_rows(mask: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """Indices of items that have the modality (None = all of them, no copy needed)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise DataError(f"mask must be a bool tensor of shape ({n},), got {mask.dtype} "
                        f"{tuple(mask.shape)}", field="mask")
    mask = mask.to(device)
    return None if bool(mask.all()) else mask.nonzero().squeeze(1)


def _check_rows(norms: Tensor, ids: Tensor) -> None:
    """A present row must have a finite, non-zero norm: its cosine is undefined otherwise."""
    bad = ~torch.isfinite(norms.squeeze(1)) | (norms.squeeze(1) == 0)
    if bool(bad.any()):
        items = ids[bad][:5].tolist()
        raise DataError(f"{int(bad.sum())} item(s) marked present have zero or non-finite "
                        f"feature rows (first: {items}); mark them False in `mask` instead",
                        field="features")


def _resolve_backend(name: str, n: int) -> str:
    if name.lower() == "auto":
        return "exact" if n <= AUTO_EXACT_MAX else "faiss"
    KNN_BACKENDS.get(name)  # raises ConfigError listing the known names
    return name.lower()


# --------------------------------------------------------------------------- exact backend

def auto_block_size(n: int, element_size: int, device: torch.device,
                    memory_budget: int | None = None) -> int:
    """Rows per block so that the [B, n] similarity block fits ``memory_budget`` bytes."""
    if memory_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget = min(free // 4, MAX_CUDA_BUDGET)
        else:
            memory_budget = DEFAULT_CPU_BUDGET
    return max(1, int(memory_budget // max(1, n * element_size)))


@KNN_BACKENDS.register("exact")
def exact_topk(x: Tensor, k: int, *, rows: Tensor | None = None, exclude_self: bool = True,
               block_size: int | None = None, memory_budget: int | None = None,
               ) -> tuple[Tensor, Tensor]:
    """Exact top-k inner products of ``x[rows]`` (default: all rows) against all of ``x``.

    Pass L2-normalised rows to get cosine. One GEMM per block of ``B`` query rows
    into a reused [B, n] buffer, then ``topk``; the diagonal (self) is set to -inf
    when ``exclude_self``. Returns (values [m, k], indices [m, k]), best first.
    """
    n = x.shape[0]
    m = n if rows is None else rows.shape[0]
    if k > n - int(exclude_self):
        raise ConfigError(f"k={k} neighbours requested among {n} items")
    b = block_size or auto_block_size(n, x.element_size(), x.device, memory_budget)
    b = max(1, min(b, m))
    if block_size is None and b < MIN_BLOCK_ROWS <= m:
        # Few rows per block means each GEMM streams all of x for little work (memory-bound
        # at ~1M items): take more rows and tile the columns instead, same buffer size.
        return _exact_topk_tiled(x, k, rows, exclude_self, MIN_BLOCK_ROWS, max(k, b * n // MIN_BLOCK_ROWS))
    values = torch.empty((m, k), dtype=x.dtype, device=x.device)
    index = torch.empty((m, k), dtype=torch.long, device=x.device)
    buf = torch.empty((b, n), dtype=x.dtype, device=x.device)
    xt = x.T  # a transposed view: the GEMM reads it in place, no copy
    for s in range(0, m, b):
        e = min(m, s + b)
        out = buf[: e - s]
        if rows is None:
            torch.mm(x[s:e], xt, out=out)
            if exclude_self:
                out.diagonal(offset=s).fill_(float("-inf"))
        else:
            q = rows[s:e].to(x.device)
            torch.mm(x[q], xt, out=out)
            if exclude_self:
                out[torch.arange(e - s, device=x.device), q] = float("-inf")
        torch.topk(out, k, dim=1, out=(values[s:e], index[s:e]))
    return values, index


def _exact_topk_tiled(x: Tensor, k: int, rows: Tensor | None, exclude_self: bool, b: int,
                      tile: int) -> tuple[Tensor, Tensor]:
    """:func:`exact_topk` over [b, tile] blocks: a top-k per column tile, merged into a running top-k."""
    n = x.shape[0]
    m = n if rows is None else rows.shape[0]
    tile = min(tile, n)
    values = torch.empty((m, k), dtype=x.dtype, device=x.device)
    index = torch.empty((m, k), dtype=torch.long, device=x.device)
    buf = torch.empty((b, tile), dtype=x.dtype, device=x.device)
    for s in range(0, m, b):
        e = min(m, s + b)
        q = torch.arange(s, e, device=x.device) if rows is None else rows[s:e].to(x.device)
        xq = x[s:e] if rows is None else x[q]
        best_v = torch.full((e - s, k), float("-inf"), dtype=x.dtype, device=x.device)
        best_i = torch.zeros((e - s, k), dtype=torch.long, device=x.device)
        for c in range(0, n, tile):
            d = min(n, c + tile)
            out = buf[: e - s, : d - c]
            torch.mm(xq, x[c:d].T, out=out)
            if exclude_self:
                hit = (q >= c) & (q < d)
                out[hit.nonzero().squeeze(1), q[hit] - c] = float("-inf")
            tv, ti = torch.topk(out, min(k, d - c), dim=1)
            cand_v, cand_i = torch.cat([best_v, tv], 1), torch.cat([best_i, ti + c], 1)
            best_v, pos = torch.topk(cand_v, k, dim=1)
            best_i = cand_i.gather(1, pos)
        values[s:e], index[s:e] = best_v, best_i
    return values, index


# --------------------------------------------------------------------------- faiss backends

def _faiss():
    try:
        import faiss
    except ImportError as e:  # optional dependency (extra `ann`)
        raise ConfigError("the faiss kNN backends need faiss: pip install 'mmrec[ann]'") from e
    return faiss


def _faiss_search(index: Any, xs: Any, k: int, exclude_self: bool, device: torch.device,
                  chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Search every row against ``index`` and drop the row itself from its results."""
    n = xs.shape[0]
    kk = k + int(exclude_self)
    vals, idxs = [], []
    for s in range(0, n, chunk):
        d, i = index.search(xs[s:s + chunk], kk)
        vals.append(torch.from_numpy(d))
        idxs.append(torch.from_numpy(i))
    val, idx = torch.cat(vals), torch.cat(idxs)
    if exclude_self:
        drop = idx == torch.arange(n).unsqueeze(1)
        drop[~drop.any(1), -1] = True  # self not found: drop the worst extra candidate
        keep = ~drop
        val, idx = val[keep].view(n, k), idx[keep].view(n, k)
    val = torch.where(idx >= 0, val, torch.zeros((), dtype=val.dtype))
    return val.to(device), idx.to(device)


def _as_faiss_input(x: Tensor) -> Any:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


@KNN_BACKENDS.register("faiss")
@KNN_BACKENDS.register("faiss-hnsw")
def faiss_hnsw_topk(x: Tensor, k: int, *, exclude_self: bool = True,
                    block_size: int | None = None, memory_budget: int | None = None,
                    m: int = 32, ef_construction: int = 40, ef_search: int | None = None,
                    ) -> tuple[Tensor, Tensor]:
    """Approximate top-k with ``faiss.IndexHNSWFlat`` (inner product on unit rows).

    ``m`` links per node, ``ef_construction``/``ef_search`` beam widths (default
    search beam: max(64, 4k)); recall against exact search is measured in
    ``bench/knn_graph.py``. Deterministic only with one faiss thread.
    """
    faiss = _faiss()
    xs = _as_faiss_input(x)
    index = faiss.IndexHNSWFlat(xs.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(xs)
    index.hnsw.efSearch = max(ef_search or max(64, 4 * k), k + 1)
    return _faiss_search(index, xs, k, exclude_self, x.device)


@KNN_BACKENDS.register("faiss-ivf")
def faiss_ivf_topk(x: Tensor, k: int, *, exclude_self: bool = True,
                   block_size: int | None = None, memory_budget: int | None = None,
                   nlist: int | None = None, nprobe: int | None = None, seed: int = 0,
                   ) -> tuple[Tensor, Tensor]:
    """Approximate top-k with ``faiss.IndexIVFFlat`` (spherical k-means cells).

    Defaults: ``nlist`` = 4 sqrt(n) cells trained on a seeded sample of 64 points
    per cell, ``nprobe`` = max(16, nlist/32) cells searched per query.
    """
    faiss = _faiss()
    xs = _as_faiss_input(x)
    n, d = xs.shape
    nlist = nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.cp.seed = seed
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n, generator=g)[: min(n, 64 * nlist)].sort().values.numpy()
    index.train(xs[sample])
    index.add(xs)
    index.nprobe = min(nlist, nprobe or max(16, nlist // 32))
    return _faiss_search(index, xs, k, exclude_self, x.device)


# --------------------------------------------------------------------------- sparse assembly

def _coalesce(row: Tensor, col: Tensor, w: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Sort edges by (row, col) and sum duplicates (autograd-safe: ``index_add``)."""
    key = row * n + col
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    summed = w.new_zeros(uniq.shape[0]).index_add(0, inverse, w)
    return torch.stack([uniq // n, uniq % n]), summed


def _inverse_degree(edge_index: Tensor, w: Tensor, n: int, power: float) -> Tensor:
    """deg^power per node with deg = row sums of A; 0 where deg <= 0 (LATTICE: inf -> 0)."""
    deg = w.new_zeros(n).index_add(0, edge_index[0], w)
    positive = deg > 0
    safe = torch.where(positive, deg, torch.ones_like(deg))  # keeps gradients finite
    return torch.where(positive, safe.pow(power), torch.zeros_like(deg))


@NORMALIZATIONS.register("sym")
def _normalize_sym(edge_index: Tensor, w: Tensor, n: int) -> Tensor:
    d = _inverse_degree(edge_index, w, n, -0.5)
    return d[edge_index[0]] * w * d[edge_index[1]]  # D^-1/2 A D^-1/2 (LATTICE eq. 3)


@NORMALIZATIONS.register("row")
def _normalize_row(edge_index: Tensor, w: Tensor, n: int) -> Tensor:
    return _inverse_degree(edge_index, w, n, -1.0)[edge_index[0]] * w  # D^-1 A (MICRO "rw")


@NORMALIZATIONS.register("none")
def _normalize_none(edge_index: Tensor, w: Tensor, n: int) -> Tensor:
    return w
