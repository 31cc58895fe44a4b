"""Progressive Layered Extraction with Customized Gate Control (Tang et al., RecSys 2020)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.heads.base import Head, HeadConfig, mlp, out_dim
from mmrec.heads.mmoe import ExpertBank
from mmrec.registry import HEADS


@dataclasses.dataclass
class PLEConfig(HeadConfig):
    """Sizes are ours (two extraction levels, the smallest progressive model)."""

    n_levels: int = 2
    n_specific: int = 1   # task-specific experts per task per level (m_k)
    n_shared: int = 1     # shared experts per level (m_s)
    expert_dims: tuple[int, ...] = (64,)
    tower_dims: tuple[int, ...] = (32,)


class CGC(nn.Module):
    r"""One Customized Gate Control layer (PLE; the stacked form is its progressive extraction):

    .. math::
        g^{k,j}(x) = w^{k,j}\big(g^{k,j-1}(x)\big)\, S^{k,j}(x),\qquad
        w^{k,j}(x) = \operatorname{softmax}(W^{k,j}_g\, x),\qquad
        S^{k,j} = [E^{j}_{k,1..m_k},\ E^{j}_{s,1..m_s}]

    Task k's experts read task k's previous output, shared experts read the shared
    output; the shared gate (every level but the last) mixes all experts.
    """

    def __init__(self, in_dim: int, n_tasks: int, n_specific: int, n_shared: int, dims: tuple[int, ...],
                 dropout: float, last: bool) -> None:
        super().__init__()
        self.n_tasks, self.last = n_tasks, last
        self.specific = nn.ModuleList(ExpertBank(in_dim, n_specific, dims, dropout) for _ in range(n_tasks))
        self.shared = ExpertBank(in_dim, n_shared, dims, dropout)
        self.out_dim = self.shared.out_dim
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, n_specific + n_shared) for _ in range(n_tasks))
        self.shared_gate = None if last else nn.Linear(in_dim, n_tasks * n_specific + n_shared)

    def forward(self, task_in: list[Tensor], shared_in: Tensor) -> tuple[list[Tensor], Tensor | None]:
        shared_e = self.shared(shared_in)                                   # [B, m_s, h]
        spec_e = [bank(task_in[k]) for k, bank in enumerate(self.specific)]  # T x [B, m_k, h]
        outs = []
        for k in range(self.n_tasks):
            s = torch.cat([spec_e[k], shared_e], dim=1)
            w = self.task_gates[k](task_in[k]).softmax(-1)
            outs.append(torch.einsum("be,beh->bh", w, s))
        shared_out = None
        if self.shared_gate is not None:
            s = torch.cat(spec_e + [shared_e], dim=1)
            w = self.shared_gate(shared_in).softmax(-1)
            shared_out = torch.einsum("be,beh->bh", w, s)
        return outs, shared_out


@HEADS.register("ple")
class PLEHead(Head):
    """PLE: ``n_levels`` stacked CGC layers (progressive separation), then one tower per task.

    ``n_levels=1`` is the single-level CGC model of the paper.
    """

    config_class: ClassVar[type] = PLEConfig
    head_name: ClassVar[str] = "ple"

    def __init__(self, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1, config: PLEConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        if c.n_levels < 1 or c.n_specific < 1 or c.n_shared < 1:
            raise ConfigError("head.n_levels, head.n_specific and head.n_shared must be >= 1")
        self.levels = nn.ModuleList()
        d = in_dim
        for j in range(c.n_levels):
            layer = CGC(d, n_tasks, c.n_specific, c.n_shared, tuple(c.expert_dims), c.dropout,
                        last=j == c.n_levels - 1)
            self.levels.append(layer)
            d = layer.out_dim
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(d, c.tower_dims, c.dropout), nn.Linear(out_dim(d, c.tower_dims), 1))
            for _ in range(n_tasks))

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        task_in, shared_in = [x] * self.n_tasks, x
        for layer in self.levels:
            task_in, shared_in = layer(task_in, shared_in)
        return torch.cat([t(task_in[k]) for k, t in enumerate(self.towers)], dim=1)
