"""MB-GMN: Graph Meta Network for Multi-Behavior Recommendation (Xia et al., SIGIR 2021).

Reference code: github.com/akaxlh/MB-GMN (TensorFlow; ``labcode.py``: ``metaForSpecialize``,
``specialize``, ``defineModel``, ``metaForPredict``, ``_predict``; ``NNLayers.lightSelfAttention``).
Three parts:

* **Meta-knowledge learner**: for behavior k and node v, meta-knowledge
  ``φ([b_k ‖ e_v ‖ Σ_{j∈N_k(v)} ê_j])`` generates a node- and behavior-specific
  low-rank transform ``W_{v,k} = W¹_{v,k} W²_{v,k}`` that specialises the node embedding.
* **Behavior-aware graph meta network**: one graph branch per behavior on the
  specialised embeddings, plus a multi-behavior branch whose every layer propagates on
  each behavior's graph and mixes the K messages with multi-head self-attention
  across behaviors.
* **Meta prediction network**: for a source representation (any of the K+1 branches)
  and a target behavior, the pair's meta-knowledge generates the weights of a
  per-sample two-layer predictor. Trained with a pairwise hinge loss over every
  (source, target) combination; the target behavior is scored from the
  multi-behavior branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.graph.propagation import (MultiBehaviorGraphRecommender, SparseGraphs, behavior_adjacencies,
                                     item_content_projection)
from mmrec.fusion.content import ContentFields
from mmrec.models.base import ModelConfig
from mmrec.registry import MODELS


@dataclass
class MBGMNConfig(ContentFields, ModelConfig):
    """Defaults: akaxlh/MB-GMN ``Params.py`` (Beibei; README: ``rank 2`` for Tmall and IJCAI)."""

    dim: int = 16               # latdim 32 // 2: ID embedding size; branch representations are 2*dim
    layers: int = 2             # gnn_layer
    rank: int = 4               # rank of the generated transforms W¹ [d, r], W² [r, d]
    heads: int = 2              # att_head of the behavior self-attention
    reg: float = 1e-2           # × Σ‖θ‖² of embedding tables and FC weights (the code's Regularize())
    mult: float = 100.0         # score multiplier of the reference code (args.mult)
    leaky: float = 0.1          # LeakyReLU slope of the reference NNLayers
    margin: float = 1.0         # hinge margin: max(0, margin - (ŷ_pos - ŷ_neg))
    target_weight: float = 1.0  # weight of the terms whose target is the target behavior (code: 1)
    samples_per_user: int = 40  # sampNum
    users_per_epoch: int = 0    # trnNum (code: 10000); 0 = every user with an interaction
    score_chunk: int = 16384    # pairs per chunk when scoring without gradients (bounds memory)
    fast: bool = True           # False: the previous implementation (kept as the reference for tests and bench)


def _xavier_bias(bias: Tensor) -> None:
    """The reference's ``biasInitializer='xavier'``: a [1, out] xavier draw."""
    bound = math.sqrt(6.0 / (1 + bias.numel()))
    nn.init.uniform_(bias, -bound, bound)


