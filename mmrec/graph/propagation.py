"""Sparse building blocks shared by the graph recommenders.

Every model here propagates on the user–item bipartite graph with users as nodes
``0..U-1`` and items as nodes ``U..U+I-1``. The adjacency is built once from the
scipy CSR interaction matrix, normalised on the edges (never as a dense
``(U+I)^2`` matrix) and kept as a torch sparse CSR tensor ``adj_t`` whose row
``i`` lists the weighted messages node ``i`` *receives* (torch-geometric's
``adj_t`` convention), so one propagation step is ``spmm(adj_t, x)``. The same
code runs on CPU and GPU: only torch ops, the sparse tensor moves with the module.

torch-geometric is imported where it is used: importing it costs seconds, and every
command imports this module through the model registry.
"""

from __future__ import annotations

import copy
import warnings
from typing import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.graph.multibehavior_sampling import multibehavior_batches
from mmrec.models.base import Recommender

NORMS = ("sym", "left", "none")


def bipartite_edge_index(matrix: sp.spmatrix) -> tuple[Tensor, int]:
    """``edge_index`` [2, 2E] of the undirected user–item graph (items offset by ``n_users``).

    Each interaction (u, i) gives the two directed edges u -> U+i and U+i -> u.
    """
    m = sp.coo_matrix(matrix)
    n_users, n_items = m.shape
    users = torch.from_numpy(m.row.astype(np.int64))
    items = torch.from_numpy(m.col.astype(np.int64)) + n_users
    src = torch.cat([users, items])
    dst = torch.cat([items, users])
    return torch.stack([src, dst]), n_users + n_items


def edge_weights(edge_index: Tensor, num_nodes: int, norm: str = "sym") -> Tensor:
    r"""Weights of the messages ``j -> i`` (``edge_index = [j; i]``).

    - ``sym``:  :math:`1/\sqrt{d_i d_j}` (LightGCN, Eq. 7 of He et al.; MB-GMN's ``transToLsts(norm=True)``)
    - ``left``: :math:`1/d_i`, i.e. :math:`D^{-1}A`, the mean of the neighbours (CIGF's default ``left``)
    - ``none``: 1
    """
    if norm not in NORMS:
        raise ConfigError(f"graph normalisation must be one of {', '.join(NORMS)}, not '{norm}'")
    from torch_geometric.utils import degree

    src, dst = edge_index
    ones = torch.ones(edge_index.size(1), dtype=torch.float64)
    if norm == "none":
        return ones.float()
    deg = degree(dst, num_nodes, dtype=torch.float64)  # undirected graph: in-degree == out-degree
    if norm == "left":
        return (1.0 / deg[dst]).float()
    return (deg[src].rsqrt() * deg[dst].rsqrt()).float()


def to_adj_t(edge_index: Tensor, weight: Tensor, num_nodes: int) -> Tensor:
    """Sparse CSR ``adj_t`` [N, N] with ``adj_t[i, j] = weight`` of the message ``j -> i``."""
    from torch_geometric.utils import to_torch_csr_tensor

    with warnings.catch_warnings():  # torch flags every CSR tensor as "beta"; it is what PyG uses
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")
        return to_torch_csr_tensor(edge_index.flip(0), weight, size=(num_nodes, num_nodes))


def normalized_adjacency(matrix: sp.spmatrix, norm: str = "sym") -> Tensor:
    """The normalised bipartite adjacency of a user x item matrix as sparse CSR ``adj_t``."""
    edge_index, n = bipartite_edge_index(matrix)
    return to_adj_t(edge_index, edge_weights(edge_index, n, norm), n)


