"""HAMUR: Hyper Adapter for Multi-Domain Recommendation (Li et al., CIKM 2023)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.heads.base import Head, HeadConfig
from mmrec.heads.layers import PartitionedNorm, ScenarioLinear
from mmrec.registry import HEADS


@dataclasses.dataclass
class HAMURConfig(HeadConfig):
    """Adapter width 32 and hyper-network (64,) as in the official code; backbone widths and k are ours."""

    hidden_dims: tuple[int, ...] = (256, 64)
    adapter_dim: int = 32
    k: int = 32                 # side of the instance matrix the hyper-network generates
    hyper_dims: tuple[int, ...] = (64,)


class HyperAdapter(nn.Module):
    r"""One adapter cell whose weights a shared hyper-network generates per instance:

    .. math::
        M(x) = \mathrm{HyperNet}(x) \in \mathbb R^{k\times k},\quad
        W_{down}(x) = U_1 M(x) V_1,\quad W_{up}(x) = U_2 M(x) V_2

        a = \sigma(h\,W_{down}(x) + b_1)\,W_{up}(x) + b_2,\qquad
        h' = h + \mathrm{DomainNorm}_d(a)

    :math:`h W_{down}` is computed as :math:`((h U_1) M) V_1`, never materialising the
    per-instance [h, a] matrix.
    """

    def __init__(self, dim: int, adapter_dim: int, k: int, n_scenarios: int) -> None:
        super().__init__()
        self.u1 = nn.Parameter(torch.empty(dim, k))
        self.v1 = nn.Parameter(torch.empty(k, adapter_dim))
        self.u2 = nn.Parameter(torch.empty(adapter_dim, k))
        self.v2 = nn.Parameter(torch.empty(k, dim))
        self.b1 = nn.Parameter(torch.zeros(adapter_dim))
        self.b2 = nn.Parameter(torch.zeros(dim))
        self.norm = PartitionedNorm(dim, n_scenarios, scenario_affine=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.u1, self.v1, self.u2, self.v2):
            nn.init.normal_(p, std=1.0 / math.sqrt(p.size(0)))
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, h: Tensor, m: Tensor, scenario: Tensor) -> Tensor:
        a = torch.bmm((h @ self.u1).unsqueeze(1), m).squeeze(1) @ self.v1 + self.b1
        a = torch.sigmoid(a)
        a = torch.bmm((a @ self.u2).unsqueeze(1), m).squeeze(1) @ self.v2 + self.b2
        return h + self.norm(a, scenario)


@HEADS.register("hamur")
class HAMURHead(Head):
    r"""HAMUR on a domain-specific MLP backbone (the paper's "MLP + HAMUR").

    Each scenario (domain) has its own MLP; a domain-specific adapter cell sits after
    its last hidden layer, and the adapter's parameters come from one hyper-network
    shared by all domains, fed with the instance ``x`` — the shared part carries what
    the domains have in common, per instance. As in the official code the factors
    ``U, V`` are shared and the domain norm uses per-domain statistics; choices where
    the paper is silent: domain norm statistics come from that domain's rows of the batch
    (running averages at inference), no batch norm inside the backbone.
    """

    config_class: ClassVar[type] = HAMURConfig
    head_name: ClassVar[str] = "hamur"
    multi_scenario: ClassVar[bool] = True

    def __init__(self, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1, config: HAMURConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        if not c.hidden_dims:
            raise ConfigError("head.hidden_dims must not be empty for hamur (the adapter follows the last hidden layer)")
        dims = [in_dim, *c.hidden_dims]
        self.backbone = nn.ModuleList(ScenarioLinear(a, b, n_scenarios) for a, b in zip(dims[:-1], dims[1:]))
        layers: list[nn.Module] = []
        d = in_dim
        for h in c.hyper_dims:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, c.k * c.k))
        self.hyper = nn.Sequential(*layers)
        self.k = c.k
        self.adapter = HyperAdapter(dims[-1], c.adapter_dim, c.k, n_scenarios)
        self.out = ScenarioLinear(dims[-1], n_tasks, n_scenarios)
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        assert scenario is not None
        # / k keeps U M V at the scale of U V whatever k is (the code instead normalises the adapter output)
        m = self.hyper(x).view(-1, self.k, self.k) / self.k
        h = x
        for layer in self.backbone:
            h = self.dropout(torch.relu(layer(h, scenario)))
        h = self.adapter(h, m, scenario)
        return self.out(h, scenario)
