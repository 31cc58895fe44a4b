r"""FREEDOM (Zhou & Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures for
Multimodal Recommendation", ACM MM 2023), sparse, following the official code (enoche/FREEDOM).

1. **Freeze** the item–item graph (Sec. 3.1): per modality the top-k cosine neighbours of
   the raw features, unweighted (``get_knn_adj_mat``: value 1, the item itself included),
   normalised :math:`D^{-1/2} S^m D^{-1/2}` and mixed with fixed weights
   :math:`S = \sum_m \alpha_m S^m` (image 0.1, text 0.9); built once, never learned.
2. **Denoise** the user–item graph (Sec. 3.2): every epoch keep ``1 - prune_ratio`` of the
   interactions, sampled with probability ∝ :math:`1/\sqrt{d_u d_i}` (the ``edge-prune``
   filtration of :mod:`mmrec.fusion.edge_filtration`), renormalised; evaluation uses the
   full graph.
3. Forward (``forward``): :math:`h = S^{L_i} e^{id}` (one layer), LightGCN over the (pruned)
   user–item graph with ``L_u = 2`` layers and mean layer combination,
   :math:`\hat e_i = e^{CF}_i + h_i` (no normalisation, unlike LATTICE).
4. Loss (``calculate_loss``): BPR on :math:`\hat e_u^\top \hat e_i` plus
   :math:`\lambda \sum_m \mathrm{BPR}(\hat e_u^\top \tilde x^m_i)` with
   :math:`\tilde x^m = W_m x^m` the projected modality features (``reg_weight``), no L2.

With ``fusion`` set to a ``FUSIONS`` name the feature term is one BPR on the fused content
vector instead of one per modality (an mmrec extension; the default ``None`` is the paper).

**Cost per step.** The code runs the full forward (every user and item) at each step; the
loss reads the batch's rows only, so :meth:`FREEDOM.loss` computes the last LightGCN layer,
the item-graph step and the feature projections for the batch's unique users and items
(:meth:`FREEDOM.batch_representations`): same values and gradients, a fraction of the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.fusion.bridge.knn import knn_graph
from mmrec.fusion.content import ContentFields, FrozenFeatures, enhancement_args
from mmrec.fusion.edge_filtration import DegreeSensitivePruning
from mmrec.fusion.models.backbone import (ContentGraphRecommender, FrozenItemGraph, UserItemGraph, bpr,
                                          check_positive, content_encoder, edge_filtration,
                                          frozen_source, mix_graphs, warm_items)
from mmrec.graph.lightgcn import LightGCNEncoder
from mmrec.models.base import ModelConfig
from mmrec.registry import MODELS

#: The paper's modality weights (``mm_image_weight: 0.1``; text gets the rest).
PAPER_MODALITY_WEIGHTS = {"image": 0.1, "text": 0.9}


@dataclass
class FreedomConfig(ContentFields, ModelConfig):
    """Defaults of the official code / MMRec's ``FREEDOM.yaml``."""

    use_features: bool = True
    fusion: str | None = None          # None: one feature-BPR term per modality (paper)
    dim: int = 64                      # embedding_size = feat_embed_dim
    ui_layers: int = 2                 # n_ui_layers
    item_layers: int = 1               # n_mm_layers
    knn_k: int = 10                    # knn_k
    modality_weights: dict[str, float] | None = None  # default: image 0.1, text 0.9 (mm_image_weight)
    prune_ratio: float = 0.8           # dropout: share of edges pruned per epoch (grid {0.8, 0.9})
    feature_weight: float = 1e-4       # reg_weight: weight of the modality BPR terms (grid {0, 1e-5, 1e-4, 1e-3})
    knn_backend: str = "exact"


def resolve_modality_weights(modalities: list[str], given: dict[str, float] | None) -> dict[str, float]:
    """α_m summing to 1: the given (or paper's) weights; unlisted modalities get 1/M each, then normalised."""
    if given is not None:
        unknown = sorted(set(given) - set(modalities))
        if unknown:
            raise ConfigError(f"model.modality_weights names {unknown}, but the features are {modalities}")
    table = PAPER_MODALITY_WEIGHTS if given is None else given
    raw = {m: float(table.get(m, 1.0 / len(modalities))) for m in modalities}
    if any(v < 0 for v in raw.values()) or sum(raw.values()) <= 0:
        raise ConfigError(f"model.modality_weights must be >= 0 with a positive sum, got {raw}")
    total = sum(raw.values())
    return {m: v / total for m, v in raw.items()}


def frozen_item_graph(source: FrozenFeatures, k: int, weights: dict[str, float],
                      backend: str = "exact") -> FrozenItemGraph:
    """S = Σ_m α_m D^-1/2 S^m D^-1/2 with S^m the unweighted top-k graph (self included)."""
    feats, masks = source()
    graphs = []
    for m in source.modalities:
        g = knn_graph(feats[m], k, masks[m], backend=backend, exclude_self=False, weighted=False, normalize="sym")
        graphs.append((weights[m], g.edge_index, g.edge_weight))
    edge_index, weight = mix_graphs(graphs, source.n_items)
    return FrozenItemGraph(edge_index, weight, source.n_items)