class LowRankGenerator(nn.Module):
    """Generates per-node factors W¹ [N, d, r] and W² [N, r, d] from meta-knowledge [N, d]."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.dim, self.rank = dim, rank
        self.first = nn.Linear(dim, dim * rank)
        self.second = nn.Linear(dim, rank * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.first, self.second):
            nn.init.xavier_uniform_(lin.weight)
            _xavier_bias(lin.bias)

    def forward(self, meta: Tensor, x: Tensor) -> Tensor:
        """x [N, d] -> (x W¹) W² [N, d].

        As broadcast products rather than ``bmm`` on [N, 1, d]: a batch of N
        d×r matrix-vector products is too small for a BLAS call each (3x faster on CPU).
        """
        w1 = self.first(meta).view(-1, self.dim, self.rank)
        w2 = self.second(meta).view(-1, self.rank, self.dim)
        t = (x.unsqueeze(2) * w1).sum(1)                 # x W¹ [N, r]
        return (t.unsqueeze(2) * w2).sum(1)              # (x W¹) W² [N, d]


class MetaKnowledgeLearner(nn.Module):
    r"""Behavior-specific node specialisation (reference ``metaForSpecialize`` + ``specialize``).

    .. math::
        \mathbf{m}_{v,k} = \sigma\big(\mathbf{W}_m[\mathbf{b}_k \,\|\, \mathbf{e}_v \,\|\,
            \textstyle\sum_{j\in\mathcal{N}_k(v)} \hat{A}^k_{vj}\mathbf{e}_j] + \mathbf{c}\big),\qquad
        \tilde{\mathbf{e}}_{v,k} = \big[\mathbf{e}_v \mathbf{W}^{1}(\mathbf{m}_{v,k})\,\mathbf{W}^{2}(\mathbf{m}_{v,k})
            \,\|\, \mathbf{e}_v\big]

    σ = LeakyReLU. The meta layer is shared by users and items; users and items have
    their own generators (``specMeta_FC2..5``). Output dim: 2d.
    """

    def __init__(self, dim: int, rank: int, leaky: float = 0.1) -> None:
        super().__init__()
        self.meta = nn.Linear(3 * dim, dim)
        self.user_gen = LowRankGenerator(dim, rank)
        self.item_gen = LowRankGenerator(dim, rank)
        self.leaky = leaky
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.meta.weight)
        nn.init.zeros_(self.meta.bias)
        self.user_gen.reset_parameters()
        self.item_gen.reset_parameters()

    def forward(self, ego: Tensor, neighbors: Tensor, behavior: Tensor, n_users: int) -> Tensor:
        """ego, neighbors [U+I, d], behavior embedding [d] -> specialised [U+I, 2d]."""
        meta = F.leaky_relu(self.meta(torch.cat([behavior.expand_as(ego), ego, neighbors], -1)), self.leaky)
        spec = torch.cat([self.user_gen(meta[:n_users], ego[:n_users]),
                          self.item_gen(meta[n_users:], ego[n_users:])])
        return torch.cat([spec, ego], -1)


class BehaviorSelfAttention(nn.Module):
    r"""Multi-head self-attention across the K behavior messages of a node (``lightSelfAttention``).

    .. math::
        a^{h}_{kj} = \operatorname{softmax}_j\Big(\frac{\langle (\mathbf{m}_k\mathbf{Q})^{h},
            (\mathbf{m}_j\mathbf{Q})^{h}\rangle}{\sqrt{D/H}}\Big),\qquad
        \mathbf{o}_k = \big\Vert_{h}\sum_j a^{h}_{kj}\,\mathbf{m}^{h}_j + \mathbf{m}_k

    Queries and keys share one projection Q; values are the messages themselves.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"representation size {dim} is not divisible by model.heads={heads}")
        self.heads = heads
        self.Q = nn.Parameter(torch.empty(dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.Q)

    def attention(self, msgs: Tensor) -> Tensor:
        """Attention [N, H, K(query), K(key)] of messages [N, K, D]; rows sum to 1."""
        n, k, d = msgs.shape
        q = (msgs @ self.Q).view(n, k, self.heads, d // self.heads)
        return torch.einsum("nkhc,njhc->nhkj", q, q).div(math.sqrt(d / self.heads)).softmax(-1)

    def forward(self, msgs: Tensor, fast: bool = True) -> Tensor:
        n, k, d = msgs.shape
        if fast:  # K is small (3): broadcast products beat K x K batched matrix products (1.5x)
            q = (msgs @ self.Q).view(n, k, self.heads, d // self.heads)
            att = (q.unsqueeze(2) * q.unsqueeze(1)).sum(-1).div(math.sqrt(d / self.heads)).softmax(2)  # [n, k, j, h]
            v = msgs.view(n, 1, k, self.heads, d // self.heads)
            return (att.unsqueeze(-1) * v).sum(2).reshape(n, k, d) + msgs
        att = self.attention(msgs)
        v = msgs.view(n, k, self.heads, d // self.heads)
        return torch.einsum("nhkj,njhc->nkhc", att, v).reshape(n, k, d) + msgs


class GraphMetaNetwork(nn.Module):
    r"""Behavior-aware graph meta network: K behavior branches + one multi-behavior branch.

    Behavior branch k (on the specialised :math:`\tilde{E}_k`):
    :math:`\mathbf{h}^{(l)} = \sigma(\hat{A}^k\mathbf{h}^{(l-1)}) + \mathbf{h}^{(l-1)}`.
    Multi-behavior branch (on :math:`\tilde{E}_{K+1}`, meta-knowledge from all behaviors):
    :math:`\mathbf{h}^{(l)} = \sum_k \mathrm{SelfAtt}_l\big([\sigma(\hat{A}^{k'}\mathbf{h}^{(l-1)})]_{k'}\big)_k`.
    Each branch returns :math:`\sum_{l=0}^{L}\mathbf{h}^{(l)}`; users and items have their own attention.
    """

    def __init__(self, dim: int, n_behaviors: int, layers: int, rank: int, heads: int, leaky: float) -> None:
        super().__init__()
        self.n_behaviors, self.layers, self.leaky = n_behaviors, layers, leaky
        self.behavior_emb = nn.Parameter(torch.empty(n_behaviors + 1, dim))
        self.meta = MetaKnowledgeLearner(dim, rank, leaky)
        self.user_att = nn.ModuleList(BehaviorSelfAttention(2 * dim, heads) for _ in range(layers))
        self.item_att = nn.ModuleList(BehaviorSelfAttention(2 * dim, heads) for _ in range(layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.behavior_emb)
        self.meta.reset_parameters()
        for att in (*self.user_att, *self.item_att):
            att.reset_parameters()

    def messages(self, graphs: SparseGraphs, h: Tensor) -> Tensor:
        """σ(Â_k h) of every behavior k, stacked [N, K, D]."""
        return torch.stack([F.leaky_relu(graphs.propagate(k, h), self.leaky) for k in range(len(graphs))], 1)

    def attend(self, layer: int, msgs: Tensor, n_users: int, fast: bool = True) -> Tensor:
        """Self-attention across behaviors (users and items apart), summed over behaviors."""
        return torch.cat([self.user_att[layer](msgs[:n_users], fast).sum(1),
                          self.item_att[layer](msgs[n_users:], fast).sum(1)])

    def forward(self, ego: Tensor, graphs: SparseGraphs, n_users: int, fast: bool = True) -> Tensor:
        """[K+1, U+I, 2d]: branches 0..K-1 per behavior, branch K multi-behavior."""
        neighbors = [graphs.propagate(k, ego) for k in range(len(graphs))]
        outs = []
        for k in range(len(graphs)):
            h = self.meta(ego, neighbors[k], self.behavior_emb[k], n_users)
            total = h
            for _ in range(self.layers):
                h = F.leaky_relu(graphs.propagate(k, h), self.leaky) + h
                total = total + h
            outs.append(total)
        h = self.meta(ego, sum(neighbors), self.behavior_emb[-1], n_users)
        total = h
        for layer in range(self.layers):
            h = self.attend(layer, self.messages(graphs, h), n_users, fast)
            total = total + h
        outs.append(total)
        return torch.stack(outs)


def _ones_column(x: Tensor) -> Tensor:
    """[x ‖ 1] with one extra all-zero row at the end (the padding row of the bucketed layout)."""
    out = x.new_zeros(x.size(0) + 1, x.size(1) + 1)
    out[:-1, :-1] = x
    out[:-1, -1] = 1
    return out


def group_buckets(group: Tensor, n_groups: int, max_rows: int = 4096,
                  max_groups: int = 64) -> list[tuple[Tensor, Tensor]]:
    """Pairs of each group, padded into buckets for batched matrix products.

    Returns ``(group id [g], pair index [g, n])`` per bucket; the index is ``P`` (one
    past the last pair) in padded slots. A group larger than ``max_rows`` is split
    into pieces that share its id. Pieces are sorted by size before bucketing, so the
    padding is small; a bucket holds at most ``max_groups`` pieces and about
    ``max_rows`` padded rows.
    """
    P = group.numel()
    dev = group.device
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    n_pieces = (counts + max_rows - 1) // max_rows
    piece_group = torch.repeat_interleave(torch.arange(n_groups, device=dev), n_pieces)
    first_piece = torch.cumsum(n_pieces, 0) - n_pieces
    rank = torch.arange(piece_group.numel(), device=dev) - first_piece[piece_group]
    piece_start = starts[piece_group] + rank * max_rows
    piece_len = torch.clamp(counts[piece_group] - rank * max_rows, max=max_rows)
    by_len = torch.argsort(piece_len, stable=True)
    piece_group, piece_start, piece_len = piece_group[by_len], piece_start[by_len], piece_len[by_len]
    buckets, lens, b0 = [], piece_len.tolist(), 0
    for b in range(1, len(lens) + 1):  # greedy: ascending lengths, so a bucket's last piece is its longest
        if b == len(lens) or b - b0 >= max_groups or (b - b0 + 1) * lens[b] > max_rows:
            n = lens[b - 1]
            offs = torch.arange(n, device=dev)
            idx = piece_start[b0:b, None] + offs
            valid = offs < piece_len[b0:b, None]
            buckets.append((piece_group[b0:b], torch.where(valid, order[idx.clamp(max=P - 1)], P)))
            b0 = b
    return buckets


def _pair_tensor(user: Tensor, weight: Tensor, user_block: Tensor, bias: Tensor | None = None) -> Tensor:
    """H [g, C+1, D+1, J] such that Σ_{c,a} m'_c i'_a H[c,a,j] = Σ_{c,a} m'_c x_a Ĝ[c,a,j].

    ``x = [u ⊙ i ‖ u ‖ i]`` (u = ``user`` [g, D]), ``m' = [m ‖ 1]``, ``i' = [i ‖ 1]``,
    ``weight`` = Ĝ [C+1, 3D, J]: the ⊙ and item blocks fold into H[:, :, :D] and the
    user block (``user_block`` = Ĝ[:, D:2D] as [D, (C+1)·J]) into H[:, :, D], the
    coefficient of i'_D = 1. ``bias`` [C+1, J] (fast path: the generator of b₁(m)) adds
    to that row, so that the same products give x_sᵀW₁(m) + b₁(m).
    """
    g, d = user.shape
    c1, j = weight.size(0), weight.size(2)
    h = user.new_empty(g, c1, d + 1, j)
    torch.addcmul(weight[None, :, 2 * d:], user[:, None, :, None], weight[None, :, :d], out=h[:, :, :d])
    if bias is None:
        h[:, :, d] = (user @ user_block).view(g, c1, j)
    else:
        h[:, :, d] = torch.addmm(bias.reshape(1, c1 * j), user, user_block).view(g, c1, j)
    return h


def _bucket_products(m: Tensor, item: Tensor, user: Tensor, weight: Tensor, bias: Tensor | None,
                     buckets: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Forward of both generated layers: x_pᵀW(m_p) (+ b(m_p) when ``bias`` is given) bucket by bucket.

    Padded rows of a bucket point at the extra last row of ``m`` / ``item`` (index P), whose
    output is dropped.
    """
    d = item.size(1)
    mp, ip = _ones_column(m), _ones_column(item)
    c1, d1, j = weight.size(0), d + 1, weight.size(2)
    user_block = weight[:, d:2 * d].permute(1, 0, 2).reshape(d, c1 * j)
    out = m.new_empty(m.size(0) + 1, j)
    for gids, idx in buckets:
        g, n = idx.shape
        h = _pair_tensor(user[gids], weight, user_block, bias).view(g, c1, d1 * j)
        y = torch.bmm(mp[idx], h).view(g * n, d1, j)
        out[idx.view(-1)] = torch.bmm(ip[idx].view(g * n, 1, d1), y).view(g * n, j)
    return out[:-1]


class _GeneratedLayer(torch.autograd.Function):
    r"""out[p] = x_p W(m_p) for the meta prediction network's generated first layer, exactly.

    With :math:`W(\mathbf{m}) = \mathrm{reshape}(G\mathbf{m} + \mathbf{g})` the per-pair product
    is the trilinear form :math:`\sum_{c,a} m'_c x_a \hat G_{caj}` (m' = [m ‖ 1]). The
    reference code materialises W (3D·D floats) for every pair, costing 3D·3D·D
    multiply-adds per pair. Here ``x = [u ⊙ i ‖ u ‖ i]`` and every pair of one group
    shares u (its source user), so the ⊙, user and item blocks fold into one per-group
    tensor H (:func:`_pair_tensor`) and a pair costs (3D+1)(D+1)·D: about 3x fewer, done
    as padded batched products in buckets (:func:`group_buckets`) that stay in cache.
    The backward recomputes the bucket products instead of keeping any per-pair matrix.
    """

    @staticmethod
    def forward(ctx, m: Tensor, item: Tensor, user: Tensor, weight: Tensor,  # type: ignore[override]
                buckets: list[tuple[Tensor, Tensor]]) -> Tensor:
        ctx.save_for_backward(m, item, user, weight)
        ctx.buckets = buckets
        return _bucket_products(m, item, user, weight, None, buckets)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        m, item, user, weight = ctx.saved_tensors
        d = item.size(1)
        mp, ip = _ones_column(m), _ones_column(item)
        c1, d1, j = weight.size(0), d + 1, weight.size(2)
        user_block = weight[:, d:2 * d].permute(1, 0, 2).reshape(d, c1 * j)   # [a, (c, j)]
        gp = torch.cat([grad, grad.new_zeros(1, j)])
        g_m, g_i = mp.new_empty(mp.shape), ip.new_empty(ip.shape)
        g_u = torch.zeros_like(user)
        g_w = torch.zeros_like(weight)                                        # [c, a, j]
        g_wu = user.new_zeros(d, c1 * j)                                      # user block as [a, (c, j)]
        for gids, idx in ctx.buckets:
            g, n = idx.shape
            u = user[gids]
            h = _pair_tensor(u, weight, user_block).view(g, c1, d1 * j)
            M, I, O = mp[idx], ip[idx], gp[idx]                               # [g, n, C+1], [g, n, D+1], [g, n, J]
            y = torch.bmm(M, h).view(g * n, d1, j)
            g_i[idx.view(-1)] = torch.bmm(y, O.view(g * n, j, 1)).view(g * n, d1)
            io = (I.unsqueeze(-1) * O.unsqueeze(-2)).view(g, n, d1 * j)      # i'_a · grad_j
            g_m[idx.view(-1)] = torch.bmm(io, h.transpose(1, 2)).view(g * n, c1)
            g_h = torch.bmm(M.transpose(1, 2), io).view(g, c1, d1, j)        # ∂/∂H [g, c, a, j]
            ones = g_h[:, :, d].reshape(g, c1 * j)                            # ∂/∂H[:, :, D] (user block)
            g_wu += u.T @ ones
            blocks = g_h[:, :, :d]
            g_w[:, 2 * d:] += blocks.sum(0)                                   # item block
            gu = (blocks * weight[None, :, :d]).sum((1, 3)) + ones @ user_block.T
            g_u.index_add_(0, gids, gu)
            g_w[:, :d] += blocks.mul_(u[:, None, :, None]).sum(0)             # ⊙ block
        g_w[:, d:2 * d] += g_wu.view(d, c1, j).transpose(0, 1)
        return g_m[:-1, :-1], g_i[:-1, :-1], g_u, g_w, None


class _FastGeneratedLayer(torch.autograd.Function):
    r"""x_pᵀW₁(m_p) + b₁(m_p) with the products of :class:`_GeneratedLayer` (the ``fast`` path).

    The arithmetic per pair is the same (3D+1)(D+1)·D multiply-adds, which no other
    contraction order lowers for a per-pair m (see docs/models/graph.md, "Speed");
    what changes is the work around it, none of it the mathematics:

    * **Rows without a gradient skip the backward.** A pair whose score gradient is
      exactly zero adds exactly zero to every gradient, and the hinge loss makes them
      common: every (source, triple) whose margin is met (16–25% of them on Tmall at
      initialisation, 63% after 30 steps on beibei-mini). The backward re-buckets only
      the rows with a non-zero gradient.
    * **b₁(m) folded in.** ``bias`` [C+1, J] (b₁'s generator, ``bias_generator``) is
      added to H's constant row (the coefficient of i'_D = 1), so the products give
      x_pᵀW₁ + b₁ and b₁'s own layer (a forward and two backward products over all
      pairs) disappears; its gradient is the sum of that row's gradient.
    * **Smaller buckets and fewer passes.** A bucket's product ``Y = M H`` is kept
      at about 4 MiB so that it is read back from cache; ∂/∂i' is a multiply-and-sum
      over Y (3x faster than a batched matrix-vector product); the weight and user
      gradients are read off the per-group gradient ∂/∂H in place.
    """

    @staticmethod
    def forward(ctx, m: Tensor, item: Tensor, user: Tensor, weight: Tensor, bias: Tensor,  # type: ignore[override]
                group: Tensor, max_rows: int, max_groups: int) -> Tensor:
        ctx.save_for_backward(m, item, user, weight, bias, group)
        ctx.sizes = (max_rows, max_groups)
        return _bucket_products(m, item, user, weight, bias, group_buckets(group, user.size(0), max_rows, max_groups))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        m, item, user, weight, bias, group = ctx.saved_tensors
        max_rows, max_groups = ctx.sizes
        P, d = item.shape
        c1, d1, j = weight.size(0), d + 1, weight.size(2)
        g_m, g_i = m.new_zeros(P + 1, c1), item.new_zeros(P + 1, d1)
        g_u, g_w, g_b = torch.zeros_like(user), torch.zeros_like(weight), torch.zeros_like(bias)  # g_w: [c, a, j]
        active = grad.ne(0).any(1).nonzero().squeeze(1)                         # rows with a gradient
        if len(active):
            mp, ip = _ones_column(m), _ones_column(item)
            user_block = weight[:, d:2 * d].permute(1, 0, 2).reshape(d, c1 * j)   # [a, (c, j)]
            w_odot = weight[:, :d]
            gp = torch.cat([grad, grad.new_zeros(1, j)])
            g_wu = user.new_zeros(d, c1 * j)                                    # user block as [a, (c, j)]
            rows = torch.cat([active, active.new_full((1,), P)])                # bucket slot -> pair (P: padding)
            for gids, sub in group_buckets(group[active], user.size(0), max_rows, max_groups):
                g, n = sub.shape
                idx = rows[sub]
                u = user[gids]
                h = _pair_tensor(u, weight, user_block, bias).view(g, c1, d1 * j)
                M, I, O = mp[idx], ip[idx], gp[idx]                             # [g, n, C+1], [g, n, D+1], [g, n, J]
                y = torch.bmm(M, h).view(g * n, d1, j)
                flat = idx.view(-1)
                g_i[flat] = (y * O.view(g * n, 1, j)).sum(-1)                   # 3x faster than a batched matvec
                io = (I.unsqueeze(-1) * O.unsqueeze(-2)).view(g, n, d1 * j)    # i'_a · grad_j
                g_m[flat] = torch.bmm(io, h.transpose(1, 2)).view(g * n, c1)
                g_h = torch.bmm(M.transpose(1, 2), io).view(g, c1, d1, j)       # ∂/∂H [g, c, a, j]
                ones = g_h[:, :, d].reshape(g, c1 * j)                          # ∂/∂H[:, :, D] (user block)
                g_wu.addmm_(u.T, ones)
                g_b += ones.sum(0).view(c1, j)
                blocks = g_h[:, :, :d]
                g_w[:, 2 * d:] += blocks.sum(0)                                 # item block
                gu = (blocks * w_odot).sum((1, 3)).addmm_(ones, user_block.T)
                g_u.index_add_(0, gids, gu)
                g_w[:, :d] += blocks.mul_(u[:, None, :, None]).sum(0)           # ⊙ block
            g_w[:, d:2 * d] += g_wu.view(d, c1, j).transpose(0, 1)
        return g_m[:-1, :-1], g_i[:-1, :-1], g_u, g_w, g_b, None, None, None


class MetaPredictionNetwork(nn.Module):
    r"""Per-sample predictor whose weights are generated from the pair (``metaForPredict``).

    .. math::
        \mathbf{x}_s = [\mathbf{u}_s\odot\mathbf{i}_s \,\|\, \mathbf{u}_s \,\|\, \mathbf{i}_s],\
        \mathbf{z}_s = \sigma(\mathbf{W}_p\mathbf{x}_s),\
        \mathbf{m} = \sigma(\mathbf{W}_q[\mathbf{z}_s\odot\mathbf{z}_t \,\|\, \mathbf{z}_s \,\|\, \mathbf{z}_t]),

    .. math::
        \hat{y} = \mathbf{w}_2(\mathbf{m})^{\top}\,
            \sigma\big(\mathbf{W}_1(\mathbf{m})^{\top}\mathbf{x}_s + \mathbf{b}_1(\mathbf{m})\big)

    s is the source representation (the one scored), t the target behavior's; W₁ [3D, D],
    b₁ [D] and w₂ [D] are generated per sample by linear layers of m. W₁ is never
    materialised per sample: :class:`_FastGeneratedLayer` (``fast``, the default) and
    :class:`_GeneratedLayer` (the previous implementation) compute x_sᵀW₁(m) exactly from
    the generator's weights (:func:`reference_predict` is the literal per-sample form).
    """

    def __init__(self, dim: int, leaky: float = 0.1, max_rows: int | None = None) -> None:
        super().__init__()
        self.dim, self.leaky = dim, leaky
        # bucket sizes that keep a bucket's products (rows x (D+1)D floats) and per-group
        # tensors (groups x (3D+1)(D+1)D floats) at about 16 and 32 MiB: in cache at D = 32
        self.max_rows = max_rows or max(16, 2**22 // ((dim + 1) * dim))
        self.max_groups = max(1, min(64, 2**23 // ((3 * dim + 1) * (dim + 1) * dim)))
        # fast path: products of about 4 MiB per bucket (in cache; see _FastGeneratedLayer)
        self.fast_rows = max_rows or max(16, 2**20 // ((dim + 1) * dim))
        self.fast_groups = 64
        self.pair = nn.Linear(3 * dim, dim)
        self.meta = nn.Linear(3 * dim, 3 * dim)
        self.gen_w1 = nn.Linear(3 * dim, 3 * dim * dim)
        self.gen_b1 = nn.Linear(3 * dim, dim)
        self.gen_w2 = nn.Linear(3 * dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.pair, self.meta, self.gen_w1, self.gen_b1, self.gen_w2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        _xavier_bias(self.gen_w1.bias)
        _xavier_bias(self.gen_w2.bias)

    @staticmethod
    def _features(u: Tensor, i: Tensor) -> Tensor:
        return torch.cat([u * i, u, i], -1)

    def generator(self) -> Tensor:
        """Ĝ [3D+1, 3D, D]: Ĝ[c, a, j] = ∂W₁[a, j]/∂m_c, and Ĝ[3D] the bias of W₁."""
        d = self.dim
        w = self.gen_w1.weight.view(3 * d, d, 3 * d).permute(2, 0, 1)
        return torch.cat([w, self.gen_w1.bias.view(1, 3 * d, d)])

    def bias_generator(self) -> Tensor:
        """[C+1, D]: b₁(m) = m'ᵀ [W_bᵀ; c] (m' = [m ‖ 1]), the form the fast layer folds in."""
        return torch.cat([self.gen_b1.weight.T, self.gen_b1.bias[None]])

    def pair_embedding(self, u: Tensor, i: Tensor) -> Tensor:
        """z = σ(W_p [u ⊙ i ‖ u ‖ i]) of pairs [P, D] (the source's z_s, or a target's z_t)."""
        return F.leaky_relu(self.pair(self._features(u, i)), self.leaky)

    def forward(self, users: Tensor, group: Tensor, si: Tensor, zt: Tensor, fast: bool = True) -> Tensor:
        """Scores [P] of pairs whose source user is ``users[group[p]]`` ([R, D]) and source item ``si[p]``.

        ``zt`` [P, D]: :meth:`pair_embedding` of the target behavior's representations of
        the same pairs (callers compute it once per target pair, not once per source).
        Grouping the pairs by their source user row is what makes the first layer cheap.
        ``fast=False`` runs the previous first layer (:class:`_GeneratedLayer`).
        """
        act = lambda x: F.leaky_relu(x, self.leaky)  # noqa: E731
        zs = self.pair_embedding(users[group], si)
        m = act(self.meta(torch.cat([zs * zt, zs, zt], -1)))
        if fast:  # b₁(m) comes out of the same products
            hidden = act(_FastGeneratedLayer.apply(m, si, users, self.generator(), self.bias_generator(), group,
                                                   self.fast_rows, self.fast_groups))
        else:
            buckets = group_buckets(group, users.size(0), self.max_rows, self.max_groups)
            hidden = act(_GeneratedLayer.apply(m, si, users, self.generator(), buckets) + self.gen_b1(m))
        return (hidden * self.gen_w2(m)).sum(-1)


def reference_predict(net: MetaPredictionNetwork, su: Tensor, si: Tensor, tu: Tensor, ti: Tensor) -> Tensor:
    """The meta prediction network written as the reference code computes it (slow).

    Generates W₁(m) [3D, D] for every pair and applies it with a batched product: what
    :class:`_GeneratedLayer` replaces (the previous implementation of
    ``MetaPredictionNetwork.forward``). Kept for tests and ``bench/multibehavior.py``.
    """
    act = lambda x: F.leaky_relu(x, net.leaky)  # noqa: E731
    x = net._features(su, si)
    zs, zt = act(net.pair(x)), act(net.pair(net._features(tu, ti)))
    m = act(net.meta(torch.cat([zs * zt, zs, zt], -1)))
    w1 = net.gen_w1(m).view(-1, 3 * net.dim, net.dim)
    hidden = act(torch.bmm(x.unsqueeze(1), w1).squeeze(1) + net.gen_b1(m))
    return (hidden * net.gen_w2(m)).sum(-1)


@MODELS.register("mbgmn")
class MBGMN(MultiBehaviorGraphRecommender):
    """Meta-knowledge learner + graph meta network + meta prediction network, hinge-trained."""

    config_class: ClassVar[type] = MBGMNConfig

    def __init__(self, n_users: int, n_items: int, graphs: SparseGraphs, target: int, config: MBGMNConfig,
                 content: nn.Module | None = None) -> None:
        super().__init__()
        if config.layers < 0 or config.rank < 1 or config.score_chunk < 1:
            raise ConfigError("model.layers must be >= 0, model.rank and model.score_chunk >= 1")
        self.config = config
        self.n_users, self.n_items = n_users, n_items
        self.n_behaviors = len(graphs)
        self.target = target
        self.graphs = graphs
        self.user_emb = nn.Embedding(n_users, config.dim)
        self.item_emb = nn.Embedding(n_items, config.dim)
        self.content = content
        self.encoder = GraphMetaNetwork(config.dim, self.n_behaviors, config.layers, config.rank,
                                        config.heads, config.leaky)
        self.predictor = MetaPredictionNetwork(2 * config.dim, config.leaky)
        weights = torch.ones(self.n_behaviors)
        weights[target] = config.target_weight
        self.register_buffer("target_weights", weights, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.user_emb.weight)
        nn.init.xavier_uniform_(self.item_emb.weight)
        self.encoder.reset_parameters()
        self.predictor.reset_parameters()
        if self.content is not None:
            self.content.reset_parameters()

    @classmethod
    def from_dataset(cls, data: Dataset, config: MBGMNConfig) -> "MBGMN":
        content = item_content_projection(data, config)
        return cls(data.n_users, data.n_items, behavior_adjacencies(data, "sym"), data.target_index,
                   config, content)

    # -- forward ------------------------------------------------------------------

    def compute_representations(self) -> tuple[Tensor]:
        return (self.encoder(self.ego_embeddings(), self.graphs, self.n_users, self.config.fast),)  # [K+1, U+I, 2d]

    def behavior_attention(self) -> list[Tensor]:
        """Attention [N, H, K, K] of the multi-behavior branch per layer (users then items; for tests)."""
        out = []
        enc, g, n_users = self.encoder, self.graphs, self.n_users
        ego = self.ego_embeddings()
        h = enc.meta(ego, sum(g.propagate(k, ego) for k in range(len(g))), enc.behavior_emb[-1], n_users)
        for layer in range(self.config.layers):
            msgs = enc.messages(g, h)
            out.append(torch.cat([enc.user_att[layer].attention(msgs[:n_users]),
                                  enc.item_att[layer].attention(msgs[n_users:])]))
            h = enc.attend(layer, msgs, n_users)
        return out

    def _predict(self, reps: Tensor, src: Tensor, tgt: Tensor, users: Tensor, items: Tensor) -> Tensor:
        """mult · ŷ for rows (src branch, tgt behavior, user, item), all [P]."""
        item_nodes = items + self.n_users
        return self._predict_sources(reps, src, users, items,
                                     self.predictor.pair_embedding(reps[tgt, users], reps[tgt, item_nodes]))

    def _predict_sources(self, reps: Tensor, src: Tensor, users: Tensor, items: Tensor, zt: Tensor) -> Tensor:
        """mult · ŷ for rows (src branch, user, item) given the target side ``zt`` [P, D].

        Rows are grouped by their source user node (src, user): the predictor shares the
        user's part of the generated first layer across the group.
        """
        keys, group = torch.unique(src * self.n_users + users, return_inverse=True)
        src_users = reps[keys // self.n_users, keys % self.n_users]
        return self.config.mult * self.predictor(src_users, group, reps[src, items + self.n_users], zt,
                                                 fast=self.config.fast)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        (reps,) = self._fresh()
        u, i, j, b = batch["user"], batch["pos"], batch["neg"], batch["behavior"]
        n_src, n_rows = self.n_behaviors + 1, len(u)
        # every source × (positives then negatives), scored in one call; the target side of
        # a pair does not depend on the source: computed once, shared by the K+1 sources
        users, items, tgt = torch.cat([u, u]), torch.cat([i, j]), torch.cat([b, b])
        zt = self.predictor.pair_embedding(reps[tgt, users], reps[tgt, items + self.n_users])
        src = torch.arange(n_src, device=u.device).repeat_interleave(2 * n_rows)
        scores = self._predict_sources(reps, src, users.repeat(n_src), items.repeat(n_src),
                                       zt.repeat(n_src, 1)).view(n_src, 2, n_rows)
        hinge = F.relu(self.config.margin - (scores[:, 0] - scores[:, 1]))          # [sources, rows]
        counts = torch.bincount(b, minlength=self.n_behaviors).clamp(min=1).to(hinge.dtype)
        row_w = self.target_weights[b] / counts[b]  # Σ_src Σ_tgt w_tgt · mean over tgt's pairs
        return (hinge * row_w).sum() + self.config.reg * self.regularizer()

    # -- scoring ------------------------------------------------------------------
    def _target_scores(self, users: Tensor, items: Tensor) -> Tensor:
        """Target-behavior scores from the multi-behavior branch for flat pairs, chunked without grad."""
        (reps,) = self.representations()
        src = torch.full_like(users, self.n_behaviors)
        tgt = torch.full_like(users, self.target)
        if torch.is_grad_enabled():
            return self._predict(reps, src, tgt, users, items)
        c = self.config.score_chunk
        return torch.cat([self._predict(reps, src[s:s + c], tgt[s:s + c], users[s:s + c], items[s:s + c])
                          for s in range(0, len(users), c)]) if len(users) else reps.new_zeros(0)

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        B, k = items.shape
        return self._target_scores(users.repeat_interleave(k), items.reshape(-1)).view(B, k)

    def score_all(self, users: Tensor) -> Tensor:
        if self.config.fast and not torch.is_grad_enabled():
            return self._score_all_fast(users)
        items = torch.arange(self.n_items, device=users.device).expand(len(users), -1)
        return self.score(users, items)

    def _score_all_fast(self, users: Tensor, item_chunk: int = 1024) -> Tensor:
        """Target scores [B, I] of every item, the same predictor with the work ordered per user.

        For one user every pair shares the user's half of x_s = [u ⊙ i ‖ u ‖ i] and of
        x_t, so the user's parts are folded once: W_p's ⊙ and user blocks into a [D, D]
        matrix and a [D] offset (z = σ(i' A_u + b_u)), the generator into H_u
        [C+1, D+1, J] (:func:`_pair_tensor`) with b₁(m)'s weights added to its constant
        row (i'_D = 1). The item parts (i W₃ᵀ, i') are computed once per call. What is
        left per pair is m's layer and ``Y = m' H_u`` ([C+1] x [C+1, (D+1)·J], one GEMM
        per chunk of ``item_chunk`` items, in cache) and its contraction with i'.
        """
        (reps,) = self.representations()
        net, n, d = self.predictor, self.n_users, self.predictor.dim
        act = lambda x: F.leaky_relu(x, net.leaky)  # noqa: E731
        src_u, tgt_u = reps[self.n_behaviors, users], reps[self.target, users]          # [B, D]
        src_i, tgt_i = reps[self.n_behaviors, n:], reps[self.target, n:]                # [I, D]
        wp = net.pair.weight                                                             # [D, 3D]
        w_odot, w_user, w_item = wp[:, :d].T, wp[:, d:2 * d].T, wp[:, 2 * d:].T
        item_s = torch.addmm(net.pair.bias, src_i, w_item)                              # i W₃ᵀ + b [I, D]
        item_t = torch.addmm(net.pair.bias, tgt_i, w_item)
        ip = torch.cat([src_i, src_i.new_ones(len(src_i), 1)], 1)                       # i' [I, D+1]
        weight = net.generator()
        c1, j = weight.size(0), weight.size(2)
        user_block = weight[:, d:2 * d].permute(1, 0, 2).reshape(d, c1 * j)
        bias = net.bias_generator()
        out = src_u.new_empty(len(users), self.n_items)
        for b in range(len(users)):  # H_u per user: 1,024 of them at once would take 420 MB at D = 32
            head = _pair_tensor(src_u[b:b + 1], weight, user_block, bias).view(c1, (d + 1) * j)
            zs = act(torch.addmm(item_s + src_u[b] @ w_user, src_i, src_u[b, :, None] * w_odot))
            zt = act(torch.addmm(item_t + tgt_u[b] @ w_user, tgt_i, tgt_u[b, :, None] * w_odot))
            m = act(net.meta(torch.cat([zs * zt, zs, zt], -1)))                          # [I, C]
            w2 = net.gen_w2(m)
            for s in range(0, self.n_items, item_chunk):
                e = min(s + item_chunk, self.n_items)
                y = torch.addmm(head[-1:], m[s:e], head[:-1]).view(e - s, d + 1, j)
                hidden = act(torch.bmm(ip[s:e, None], y).squeeze(1))                     # x_sᵀW₁(m) + b₁(m)
                out[b, s:e] = (hidden * w2[s:e]).sum(-1)
        return self.config.mult * out

    def item_embeddings(self) -> Tensor:
        (reps,) = self.representations()
        return reps[-1, self.n_users:]
