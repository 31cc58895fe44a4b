"""LightGCN (He et al., SIGIR 2020) on the target behavior, and over all behaviors merged.

Equation numbers refer to "LightGCN: Simplifying and Powering Graph Convolution
Network for Recommendation". Propagation is LGConv's math on a pre-normalised sparse
adjacency (normalised once, not at every call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.datasets.sampling import bpr_batches
from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.graph.propagation import GraphRecommender, SparseGraphs, item_content_projection
from mmrec.fusion.content import ContentFields
from mmrec.models.base import InnerProductScoring, ModelConfig
from mmrec.registry import MODELS


@dataclass
class LightGCNConfig(ContentFields, ModelConfig):
    """Defaults of the paper / its official code (LightGCN-PyTorch)."""

    dim: int = 64
    layers: int = 3
    reg: float = 1e-4          # λ of Eq. 15, on the batch's ego embeddings
    init_std: float = 0.1      # official code: normal(0, 0.1)


class LightGCNEncoder(nn.Module):
    r"""Light graph convolution with layer combination (Eqs. 3, 4 / matrix form 7, 8).

    .. math::
        \mathbf{E}^{(k+1)} = \mathbf{D}^{-1/2}\mathbf{A}\mathbf{D}^{-1/2}\,\mathbf{E}^{(k)},
        \qquad
        \mathbf{E} = \sum_{k=0}^{K} \alpha_k \mathbf{E}^{(k)},\quad \alpha_k = \frac{1}{K+1}

    The math of torch-geometric's :class:`~torch_geometric.nn.conv.LGConv` stack
    (``torch_geometric.nn.models.LightGCN.get_embedding``, checked equal in the tests),
    with the normalisation computed once and a cached transpose for the backward pass
    (:class:`~mmrec.graph.propagation.SparseGraphs`). Parameter-free.
    """

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = layers
        self.register_buffer("alpha", torch.full((layers + 1,), 1.0 / (layers + 1)), persistent=False)

    def reset_parameters(self) -> None:
        """No parameters: LightGCN drops feature transforms and non-linearities."""

    def forward(self, x: Tensor, graphs: SparseGraphs, k: int = 0) -> Tensor:
        out = x * self.alpha[0]
        for layer in range(self.layers):
            x = graphs.propagate(k, x)                 # Eq. 7
            out = out + x * self.alpha[layer + 1]      # Eq. 8
        return out


@MODELS.register("lightgcn")
class LightGCN(InnerProductScoring, GraphRecommender):
    """LightGCN trained with BPR on the target behavior's graph."""

    config_class: ClassVar[type] = LightGCNConfig

    def __init__(self, n_users: int, n_items: int, graph: SparseGraphs, config: LightGCNConfig,
                 content: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = n_users, n_items
        self.user_emb = nn.Embedding(n_users, config.dim)
        self.item_emb = nn.Embedding(n_items, config.dim)
        self.encoder = LightGCNEncoder(config.layers)
        self.content = content
        self.graph = graph
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_emb.weight, std=self.config.init_std)
        nn.init.normal_(self.item_emb.weight, std=self.config.init_std)
        self.encoder.reset_parameters()
        if self.content is not None:
            self.content.reset_parameters()

    # -- construction -------------------------------------------------------------
    @classmethod
    def graph_matrix(cls, data: Dataset) -> sp.csr_matrix:
        """The interactions the graph is built from: the target behavior."""
        return data.matrix()

    @classmethod
    def from_dataset(cls, data: Dataset, config: LightGCNConfig) -> "LightGCN":
        if config.layers < 0:
            raise ConfigError(f"model.layers must be >= 0, got {config.layers}")
        graph = SparseGraphs([cls.graph_matrix(data)], "sym")
        content = item_content_projection(data, config)
        return cls(data.n_users, data.n_items, graph, config, content)

    def training_batches(self, data: Dataset, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, Tensor]]:
        yield from bpr_batches(self.graph_matrix(data), batch_size, rng)

    # -- forward ------------------------------------------------------------------
    def ego_embeddings(self) -> Tensor:
        """E^(0) = [users; items] (item content added when ``use_features``)."""
        items = self.item_emb.weight
        if self.content is not None:
            items = items + self.content(id_emb=items)
        return torch.cat([self.user_emb.weight, items])

    def compute_representations(self) -> tuple[Tensor, Tensor]:
        out = self.encoder(self.ego_embeddings(), self.graph)
        return out[: self.n_users], out[self.n_users:]

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        users, items = self._fresh()
        u, i, j = batch["user"], batch["pos"], batch["neg"]
        pos = (users[u] * items[i]).sum(-1)  # Eq. 5: ŷ_ui = e_u^T e_i
        neg = (users[u] * items[j]).sum(-1)
        bpr = F.softplus(neg - pos).mean()   # Eq. 15: -ln σ(ŷ_ui - ŷ_uj)
        ego = 0.5 * (self.user_emb(u).pow(2).sum() + self.item_emb(i).pow(2).sum()
                     + self.item_emb(j).pow(2).sum()) / len(u)
        return bpr + self.config.reg * ego


@dataclass
class LightGCNMBConfig(LightGCNConfig):
    """LightGCN over all behaviors merged; ``train_on`` picks the BPR positives."""

    train_on: str = "merged"  # merged: any behavior is a positive | target: the target behavior only


@MODELS.register("lightgcn-mb")
class LightGCNMB(LightGCN):
    """LightGCN whose graph merges every behavior (the usual multi-behavior baseline).

    Behaviors are treated as one interaction type: an edge exists if the user had
    the item under any behavior. BPR positives come from the same merged matrix by
    default (``train_on: target`` keeps the target behavior's positives only).
    """

    config_class: ClassVar[type] = LightGCNMBConfig

    @classmethod
    def graph_matrix(cls, data: Dataset) -> sp.csr_matrix:
        return data.merged_matrix()

    @classmethod
    def from_dataset(cls, data: Dataset, config: LightGCNMBConfig) -> "LightGCNMB":
        if config.train_on not in ("merged", "target"):
            raise ConfigError(f"model.train_on must be 'merged' or 'target', not '{config.train_on}'")
        return super().from_dataset(data, config)

    def training_batches(self, data: Dataset, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, Tensor]]:
        matrix = data.merged_matrix() if self.config.train_on == "merged" else data.matrix()
        yield from bpr_batches(matrix, batch_size, rng)
