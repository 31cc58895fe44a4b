"""HierRec: Scenario-Aware Hierarchical Dynamic Network (Gao et al., CIKM 2024, arXiv:2309.02061)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.heads.base import Head, HeadConfig, mlp, out_dim
from mmrec.registry import HEADS


@dataclasses.dataclass
class HierRecConfig(HeadConfig):
    """Sizes are ours (the abstract we worked from gives none)."""

    bottom_dims: tuple[int, ...] = (128,)
    dynamic_dim: int = 32        # width of every scenario-oriented (dynamic-weight) layer
    scenario_dim: int = 16       # explicit scenario embedding and implicit pattern width
    implicit_heads: int = 4
    implicit_patterns: int = 8   # learned implicit scenario patterns per head
    tower_dims: tuple[int, ...] = (64,)


class ScenarioOriented(nn.Module):
    r"""The basic scenario-oriented module: a layer whose weights are generated from a
    scenario representation :math:`c` (dynamic weight):

    .. math::
        W(c) = \mathrm{reshape}(G_W\,c),\quad b(c) = G_b\,c,\quad
        \mathrm{SOM}(h, c) = \mathrm{ReLU}\big(h\,W(c) + b(c) + h\,W_0 + b_0\big)

    A static path :math:`W_0, b_0` keeps what all scenarios share (so the generated part only
    models the difference).
    """

    def __init__(self, in_dim: int, out_features: int, cond_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_features = in_dim, out_features
        self.gen_w = nn.Linear(cond_dim, in_dim * out_features, bias=False)
        self.gen_b = nn.Linear(cond_dim, out_features)
        self.static = nn.Linear(in_dim, out_features)
        nn.init.normal_(self.gen_w.weight, std=1.0 / math.sqrt(in_dim * cond_dim))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        w = self.gen_w(c).view(-1, self.in_dim, self.out_features)
        dyn = torch.bmm(h.unsqueeze(1), w).squeeze(1) + self.gen_b(c)
        return torch.relu(dyn + self.static(h))


class ImplicitScenario(nn.Module):
    r"""One implicit head: the instance attends over K learned scenario patterns
    :math:`P\in\mathbb R^{K\times c}` and the mixture is its implicit scenario:
    :math:`c = \operatorname{softmax}(q(h) P^\top/\sqrt c)\,P`."""

    def __init__(self, in_dim: int, n_patterns: int, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(in_dim, dim)
        self.patterns = nn.Parameter(torch.randn(n_patterns, dim) / math.sqrt(dim))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        attn = (self.query(h) @ self.patterns.T * self.scale).softmax(-1)   # [B, K]
        return attn @ self.patterns, attn


@HEADS.register("hierrec")
class HierRecHead(Head):
    r"""HierRec, after the paper's abstract:

    1. a shared bottom gives the general representation :math:`h_0`;
    2. **explicit** scenario modelling: a scenario-oriented module conditioned on the
       scenario id's embedding, :math:`h_e = \mathrm{SOM}_e(h_0, E(s))`;
    3. **implicit** scenario modelling, hierarchical on top of it: each of M heads finds
       its own implicit scenario by attention over learned patterns (:class:`ImplicitScenario`)
       and applies its own scenario-oriented module, :math:`h_m = \mathrm{SOM}_m(h_e, c_m)`;
    4. the towers read :math:`[h_e \| h_1 \| … \| h_M]`.

    Choices where the text we had (the abstract) is silent: the implicit scenario is an
    attention mixture of learned pattern vectors queried by the explicit-level output,
    the dynamic layer has a static residual path, and the explicit output is kept
    beside the implicit heads' outputs for the towers.
    """

    config_class: ClassVar[type] = HierRecConfig
    head_name: ClassVar[str] = "hierrec"
    multi_scenario: ClassVar[bool] = True

    def __init__(self, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1, config: HierRecConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        self.bottom = mlp(in_dim, c.bottom_dims, c.dropout)
        d0 = out_dim(in_dim, c.bottom_dims)
        self.scenario_emb = nn.Embedding(n_scenarios, c.scenario_dim)
        nn.init.normal_(self.scenario_emb.weight, std=1.0)
        self.explicit = ScenarioOriented(d0, c.dynamic_dim, c.scenario_dim)
        self.implicit = nn.ModuleList(ImplicitScenario(c.dynamic_dim, c.implicit_patterns, c.scenario_dim)
                                      for _ in range(c.implicit_heads))
        self.implicit_som = nn.ModuleList(ScenarioOriented(c.dynamic_dim, c.dynamic_dim, c.scenario_dim)
                                          for _ in range(c.implicit_heads))
        d = c.dynamic_dim * (1 + c.implicit_heads)
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(d, c.tower_dims, c.dropout), nn.Linear(out_dim(d, c.tower_dims), 1))
            for _ in range(n_tasks))

    def representation(self, x: Tensor, scenario: Tensor) -> Tensor:
        h0 = self.bottom(x)
        h_e = self.explicit(h0, self.scenario_emb(scenario))
        parts = [h_e]
        for find, som in zip(self.implicit, self.implicit_som):
            c_m, _ = find(h_e)
            parts.append(som(h_e, c_m))
        return torch.cat(parts, dim=1)

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        assert scenario is not None
        z = self.representation(x, scenario)
        return torch.cat([t(z) for t in self.towers], dim=1)