class _SparsePropagate(torch.autograd.Function):
    """``adj_t @ x`` whose backward multiplies by a *precomputed* transpose.

    torch's own backward of ``sparse.mm`` transposes the CSR matrix at every call
    (forward + backward on Tmall's merged graph, 1.88M non-zeros, CPU: 2.5x slower at
    d=64, 5.6x at d=16); the graph is fixed, so the transpose is built once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, adj_t: Tensor, adj: Tensor) -> Tensor:  # type: ignore[override]
        ctx.adj = adj
        return torch.sparse.mm(adj_t, x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return torch.sparse.mm(ctx.adj, grad), None, None


def propagate(adj_t: Tensor, x: Tensor, adj: Tensor | None = None) -> Tensor:
    """One message-passing step ``adj_t @ x`` (sum aggregation), differentiable in ``x``.

    ``adj`` is the transpose of ``adj_t`` used by the backward pass; without it, this is
    torch-geometric's :func:`spmm` (torch then transposes at every backward).
    """
    if adj is None:
        from torch_geometric.utils import spmm

        return spmm(adj_t, x, reduce="sum")
    return _SparsePropagate.apply(x, adj_t, adj)


class SparseGraphs(nn.Module):
    """One or more normalised adjacencies (and their transposes) as non-persistent buffers.

    They follow ``module.to(device)`` but stay out of ``state_dict``: the graph is
    data, rebuilt from the dataset, not a weight. ``graphs.propagate(k, x)`` is one
    step on graph k; a symmetric normalisation stores a single matrix for both
    directions.
    """

    def __init__(self, matrices: Iterable[sp.spmatrix], norm: str = "sym") -> None:
        super().__init__()
        self.n = 0
        self.norm = norm
        for k, m in enumerate(matrices):
            edge_index, n_nodes = bipartite_edge_index(m)
            w = edge_weights(edge_index, n_nodes, norm)
            self.register_buffer(f"adj_t_{k}", to_adj_t(edge_index, w, n_nodes), persistent=False)
            if norm == "left":  # D^-1 A is not symmetric: keep (D^-1 A)^T for the backward pass
                self.register_buffer(f"adj_{k}", to_adj_t(edge_index.flip(0), w, n_nodes), persistent=False)
            self.n += 1

    def __len__(self) -> int:
        return self.n

    def __deepcopy__(self, memo: dict) -> "SparseGraphs":
        """torch can't deepcopy sparse CSR tensors (no storage); clone them instead."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_buffers":
                value = {k: (b.clone() if b is not None else None) for k, b in value.items()}
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def adj_t(self, k: int) -> Tensor:
        return getattr(self, f"adj_t_{k}")

    def propagate(self, k: int, x: Tensor) -> Tensor:
        adj_t = self.adj_t(k)
        adj = getattr(self, f"adj_{k}") if self.norm == "left" else adj_t
        return propagate(adj_t, x.to(adj_t.dtype), adj)


def behavior_adjacencies(data: Dataset, norm: str) -> SparseGraphs:
    """One normalised bipartite adjacency per behavior, in cascade order."""
    return SparseGraphs((data.matrix(b) for b in range(data.n_behaviors)), norm)


# -- content in ------------------------------------------------------------------
def item_content_projection(data: Dataset, config) -> nn.Module | None:
    r"""The item content encoder a graph model asked for with ``use_features``, or None.

    :math:`\mathbf{c}_i` = fusion over modalities of the projected (and, with a
    filtration, purified) features (:mod:`mmrec.fusion.content`); the models add it to
    the item ID embedding at layer 0.
    """
    if not getattr(config, "use_features", False):
        return None
    from mmrec.fusion.content import build_item_content

    return build_item_content(data, config.dim, config)


def embedding_and_fc_l2(model: nn.Module) -> Tensor:
    """Σ‖θ‖² over embedding tables and linear-layer weights (biases excluded).

    What the TensorFlow references of CIGF and MB-GMN regularise (``Regularize()`` over
    their ``reg=True`` parameters): whole tables, every step, not only the batch's rows.
    """
    total = torch.zeros((), device=model.device if isinstance(model, Recommender) else None)
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.Linear)):
            total = total + m.weight.pow(2).sum()
    return total


