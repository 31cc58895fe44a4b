r"""LATTICE (Zhang et al., MM 2021) and MICRO (Zhang et al., TKDE 2022) on sparse item graphs.

LATTICE, "Mining Latent Structures for Multimedia Recommendation":

1. Frozen modality graphs from the raw features (Sec. 3.1.1, Eqs. 1–3):
   :math:`S^m_{ij} = \cos(x^m_i, x^m_j)`, kept for the top-k of each row, normalised
   :math:`\tilde A^m = D^{-1/2} S^m D^{-1/2}`.
2. Learned graphs (Sec. 3.1.2, Eq. 4): the same construction on projected features
   :math:`\tilde x^m_i = W_m x^m_i`, rebuilt as the model trains.
3. Skip connection and modality weights (Eqs. 5–6):
   :math:`A = (1-\lambda)\,\mathrm{norm}\big(\sum_m \alpha_m \hat S^m\big) + \lambda \sum_m \alpha_m \tilde A^m`,
   :math:`\alpha = \mathrm{softmax}(\mathbf{a})` over learnable :math:`\mathbf{a}`, :math:`\lambda = 0.9`.
4. Item graph convolution (Eq. 7): :math:`h^{(l)} = A h^{(l-1)}`, :math:`h^{(0)}` = item ID embeddings.
5. Combination with the CF backbone (Eq. 8–9): :math:`\hat e_i = e^{CF}_i + h_i / \lVert h_i \rVert_2`,
   LightGCN (or MF: ``ui_layers: 0``) on the user–item graph, BPR loss.

MICRO, "Latent Structure Mining with Contrastive Modality Fusion for Multimedia
Recommendation", keeps one graph *per modality*,
:math:`A^m = (1-\lambda)\,\mathrm{norm}(\hat S^m) + \lambda \tilde A^m`, propagates the item
ID embeddings over each (:math:`h^m`), fuses them with attention
:math:`h_i = \sum_m \beta_{i,m} h^m_i`, :math:`\beta_{i,\cdot} = \mathrm{softmax}(q^\top \tanh(W h^m_i + b))`
(the ``attention`` fusion of :mod:`mmrec.fusion.attention`), and adds an InfoNCE loss
between each :math:`h^m` and :math:`h` (temperature 0.5, weight 0.03 in the official code).

**One class, two configs.** ``fusion: graph`` mixes the modality graphs (LATTICE);
any fusion of the ``FUSIONS`` registry keeps them apart and fuses the propagated
embeddings (MICRO with ``attention``); ``cl_weight`` switches the contrastive term on.
LATTICE with ``--fusion attention`` is MICRO without the contrastive loss.

**Sparse graph learning.** The official codes (and MMRec) build the dense N×N cosine
matrix of the projected features, ``topk`` it, scatter it into another dense N×N matrix,
normalise with two dense N×N products (LATTICE's ``compute_normalized_laplacian``) and
propagate with a dense ``torch.mm``. Here :func:`~mmrec.fusion.bridge.knn.knn_graph` finds
the same top-k neighbours blockwise (``X_b X^T`` for B rows at a time, no gradient) and
recomputes only the kept cosines differentiably, so the learned graph has at most ``N·k``
edges per modality and gradients reach :math:`W_m` and :math:`\mathbf{a}` exactly as
through the dense formulas (the top-k *selection* is not differentiable there either).
The combined graph is the union of at most ``2·M·N·k`` edges; propagation is
``index_add`` on the step that learns the graph and a CSR ``spmm`` otherwise.

**When the graph is learned.** As the official training loops (``build_item_graph = True``
at the start of every epoch, ``False`` after the first batch; the graph is detached for the
other batches) and at every evaluation. ``learn_graph: step`` relearns it at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.fusion.bridge.knn import NORMALIZATIONS, knn_graph
from mmrec.fusion.content import ContentFields, FrozenFeatures, import_all_fusions
from mmrec.fusion.models.backbone import (UI_NORMS, ContentGraphRecommender, ItemGraph, UserItemGraph, bpr,
                                          check_positive, content_encoder, edge_filtration, filtration_uses_id,
                                          frozen_source, mix_graphs, warm_items)
from mmrec.graph.lightgcn import LightGCNEncoder
from mmrec.models.base import ModelConfig
from mmrec.registry import FILTRATIONS, FUSIONS, MODELS

Parts = dict[str, Tensor]
GRAPH_FUSION = "graph"


@dataclass
class LatticeConfig(ContentFields, ModelConfig):
    """Defaults of the official LATTICE code (CRIPAC-DIG/LATTICE ``parser.py``)."""

    use_features: bool = True
    fusion: str = GRAPH_FUSION   # "graph": LATTICE's weighted graph mix; a FUSIONS name: per-modality graphs
    dim: int = 64                # embed_size
    feat_dim: int = 64           # feat_embed_dim: projected features the learned graph is built from
    ui_layers: int = 2           # len(weight_size) = 2 LightGCN layers; 0 = the MF backbone
    item_layers: int = 1         # n_layers of the item graph convolution
    knn_k: int = 10              # topk
    lambda_coeff: float = 0.9    # λ, weight of the frozen graph (skip connection)
    reg: float = 1e-5            # regs[0] (decay): L2 on the batch's final embeddings
    ui_norm: str = "mean-self"   # D^-1 (A + I), the norm_adj of the official load_data.py
    learn_graph: str = "epoch"   # epoch: first step of each epoch (official) | step: every step
    knn_backend: str = "exact"   # a KNN_BACKENDS name for the neighbour search
    prune_ratio: float = 0.8     # share of user-item edges dropped per epoch with --filtration edge-prune
    cl_weight: float = 0.0       # weight of the modality-vs-fused InfoNCE (MICRO)
    cl_temperature: float = 0.5
    cl_items: str = "all"        # all: every item anchors (official) | batch: the batch's items only
    cl_block: int = 4096         # anchors per block of the all-item InfoNCE (official batch_size)


@dataclass
class MicroConfig(LatticeConfig):
    """Defaults of the official MICRO code (CRIPAC-DIG/MICRO ``parser.py`` and ``Models.py``)."""

    fusion: str = "attention"    # MICRO's modality attention (query network)
    cl_weight: float = 0.03      # loss_ratio
    cl_temperature: float = 0.5  # tau


# -- the item graphs -------------------------------------------------------------------

class LatentItemGraphs(nn.Module):
    """Frozen kNN graphs of the raw features and graphs learned from projected features.

    ``combine="graph"``: one graph, LATTICE Eqs. 5–6 (learnable modality weights α).
    ``combine="modality"``: one graph per modality, MICRO's ``A^m``.
    """

    def __init__(self, source: FrozenFeatures, k: int, lambda_coeff: float, combine: str,
                 backend: str = "exact") -> None:
        super().__init__()
        self.modalities = list(source.modalities)
        self.k, self.lambda_coeff, self.combine, self.backend = k, lambda_coeff, combine, backend
        self.num_nodes = source.n_items
        feats, masks = source()
        for m in self.modalities:  # Eqs. 1-3 on the raw features, once
            g = knn_graph(feats[m], k, masks[m], backend=backend, exclude_self=False, normalize="sym")
            self.register_buffer(f"frozen_index_{m}", g.edge_index, persistent=False)
            self.register_buffer(f"frozen_weight_{m}", g.edge_weight, persistent=False)
        self.modal_logits = nn.Parameter(torch.zeros(len(self.modalities))) if combine == GRAPH_FUSION else None
        self.last_nnz: dict[str, int] = {}

    def reset_parameters(self) -> None:
        if self.modal_logits is not None:  # official init [0.5, 0.5]: equal weights after softmax
            nn.init.zeros_(self.modal_logits)

    def frozen(self, m: str) -> tuple[Tensor, Tensor]:
        return getattr(self, f"frozen_index_{m}"), getattr(self, f"frozen_weight_{m}")

    def modality_weights(self) -> Tensor:
        """α = softmax(a) (LATTICE Eq. 6)."""
        if self.modal_logits is None:
            raise ConfigError("modality weights exist only with fusion: graph (LATTICE)")
        return torch.softmax(self.modal_logits, dim=0)

    def learned(self, projected: Parts, masks: Parts) -> dict[str, tuple[Tensor, Tensor]]:
        """Ŝ^m: top-k cosine graph of the projected features, raw cosines (differentiable)."""
        out = {}
        for m in self.modalities:
            g = knn_graph(projected[m], self.k, masks[m], backend=self.backend, exclude_self=False,
                          normalize=None)
            out[m] = (g.edge_index, g.edge_weight)
            self.last_nnz[m] = g.num_edges
        return out

    def build(self, projected: Parts, masks: Parts) -> list[ItemGraph]:
        n, lam = self.num_nodes, self.lambda_coeff
        sym = NORMALIZATIONS.get("sym")  # D^-1/2 A D^-1/2 with D = row sums; degree <= 0 -> 0
        learned = self.learned(projected, masks)
        if self.combine == GRAPH_FUSION:                       # LATTICE
            alpha = self.modality_weights()
            ei, w = mix_graphs([(alpha[k], *learned[m]) for k, m in enumerate(self.modalities)], n)
            w = sym(ei, w, n)                                  # norm(Σ α_m Ŝ^m)
            frozen = [(lam * alpha[k], *self.frozen(m)) for k, m in enumerate(self.modalities)]
            ei, w = mix_graphs([(1.0 - lam, ei, w)] + frozen, n)  # Eq. 5
            return [ItemGraph(ei, w, n)]
        graphs = []
        for m in self.modalities:                              # MICRO: one graph per modality
            ei, w = learned[m]
            ei, w = mix_graphs([(1.0 - lam, ei, sym(ei, w, n)), (lam, *self.frozen(m))], n)
            graphs.append(ItemGraph(ei, w, n))
        return graphs


# -- the contrastive term ---------------------------------------------------------------

#: Bytes of the [B, 2N] block of exponentials one InfoNCE block works in (the anchors per
#: block are ``min(cl_block, INFONCE_BLOCK_BYTES // (2N · 4))``): the loss does not depend
#: on it; 256 MiB keeps the block in few passes without holding GiBs at large N.
INFONCE_BLOCK_BYTES = 256 * 2**20
#: Logits are cosines / τ in [-1/τ, 1/τ]: up to this 1/τ, exp needs no max-shift (e^±30 is
#: far inside float32), so each block skips a row-max pass; smaller τ shifts by the row max.
INFONCE_NO_SHIFT_MAX = 30.0


class _InfoNCE(torch.autograd.Function):
    r""":math:`\sum_i -\log \frac{e^{z^1_i \cdot z^2_i/\tau}}
    {\sum_{j \ne i} e^{z^1_i \cdot z^1_j/\tau} + \sum_j e^{z^1_i \cdot z^2_j/\tau}}` over all anchors i.

    One pass over blocks of B anchors: the [B, 2N] logits ``a [z1; z2]ᵀ`` (a = z1_block / τ)
    are computed into one reused buffer, exponentiated in place, and, while the block is
    in memory, the gradient is accumulated (softmax minus the positive's one-hot):
    ``dL/da = P [z1; z2] - z2_block``, ``dL/d[z1; z2] += Pᵀ a`` with ``P = E / rowsum(E)``
    folded into the B×d factors (no pass over the block for the division). Three GEMMs of
    B·2N·d and one ``exp`` per block: the minimum for the exact loss and gradient, O(B·N)
    memory, nothing recomputed; backward only scales the stored [2N, d] gradient.
    """

    @staticmethod
    def forward(ctx, z1: Tensor, z2: Tensor, tau: float, block: int, need_grad: bool) -> Tensor:  # type: ignore[override]
        n, d = z1.shape
        z = torch.cat([z1, z2])                                  # keys [2N, d]
        b = max(1, min(block, n))
        buf = z.new_empty(b, 2 * n)
        shift = 1.0 / tau > INFONCE_NO_SHIFT_MAX
        total = torch.zeros((), dtype=torch.float64, device=z.device)
        grad = z.new_zeros(2 * n, d) if need_grad else None      # dL/d[z1; z2] as keys
        grad_a = z.new_empty(n, d) if need_grad else None        # dL/da per anchor
        for s in range(0, n, b):
            e = min(n, s + b)
            a = z1[s:e] / tau
            logits = buf[: e - s]
            torch.mm(a, z.T, out=logits)
            positive = logits.diagonal(offset=n + s).clone()     # z1_i · z2_i / τ
            logits.diagonal(offset=s).fill_(float("-inf"))       # the anchor itself is no negative
            if shift:
                m = logits.amax(1, keepdim=True)
                logits.sub_(m)
            logits.exp_()
            sums = logits.sum(1)
            lse = sums.log() + m.squeeze(1) if shift else sums.log()
            total += (lse - positive).sum(dtype=torch.float64)
            if need_grad:
                inv = sums.reciprocal().unsqueeze(1)
                torch.mm(logits, z, out=grad_a[s:e]).mul_(inv).sub_(z2[s:e])   # P z - z2_i
                grad.addmm_(logits.T, a * inv)                                  # Pᵀ a
                grad[n + s:n + e].sub_(a)                                       # the positive key
        if need_grad:
            grad[:n].add_(grad_a, alpha=1.0 / tau)               # a = z1 / τ
            ctx.save_for_backward(grad)
        return total.to(z.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        n = grad.shape[0] // 2
        grad = grad * g
        return grad[:n], grad[n:], None, None, None


def infonce(z1: Tensor, z2: Tensor, tau: float, block: int = 4096, block_bytes: int | None = None) -> Tensor:
    """MICRO's ``batched_contrastive_loss(z1, z2)``: mean over anchors of z1, negatives all of z1 and z2.

    Rows are L2-normalised (cosine similarity), then :class:`_InfoNCE` goes over the
    anchors in blocks of at most ``block`` rows (the code's batch_size) and at most
    ``block_bytes`` (default :data:`INFONCE_BLOCK_BYTES`) of exponentials per block,
    computing the loss and its gradient in the same pass (3 GEMMs + 1 exp per block; the
    official code's autograd does 3 GEMMs, ~6 fresh [B, N] tensors and keeps 2 per block
    alive). Memory O(B·N). Same value and gradient as the code's exp / sum / log (tested,
    plus ``gradcheck``), without its overflow for small τ. The gradient is computed with
    the loss when grad mode is on and an input requires grad (training always backprops
    the loss it computes).
    """
    n = z1.shape[0]
    if n == 0:
        return z1.sum() * 0.0
    budget = INFONCE_BLOCK_BYTES if block_bytes is None else block_bytes
    rows = max(1, min(block, budget // max(1, 2 * n * z1.element_size())))
    need_grad = torch.is_grad_enabled() and (z1.requires_grad or z2.requires_grad)
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    return _InfoNCE.apply(z1, z2, tau, rows, need_grad) / n


# -- the model ----------------------------------------------------------------------------

@MODELS.register("lattice")
class LATTICE(ContentGraphRecommender):
    """LATTICE; with a ``FUSIONS`` name as ``fusion`` and ``cl_weight`` > 0 it is MICRO."""

    config_class: ClassVar[type] = LatticeConfig

    def __init__(self, n_users: int, n_items: int, warm: Tensor, graph: UserItemGraph, content: nn.Module,
                 item_graphs: LatentItemGraphs, fusion: nn.Module | None, config: LatticeConfig) -> None:
        super().__init__(n_users, n_items, config.dim, warm)
        self.config = config
        self.graph = graph
        self.encoder = LightGCNEncoder(config.ui_layers)
        self.content = content
        self.item_graphs = item_graphs
        self.fusion = fusion
        self._learned: list[ItemGraph] | None = None
        self._relearn = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_embeddings()
        self.content.reset_parameters()
        self.item_graphs.reset_parameters()
        if self.fusion is not None and hasattr(self.fusion, "reset_parameters"):
            self.fusion.reset_parameters()

    # -- construction ---------------------------------------------------------------
    @classmethod
    def check_config(cls, c: LatticeConfig) -> None:
        for name in ("dim", "feat_dim", "knn_k", "cl_block"):
            check_positive(name, getattr(c, name))
        for name in ("ui_layers", "item_layers", "reg", "cl_weight"):
            check_positive(name, getattr(c, name), allow_zero=True)
        check_positive("cl_temperature", c.cl_temperature)
        if not 0.0 <= c.lambda_coeff <= 1.0:
            raise ConfigError(f"model.lambda_coeff must be in [0, 1], got {c.lambda_coeff}")
        if c.ui_norm not in UI_NORMS:
            raise ConfigError(f"model.ui_norm must be one of {', '.join(UI_NORMS)}, not '{c.ui_norm}'")
        if c.learn_graph not in ("epoch", "step"):
            raise ConfigError(f"model.learn_graph must be 'epoch' or 'step', not '{c.learn_graph}'")
        if c.cl_items not in ("all", "batch"):
            raise ConfigError(f"model.cl_items must be 'all' or 'batch', not '{c.cl_items}'")
        if c.cl_weight > 0 and c.fusion == GRAPH_FUSION:
            raise ConfigError("model.cl_weight > 0 contrasts modality-specific with fused item embeddings, which "
                              "fusion: graph (one mixed graph) does not have; use a fusion such as attention (MICRO)")
        if not c.use_features:
            raise ConfigError(f"{cls.__name__} learns its item graph from item features: use_features must be true")

    @classmethod
    def from_dataset(cls, data: Dataset, config: LatticeConfig) -> "LATTICE":
        cls.check_config(config)
        feature_filtration, pruning = edge_filtration(config)
        if feature_filtration and getattr(FILTRATIONS.get(feature_filtration), "scale_only", False):
            raise ConfigError(f"filtration '{feature_filtration}' rescales whole modality rows, which the cosine "
                              f"kNN item graphs of {cls.__name__.lower()} ignore (it would learn nothing); "
                              "this model weights modalities itself: LATTICE's softmax α over modality graphs "
                              "(fusion: graph), MICRO's attention fusion. modality_dropout works here")
        if filtration_uses_id(feature_filtration) and config.feat_dim != config.dim:
            raise ConfigError(f"filtration '{feature_filtration}' gates projected features with the item ID "
                              f"embedding: model.feat_dim ({config.feat_dim}) must equal model.dim ({config.dim})")
        source = frozen_source(data, config)
        content = content_encoder(source, config.feat_dim, "sum", feature_filtration, config.modality_dropout)
        combine = GRAPH_FUSION if config.fusion == GRAPH_FUSION else "modality"
        fusion = None
        if combine == "modality":
            import_all_fusions()
            fusion = FUSIONS.get(config.fusion)(list(source.modalities), config.dim)
        item_graphs = LatentItemGraphs(source, config.knn_k, config.lambda_coeff, combine, config.knn_backend)
        graph = UserItemGraph(data.matrix(), config.ui_norm, pruning)
        return cls(data.n_users, data.n_items, warm_items(data), graph, content, item_graphs, fusion, config)

    # -- the learned graph's life cycle ---------------------------------------------------
    def start_epoch(self) -> None:
        self._relearn = True

    def _clear_cache(self) -> None:  # new weights (load_state_dict): the learned graph is stale too
        super()._clear_cache()
        self._learned = None

    def _apply(self, fn, recurse: bool = True):
        self._learned = None
        return super()._apply(fn, recurse)

    def item_graph_list(self) -> list[ItemGraph]:
        """The graph(s) to propagate on: learned now (with gradients) or the epoch's detached copy."""
        c = self.config
        if self.training and self._learned is not None and not self._relearn and c.learn_graph == "epoch":
            return self._learned
        parts, masks = self.content.modality_embeddings(self.item_id_weight())
        graphs = self.item_graphs.build(parts, masks)
        if self.training:
            self._learned = [g.detach() for g in graphs]
            self._relearn = False
        return graphs

    # -- forward --------------------------------------------------------------------------
    def item_side(self) -> tuple[Tensor, Parts | None]:
        """h (LATTICE Eq. 7 / MICRO's fused h) and the per-modality h^m (MICRO) or None."""
        e = self.item_id_weight()
        graphs = self.item_graph_list()
        if self.fusion is None:
            h = e
            for _ in range(self.config.item_layers):
                h = graphs[0].propagate(h)
            return h, None
        parts: Parts = {}
        for m, g in zip(self.item_graphs.modalities, graphs):
            h = e
            for _ in range(self.config.item_layers):
                h = g.propagate(h)
            parts[m] = h
        return self.fusion(parts, self.content.source.masks(), e), parts

    def forward_all(self) -> tuple[Tensor, Tensor, Tensor, Parts | None]:
        e = self.item_id_weight()
        users, items = self.ui_propagate(e)
        h, parts = self.item_side()
        return users, items + F.normalize(h, p=2, dim=1), h, parts   # Eq. 9

    def compute_representations(self) -> tuple[Tensor, Tensor]:
        users, items, _, _ = self.forward_all()
        return users, items

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        self._cache = None
        users, items, h, parts = self.forward_all()
        u, i, j = batch["user"], batch["pos"], batch["neg"]
        ue, ie, je = users[u], items[i], items[j]
        loss = bpr((ue * ie).sum(-1), (ue * je).sum(-1))
        loss = loss + self.config.reg * 0.5 * (ue.pow(2).sum() + ie.pow(2).sum() + je.pow(2).sum()) / len(u)
        if self.config.cl_weight > 0 and parts is not None:
            loss = loss + self.config.cl_weight * self.contrastive(h, parts, torch.cat([i, j]))
        return loss

    def contrastive(self, h: Tensor, parts: Parts, batch_items: Tensor) -> Tensor:
        """Σ_m InfoNCE(h^m, h) over the items that have modality m (all items, or the batch's)."""
        masks = self.content.source.masks()
        total = h.new_zeros(())
        items = torch.unique(batch_items) if self.config.cl_items == "batch" else None
        for m, hm in parts.items():
            present = masks[m] if items is None else masks[m][items]
            rows = present.nonzero().squeeze(1) if items is None else items[present]
            total = total + infonce(hm[rows], h[rows], self.config.cl_temperature, self.config.cl_block)
        return total


@MODELS.register("micro")
class MICRO(LATTICE):
    """MICRO: per-modality learned graphs, attention fusion, InfoNCE (defaults of the official code)."""

    config_class: ClassVar[type] = MicroConfig

    @classmethod
    def check_config(cls, c: LatticeConfig) -> None:
        super().check_config(c)
        if c.fusion == GRAPH_FUSION:
            raise ConfigError("micro keeps one item graph per modality and fuses embeddings: choose a fusion "
                              "(attention, the paper's; sum, concat, gated, ...), or use model lattice for "
                              "fusion: graph")


__all__ = ["INFONCE_BLOCK_BYTES", "LATTICE", "MICRO", "LatentItemGraphs", "LatticeConfig", "MicroConfig", "infonce"]