@MODELS.register("freedom")
class FREEDOM(ContentGraphRecommender):
    """FREEDOM: frozen item–item graph + degree-sensitive pruning of the user–item graph."""

    config_class: ClassVar[type] = FreedomConfig

    def __init__(self, n_users: int, n_items: int, warm: Tensor, graph: UserItemGraph, item_graph: FrozenItemGraph,
                 content: nn.Module, config: FreedomConfig, modality_weights: dict[str, float]) -> None:
        super().__init__(n_users, n_items, config.dim, warm)
        self.config = config
        self.graph = graph
        self.item_graph = item_graph
        self.encoder = LightGCNEncoder(config.ui_layers)
        self.content = content
        self.modality_weights = modality_weights
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_embeddings()
        self.content.reset_parameters()

    @classmethod
    def from_dataset(cls, data: Dataset, config: FreedomConfig) -> "FREEDOM":
        check_positive("dim", config.dim)
        check_positive("knn_k", config.knn_k)
        for name in ("ui_layers", "item_layers", "feature_weight"):
            check_positive(name, getattr(config, name), allow_zero=True)
        if not config.use_features:
            raise ConfigError("freedom builds its item graph from item features: use_features must be true")
        feature_filtration, pruning = edge_filtration(config)
        if pruning is None and config.prune_ratio > 0:  # the pruning is part of FREEDOM, not an option
            pruning = DegreeSensitivePruning(config.prune_ratio)
        source = frozen_source(data, config)
        weights = resolve_modality_weights(list(source.modalities), config.modality_weights)
        item_graph = frozen_item_graph(source, config.knn_k, weights, config.knn_backend)
        content = content_encoder(source, config.dim, config.fusion or "sum", feature_filtration,
                                  config.modality_dropout, **enhancement_args(config))
        graph = UserItemGraph(data.matrix(), "sym", pruning)
        return cls(data.n_users, data.n_items, warm_items(data), graph, item_graph, content, config, weights)

    def compute_representations(self) -> tuple[Tensor, Tensor]:
        e = self.item_id_weight()
        h = e
        for _ in range(self.config.item_layers):
            h = self.item_graph.propagate(0, h)
        users, items = self.ui_propagate(e)
        return users, items + h

    def batch_representations(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """``compute_representations()`` at the given (unique) users and items only.

        The BPR terms read the batch's rows; the last LightGCN layer and the item-graph
        step are computed for those rows alone (:meth:`ui_propagate_rows`,
        ``propagate_rows``), the earlier layers in full. Same values and gradients as
        indexing the full forward (tested), at a fraction of its cost per step.
        """
        e = self.item_id_weight()
        h = e
        for layer in range(self.config.item_layers):
            if layer == self.config.item_layers - 1:
                h = self.item_graph.propagate_rows(items, h)
            else:
                h = self.item_graph.propagate(0, h)
        if self.config.item_layers == 0:
            h = e[items]
        user_out, item_out = self.ui_propagate_rows(e, users, items)
        return user_out, item_out + h

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        self._cache = None
        u, i, j = batch["user"], batch["pos"], batch["neg"]
        users, uinv = torch.unique(u, return_inverse=True)
        items, iinv = torch.unique(torch.cat([i, j]), return_inverse=True)
        user_out, item_out = self.batch_representations(users, items)
        ue, ie, je = user_out[uinv], item_out[iinv[: len(i)]], item_out[iinv[len(i):]]
        loss = bpr((ue * ie).sum(-1), (ue * je).sum(-1))
        if self.config.feature_weight > 0:
            loss = loss + self.config.feature_weight * self.feature_loss(ue, i, j, (items, iinv))
        return loss

    def feature_loss(self, ue: Tensor, i: Tensor, j: Tensor,
                     unique: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Σ_m BPR(ê_u, x̃^m_i, x̃^m_j) (official ``mf_t_loss + mf_v_loss``), or one term on the fusion.

        Only the batch's items are projected (the code projects the whole table each
        step; the rows it reads, hence values and gradients, are the same).
        ``unique``: ``torch.unique(cat([i, j]), return_inverse=True)`` when already known.
        """
        rows, inverse = unique if unique is not None else torch.unique(torch.cat([i, j]), return_inverse=True)
        pi, pj = inverse[: len(i)], inverse[len(i):]
        out = self.content.encode_rows(rows, self.item_emb(rows) * self.warm[rows], fuse=bool(self.config.fusion))
        parts = {"fused": out} if self.config.fusion else out
        total = ue.new_zeros(())
        for x in parts.values():
            total = total + bpr((ue * x[pi]).sum(-1), (ue * x[pj]).sum(-1))
        return total


__all__ = ["FREEDOM", "FreedomConfig", "PAPER_MODALITY_WEIGHTS", "frozen_item_graph", "resolve_modality_weights"]