# -- the eval cache every graph model shares -------------------------------------------
def _drop_cache(module: "GraphRecommender", incompatible_keys) -> None:
    """load_state_dict post-hook (a module-level function so models stay picklable)."""
    module._clear_cache()


class GraphRecommender(Recommender):
    """A recommender whose scoring needs a full-graph forward pass.

    ``prepare_eval()`` runs the propagation once (under ``no_grad``) and caches what
    :meth:`representations` returns; ``loss()`` (via :meth:`_fresh`), switching to
    training mode, loading weights or moving the module drop the cache, so scores
    never come from stale embeddings. Without a cache, scoring propagates on the fly.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[Tensor, ...] | None = None
        self.step_representations: tuple[Tensor, ...] | None = None
        self._step = 0                                           # counted by on_batch (the trainer's steps)
        self._step_memo: tuple[int, tuple[Tensor, ...]] | None = None
        self.register_load_state_dict_post_hook(_drop_cache)

    def compute_representations(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _clear_cache(self) -> None:
        self._cache = None
        self._step_memo = None

    def on_batch(self, batch: dict[str, Tensor]) -> None:
        """A new training step: representations computed in it are shared by its callers (:meth:`_fresh`)."""
        super().on_batch(batch)
        self._step += 1
        self._step_memo = None

    def _fresh(self) -> tuple[Tensor, ...]:
        """Representations with gradients for a training step (drops the eval cache).

        A detached view of them stays in ``step_representations`` until the next step, so
        a model stacked on this one (``history``) can score with this step's weights
        without propagating again. Within one trainer step (between two :meth:`on_batch`
        calls) a second call returns the same tensors, gradients attached: a head trained end
        to end on this backbone and the backbone's own loss share one propagation (and one
        dropout draw). Without ``on_batch`` (a plain loop calling ``loss``) every call propagates.
        """
        self._cache = None
        if self._step_memo is not None and self._step_memo[0] == self._step and self.training:
            return self._step_memo[1]
        reps = self.compute_representations()
        self.step_representations = tuple(t.detach() for t in reps)
        self._step_memo = (self._step, reps) if self._step > 0 and self.training else None
        return reps

    def representations(self) -> tuple[Tensor, ...]:
        return self._cache if self._cache is not None else self.compute_representations()

    @torch.no_grad()
    def prepare_eval(self) -> None:
        self._step_memo = None
        self._cache = tuple(t.detach() for t in self.compute_representations())

    def train(self, mode: bool = True) -> "GraphRecommender":
        if mode:
            self._cache = None
        self._step_memo = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .double(): the cache is stale
        self._cache = None
        self._step_memo = None
        return super()._apply(fn, recurse)


class MultiBehaviorGraphRecommender(GraphRecommender):
    """Shared plumbing of CIGF and MB-GMN: per-behavior sampling, ego embeddings, L2.

    Subclasses own ``user_emb``, ``item_emb``, ``content`` (optional feature projection)
    and a ``config`` with ``samples_per_user`` / ``users_per_epoch``.
    """

    def training_batches(self, data: Dataset, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, Tensor]]:
        """Per-behavior triples for ``batch_size`` users (``samples_per_user`` each, as the references)."""
        yield from multibehavior_batches([data.matrix(b) for b in range(data.n_behaviors)], batch_size,
                                         self.config.samples_per_user, rng, self.config.users_per_epoch)

    def ego_embeddings(self) -> Tensor:
        """Layer-0 embeddings of users then items (item IDs plus projected content, if any)."""
        items = self.item_emb.weight
        if self.content is not None:
            items = items + self.content(id_emb=items)
        return torch.cat([self.user_emb.weight, items])

    def regularizer(self) -> Tensor:
        """Σ‖θ‖² of what the references regularise: embedding tables and FC weights."""
        return embedding_and_fc_l2(self)
