r"""What VBPR, LATTICE, MICRO and FREEDOM share: sparse graphs, the LightGCN backbone, cold items.

- :class:`UserItemGraph`: the user–item adjacency (users ``0..U-1``, items ``U..U+I-1``)
  in the normalisation a paper's code uses, plus an optional *training* adjacency
  re-sampled every epoch by an edge filtration (``edge-prune``); evaluation always
  propagates on the full graph.
- :class:`ItemGraph`: a sparse item–item matrix ``A`` (``h ← A h``) given by its edge list.
  With differentiable edge weights (LATTICE's learned graph) it propagates with
  ``index_add`` so gradients reach the weights; frozen weights propagate with a CSR
  ``spmm`` and a precomputed transpose. Nothing of size N×N is ever formed.
- :class:`ContentGraphRecommender`: user/item ID embeddings, the warm-item mask and the
  scoring plumbing of the graph models.
- :func:`spmm_rows` / :meth:`ContentGraphRecommender.ui_propagate_rows`: the last
  propagation step for the batch's rows only (its earlier layers in full), for models
  whose loss reads nothing but the batch's final embeddings (FREEDOM).

**Cold items.** An item without a training interaction has an ID embedding that no
positive pair ever trained, so its random initial value is noise. These models multiply
the item ID table by a *warm mask* (1 for items with a training interaction of the target
behavior, 0 otherwise), in training and scoring alike, so a cold item's representation is
built from content only: through the item–item graph (its content neighbours' ID
embeddings) in LATTICE/MICRO/FREEDOM, through ``θ_uᵀ E f_i`` in VBPR.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.datasets.sampling import bpr_batches
from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.fusion.content import FrozenFeatures, ItemContentEncoder, feature_tables, import_all_fusions
from mmrec.graph.propagation import GraphRecommender, SparseGraphs, propagate, to_adj_t
from mmrec.registry import FILTRATIONS
from mmrec.models.base import InnerProductScoring

UI_NORMS = ("sym", "mean-self")


# -- user–item graph ---------------------------------------------------------------------

def ui_adjacency(users: Tensor, items: Tensor, n_users: int, n_items: int, norm: str) -> tuple[Tensor, Tensor]:
    r"""(``adj_t``, its transpose) of the bipartite graph of the given interactions.

    - ``sym``: :math:`D^{-1/2} A D^{-1/2}` (LightGCN Eq. 7; FREEDOM's ``get_norm_adj_mat`` and,
      on the kept edges, ``_normalize_adj_m``): symmetric, one matrix serves both directions;
    - ``mean-self``: :math:`D^{-1}(A + I)` with D the row sums of A + I (the ``norm_adj`` of
      LATTICE's and MICRO's ``load_data.py``, which their LightGCN backbone propagates on).
    """
    if norm not in UI_NORMS:
        raise ConfigError(f"user-item graph normalisation must be one of {', '.join(UI_NORMS)}, not '{norm}'")
    n = n_users + n_items
    it = items + n_users
    src = torch.cat([users, it])
    dst = torch.cat([it, users])
    if norm == "mean-self":
        loops = torch.arange(n, dtype=src.dtype)
        src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
    deg = torch.bincount(dst, minlength=n).to(torch.float64)
    if norm == "sym":
        w = (deg[src] * deg[dst]).rsqrt().float()
        edge_index = torch.stack([src, dst])
        adj_t = to_adj_t(edge_index, w, n)
        return adj_t, adj_t
    w = (1.0 / deg[dst]).float()                 # row i of D^-1 (A+I): messages i receives, / d_i
    edge_index = torch.stack([src, dst])
    return to_adj_t(edge_index, w, n), to_adj_t(edge_index.flip(0), w, n)


def rows_csr(adj_t: Tensor, rows: Tensor) -> Tensor:
    """The CSR sub-matrix ``adj_t[rows]`` [len(rows), N] (index arrays only; no dense work)."""
    crow, col, val = adj_t.crow_indices(), adj_t.col_indices(), adj_t.values()
    start = crow[rows]
    count = crow[rows + 1] - start
    ends = torch.cumsum(count, 0)
    seg = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), count)  # sub-row of each edge
    edge = start[seg] + torch.arange(seg.numel(), device=rows.device) - (ends - count)[seg]
    sub_crow = torch.cat([ends.new_zeros(1), ends])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(sub_crow, col[edge], val[edge], (rows.numel(), adj_t.shape[1]))


def spmm_rows(adj_t: Tensor, rows: Tensor, x: Tensor) -> Tensor:
    """``(adj_t @ x)[rows]`` from those CSR rows only: O(nnz of the rows · d), differentiable in ``x``.

    A BPR step reads the final embeddings of its batch's users and items only, so the
    last propagation step (and its backward) needs the batch's rows of the adjacency,
    not all of it: a CSR ``spmm`` on the sub-matrix of those rows (torch's backward
    transposes that small matrix). Same sums as the full product.
    """
    return torch.sparse.mm(rows_csr(adj_t, rows), x.to(adj_t.dtype))


class UserItemGraph(SparseGraphs):
    """Graph 0: the full normalised adjacency; graph 1: the one training propagates on.

    Without an edge filtration both are the same matrix. With one, :meth:`resample`
    draws the kept edges for the coming epoch and normalises them afresh (FREEDOM's
    ``pre_epoch_processing``). Buffers are non-persistent: the graph is data.
    """

    def __init__(self, matrix: sp.spmatrix, norm: str = "sym", pruning=None) -> None:
        nn.Module.__init__(self)
        m = sp.coo_matrix(matrix)
        self.n_users, self.n_items = m.shape
        self.n = 2
        self.norm = norm
        self.pruning = pruning
        self.register_buffer("users", torch.from_numpy(m.row.astype(np.int64)), persistent=False)
        self.register_buffer("items", torch.from_numpy(m.col.astype(np.int64)), persistent=False)
        adj_t, adj = ui_adjacency(self.users, self.items, self.n_users, self.n_items, norm)
        self.register_buffer("adj_t_0", adj_t, persistent=False)
        self.register_buffer("adj_0", None if adj is adj_t else adj, persistent=False)  # None: symmetric
        if pruning is not None:  # the full graph until the first resample()
            self.register_buffer("adj_t_1", adj_t, persistent=False)
            self.register_buffer("adj_1", None if adj is adj_t else adj, persistent=False)
        self.kept_edges = int(self.users.numel())

    def resample(self, generator: torch.Generator | None = None) -> None:
        """Draw the training graph of the next epoch (no-op without an edge filtration)."""
        if self.pruning is None:
            return
        keep = self.pruning.sample(self.users.cpu(), self.items.cpu(), self.n_users, self.n_items, generator)
        adj_t, adj = ui_adjacency(self.users.cpu()[keep], self.items.cpu()[keep], self.n_users, self.n_items,
                                  self.norm)
        device = self.adj_t_0.device
        self.adj_t_1 = adj_t.to(device)
        self.adj_1 = None if adj is adj_t else adj.to(device)
        self.kept_edges = int(keep.numel())

    def propagate(self, k: int, x: Tensor) -> Tensor:
        """One step on graph k (0: full; 1: this epoch's training graph, the full one without pruning)."""
        if k == 1 and self.pruning is None:
            k = 0
        adj_t = self.adj_t(k)
        adj = getattr(self, f"adj_{k}")
        return propagate(adj_t, x.to(adj_t.dtype), adj_t if adj is None else adj)

    def propagate_rows(self, k: int, rows: Tensor, x: Tensor) -> Tensor:
        """``propagate(k, x)[rows]``, computed from those rows of the adjacency only."""
        if k == 1 and self.pruning is None:
            k = 0
        return spmm_rows(self.adj_t(k), rows, x)


def edge_filtration(config) -> tuple[str | None, object | None]:
    """Split ``config.filtration`` into (feature filtration name, edge filtration instance)."""
    name = getattr(config, "filtration", None)
    if not name:
        return None, None
    import_all_fusions()
    cls = FILTRATIONS.get(name)
    if getattr(cls, "kind", "features") != "edges":
        return name, None
    return None, cls(getattr(config, "prune_ratio", 0.8))


# -- item–item graph ---------------------------------------------------------------------

class ItemGraph:
    r"""A sparse item–item matrix :math:`A` (``A[row, col]``; ``h ← A h``) as an edge list.

    If ``weight`` requires grad, :meth:`propagate` is ``index_add`` over the edges
    (O(E·d) time and memory, gradients to both ``weight`` and ``x``); otherwise it is a
    CSR ``spmm`` whose backward uses a transpose built once.
    """

    def __init__(self, edge_index: Tensor, weight: Tensor, num_nodes: int) -> None:
        self.edge_index, self.weight, self.num_nodes = edge_index, weight, num_nodes
        self._csr: tuple[Tensor, Tensor] | None = None

    @property
    def nnz(self) -> int:
        return int(self.edge_index.shape[1])

    def __deepcopy__(self, memo: dict) -> "ItemGraph":
        """torch can't deepcopy CSR tensors: copy the edge list, rebuild the CSR lazily."""
        return ItemGraph(self.edge_index.clone(), self.weight.detach().clone(), self.num_nodes)

    def detach(self) -> "ItemGraph":
        return ItemGraph(self.edge_index, self.weight.detach(), self.num_nodes)

    def csr(self) -> tuple[Tensor, Tensor]:
        if self._csr is None:
            row, col = self.edge_index
            w = self.weight.detach().float()
            self._csr = (to_adj_t(torch.stack([col, row]), w, self.num_nodes),   # adj_t[row, col] = w
                         to_adj_t(torch.stack([row, col]), w, self.num_nodes))   # its transpose
        return self._csr

    def propagate(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad and torch.is_grad_enabled():
            row, col = self.edge_index
            msg = self.weight.to(x.dtype).unsqueeze(1) * x[col]
            return x.new_zeros(self.num_nodes, x.shape[1]).index_add(0, row, msg)
        adj_t, adj = self.csr()
        return propagate(adj_t, x.to(adj_t.dtype), adj)


class FrozenItemGraph(SparseGraphs):
    """A fixed item–item matrix as CSR buffers (moves with the model; FREEDOM's frozen graph)."""

    def __init__(self, edge_index: Tensor, weight: Tensor, num_nodes: int) -> None:
        nn.Module.__init__(self)
        self.n, self.norm = 1, "none"
        self.nnz = int(edge_index.shape[1])
        adj_t, adj = ItemGraph(edge_index, weight.detach(), num_nodes).csr()
        self.register_buffer("adj_t_0", adj_t, persistent=False)
        self.register_buffer("adj_0", adj, persistent=False)

    def propagate(self, k: int, x: Tensor) -> Tensor:
        return propagate(self.adj_t_0, x.to(self.adj_t_0.dtype), self.adj_0)

    def propagate_rows(self, rows: Tensor, x: Tensor) -> Tensor:
        """``propagate(0, x)[rows]`` from those rows only (a step that needs a batch's items)."""
        return spmm_rows(self.adj_t_0, rows, x)


def mix_graphs(graphs: list[tuple[Tensor | float, Tensor, Tensor]], num_nodes: int) -> tuple[Tensor, Tensor]:
    """``Σ c_g A_g`` of sparse matrices given as (coefficient, edge_index, weight): union of edges, summed."""
    from torch_geometric.utils import coalesce

    index = torch.cat([ei for _, ei, _ in graphs], dim=1)
    weight = torch.cat([c * w for c, _, w in graphs])
    return coalesce(index, weight, num_nodes=num_nodes, reduce="sum")


# -- base model ----------------------------------------------------------------------------

def warm_items(data: Dataset) -> Tensor:
    """bool [n_items]: items with at least one training interaction of the target behavior."""
    counts = np.asarray(data.matrix().sum(axis=0)).ravel()
    return torch.from_numpy(counts > 0)


def frozen_source(data: Dataset, config) -> FrozenFeatures:
    return FrozenFeatures(feature_tables(data, getattr(config, "features", None),
                                         what=f"{type(config).__name__} needs item features"))


def content_encoder(source: nn.Module, dim: int, fusion: str = "sum",
                    feature_filtration: str | None = None, modality_dropout: float = 0.0,
                    **enhancement: Any) -> ItemContentEncoder:
    """The shared encoder (projection per modality, optional feature filtration, a fusion, and the
    ``enhancement_args(config)`` of a model that applies a feature enhancement)."""
    return ItemContentEncoder(source, dim, fusion, feature_filtration, modality_dropout=modality_dropout,
                              **enhancement)


def filtration_uses_id(name: str | None) -> bool:
    """Whether feature filtration ``name`` reads the item ID embedding (then its size must match)."""
    if not name:
        return False
    import_all_fusions()
    return bool(getattr(FILTRATIONS.get(name), "uses_id", True))


def bpr(pos: Tensor, neg: Tensor) -> Tensor:
    """-mean ln σ(pos - neg) (BPR; softplus form is the same number, stable)."""
    return F.softplus(neg - pos).mean()


class ContentGraphRecommender(InnerProductScoring, GraphRecommender):
    """User/item ID embeddings on a (LightGCN) user–item backbone, cold items from content.

    Subclasses set ``self.graph`` (a :class:`UserItemGraph`), ``self.encoder`` (a
    ``LightGCNEncoder``) and implement :meth:`compute_representations`.
    """

    content_aware = True

    def __init__(self, n_users: int, n_items: int, dim: int, warm: Tensor) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        self.register_buffer("warm", warm.float().unsqueeze(1), persistent=False)

    def reset_embeddings(self) -> None:
        """Xavier-uniform ID tables, as the official LATTICE / MICRO / FREEDOM codes."""
        nn.init.xavier_uniform_(self.user_emb.weight)
        nn.init.xavier_uniform_(self.item_emb.weight)

    def item_id_weight(self) -> Tensor:
        """Item ID embeddings with cold items' rows zeroed (no interaction ever trained them)."""
        return self.item_emb.weight * self.warm

    def ui_propagate(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """LightGCN over the user–item graph: the pruned one in training, the full one otherwise."""
        x = torch.cat([self.user_emb.weight, items])
        out = self.encoder(x, self.graph, 1 if self.training else 0)
        return out[: self.n_users], out[self.n_users:]

    def ui_propagate_rows(self, items: Tensor, user_rows: Tensor, item_rows: Tensor) -> tuple[Tensor, Tensor]:
        """``ui_propagate(items)`` at the given users and items only (a training step's batch).

        LightGCN's output is Σ_l α_l A^l x; every layer but the last is computed in full
        (the next one reads all of it), the last one for the wanted rows only
        (:func:`spmm_rows`), and the layer mean is taken on those rows: the same numbers
        as :meth:`ui_propagate`, with the last ``spmm`` and its backward shrunk to the
        batch's edges. Uses the training graph when training, as ``ui_propagate``.
        """
        x = torch.cat([self.user_emb.weight, items])
        rows = torch.cat([user_rows, item_rows + self.n_users])
        k = 1 if self.training else 0
        alpha, layers = self.encoder.alpha, self.encoder.layers
        out = x[rows] * alpha[0]
        for layer in range(layers):
            if layer == layers - 1:
                out = out + self.graph.propagate_rows(k, rows, x) * alpha[layer + 1]
            else:
                x = self.graph.propagate(k, x)
                out = out + x[rows] * alpha[layer + 1]
        return out[: user_rows.numel()], out[user_rows.numel():]

    # -- training ---------------------------------------------------------------------
    def training_batches(self, data: Dataset, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, Tensor]]:
        """Start of an epoch: re-sample the pruned graph (seeded from ``rng``), then BPR triples."""
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        self.graph.resample(gen)
        self.start_epoch()
        yield from bpr_batches(data.matrix(), batch_size, rng)

    def start_epoch(self) -> None:
        """Hook for per-epoch work (LATTICE/MICRO: learn the item graph at the next step)."""


def check_positive(name: str, value: float | int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"model.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


__all__ = ["ContentGraphRecommender", "FrozenItemGraph", "ItemGraph", "UserItemGraph", "UI_NORMS", "bpr",
           "check_positive", "content_encoder", "edge_filtration", "filtration_uses_id", "frozen_source", "mix_graphs",
           "rows_csr", "spmm_rows", "ui_adjacency", "warm_items"]
