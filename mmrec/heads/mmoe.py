"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.heads.base import Head, HeadConfig, mlp, out_dim
from mmrec.registry import HEADS


@dataclasses.dataclass
class MMoEConfig(HeadConfig):
    """Sizes are ours (the paper tunes them per dataset)."""

    n_experts: int = 8
    expert_dims: tuple[int, ...] = (64,)
    tower_dims: tuple[int, ...] = (32,)


class ExpertBank(nn.Module):
    """E experts (MLPs) run side by side: [B, d] -> [B, E, h]."""

    def __init__(self, in_dim: int, n_experts: int, dims: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        self.experts = nn.ModuleList(mlp(in_dim, dims, dropout) for _ in range(n_experts))
        self.out_dim = out_dim(in_dim, dims)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([e(x) for e in self.experts], dim=1)


@HEADS.register("mmoe")
class MMoEHead(Head):
    r"""MMoE:

    .. math::
        y_k = h^k\big(f^k(x)\big),\qquad f^k(x) = \sum_{i=1}^{n} g^k(x)_i\, f_i(x),\qquad
        g^k(x) = \operatorname{softmax}(W_{gk}\,x)

    Experts :math:`f_i` are shared; each task has its own gate :math:`W_{gk}` (no bias,
    as in the paper) and tower :math:`h^k`.
    """

    config_class: ClassVar[type] = MMoEConfig
    head_name: ClassVar[str] = "mmoe"

    def __init__(self, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1, config: MMoEConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        self.experts = ExpertBank(in_dim, c.n_experts, tuple(c.expert_dims), c.dropout)
        self.gates = nn.ModuleList(nn.Linear(in_dim, c.n_experts, bias=False) for _ in range(n_tasks))
        h = self.experts.out_dim
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(h, c.tower_dims, c.dropout), nn.Linear(out_dim(h, c.tower_dims), 1))
            for _ in range(n_tasks))

    def gate_weights(self, x: Tensor) -> Tensor:
        """g^k(x) for every task, [B, T, E]."""
        return torch.stack([g(x).softmax(-1) for g in self.gates], dim=1)

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        e = self.experts(x)                                  # [B, E, h]
        mixed = torch.einsum("bte,beh->bth", self.gate_weights(x), e)
        return torch.cat([t(mixed[:, k]) for k, t in enumerate(self.towers)], dim=1)
