"""Adaptive Information Transfer Multi-task framework (Xi et al., KDD 2021)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.heads.base import Head, HeadConfig, mlp
from mmrec.registry import HEADS


@dataclasses.dataclass
class AITMConfig(HeadConfig):
    """Reference-code defaults (adtalos/AITM-torch): towers 128-64-32, AIT dimension 32 (the
    towers' last width), calibrator weight α = 0.6. The calibrator is averaged over the
    batch (the reference code sums it, which ties α to the batch size)."""

    tower_dims: tuple[int, ...] = (128, 64, 32)
    calibrator_weight: float = 0.6


class AIT(nn.Module):
    r"""Adaptive Information Transfer module:

    .. math::
        z_t = \sum_{u\in\{p_{t-1},\,q_t\}} w_u\, h_3(u),\qquad
        w_u = \operatorname{softmax}_u\Big(\frac{\langle h_1(u), h_2(u)\rangle}{\sqrt{k}}\Big)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.h1, self.h2, self.h3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, p_prev: Tensor, q: Tensor) -> Tensor:
        u = torch.stack([p_prev, q], dim=1)                        # [B, 2, k]
        w = ((self.h1(u) * self.h2(u)).sum(-1) * self.scale).softmax(dim=1)
        return (w.unsqueeze(-1) * self.h3(u)).sum(1)


@HEADS.register("aitm")
class AITMHead(Head):
    r"""AITM: tasks in cascade order (e.g. click -> convert), each with its tower :math:`q_t`.

    Task t ≥ 2 receives :math:`p_{t-1} = \mathrm{MLP}(z_{t-1})` (the transferred
    information of the previous task) and fuses it with :math:`q_t` through :class:`AIT`;
    :math:`\hat y_t = \sigma(\mathrm{MLP}(z_t))`. Every task is trained on all exposures
    with its own label; :meth:`aux_loss` is the behavioural expectation calibrator
    :math:`\alpha\sum_{t\ge2}\max(\hat y_t - \hat y_{t-1}, 0)` — a later step of the
    funnel can not be likelier than an earlier one.
    """

    config_class: ClassVar[type] = AITMConfig
    head_name: ClassVar[str] = "aitm"
    min_tasks: ClassVar[int] = 2

    def __init__(self, in_dim: int, n_tasks: int = 2, n_scenarios: int = 1, config: AITMConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        if not c.tower_dims:
            raise ConfigError("head.tower_dims must not be empty for aitm (the AIT module works on tower outputs)")
        k = int(c.tower_dims[-1])
        self.towers = nn.ModuleList(mlp(in_dim, c.tower_dims, c.dropout) for _ in range(n_tasks))
        self.transfer = nn.ModuleList(nn.Sequential(nn.Linear(k, k), nn.ReLU()) for _ in range(n_tasks - 1))
        self.ait = nn.ModuleList(AIT(k) for _ in range(n_tasks - 1))
        self.out = nn.ModuleList(nn.Linear(k, 1) for _ in range(n_tasks))

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        z = self.towers[0](x)
        outs = [self.out[0](z)]
        for t in range(1, self.n_tasks):
            z = self.ait[t - 1](self.transfer[t - 1](z), self.towers[t](x))
            outs.append(self.out[t](z))
        return torch.cat(outs, dim=1)

    def aux_loss(self, logits: Tensor) -> Tensor:
        p = torch.sigmoid(logits)
        return self.config.calibrator_weight * torch.relu(p[:, 1:] - p[:, :-1]).sum(1).mean()
