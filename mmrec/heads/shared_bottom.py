"""Shared-bottom multi-task head (Caruana 1997): one shared MLP, one tower per task."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.heads.base import Head, HeadConfig, mlp, out_dim
from mmrec.registry import HEADS


@dataclasses.dataclass
class SharedBottomConfig(HeadConfig):
    """Sizes follow the MMoE paper's shared-bottom baseline shape (one hidden bottom layer)."""

    bottom_dims: tuple[int, ...] = (128,)
    tower_dims: tuple[int, ...] = (64,)


@HEADS.register("shared-bottom")
class SharedBottomHead(Head):
    r""":math:`\hat y_k = h^k(f(x))`: every task reads the same bottom :math:`f` (the MMoE paper's baseline)."""

    config_class: ClassVar[type] = SharedBottomConfig
    head_name: ClassVar[str] = "shared-bottom"

    def __init__(self, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1,
                 config: SharedBottomConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        self.bottom = mlp(in_dim, c.bottom_dims, c.dropout)
        h = out_dim(in_dim, c.bottom_dims)
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(h, c.tower_dims, c.dropout), nn.Linear(out_dim(h, c.tower_dims), 1))
            for _ in range(n_tasks))

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        z = self.bottom(x)
        return torch.cat([t(z) for t in self.towers], dim=1)
