"""STAR: Star Topology Adaptive Recommender (Sheng et al., CIKM 2021)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.heads.base import Head, HeadConfig, mlp, out_dim
from mmrec.heads.layers import PartitionedNorm, per_scenario
from mmrec.registry import HEADS


@dataclasses.dataclass
class STARConfig(HeadConfig):
    """Widths are ours (the paper does not list them); the auxiliary network is 2-layer, as the paper describes it."""

    hidden_dims: tuple[int, ...] = (128, 64)
    aux_dims: tuple[int, ...] = (32,)
    scenario_dim: int = 8        # scenario-indicator embedding fed to the auxiliary network
    pn_momentum: float = 0.1
    partitioned_norm: bool = True


class StarLinear(nn.Module):
    r"""Star-topology fully-connected layer:
    :math:`W^\star_p = W \otimes W_p,\ b^\star_p = b + b_p,\ out_p = \phi((W^\star_p)^\top in_p + b^\star_p)`.

    The shared centre ``W`` is initialised like ``nn.Linear``; every scenario's ``W_p``
    starts at 1 and ``b_p`` at 0, so training starts from the shared model.
    """

    def __init__(self, in_features: int, out_features: int, n_scenarios: int) -> None:
        super().__init__()
        self.n_scenarios, self.out_features = n_scenarios, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.weight_p = nn.Parameter(torch.ones(n_scenarios, in_features, out_features))
        self.bias_p = nn.Parameter(torch.zeros(n_scenarios, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.size(0))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.ones_(self.weight_p)
        nn.init.zeros_(self.bias_p)

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        return per_scenario(x, scenario, self.n_scenarios, self.out_features,
                            lambda s, xs: xs @ (self.weight * self.weight_p[s]) + (self.bias + self.bias_p[s]))


@HEADS.register("star")
class STARHead(Head):
    r"""STAR: partitioned normalisation of the input, a star-topology FCN, and an
    auxiliary network on the scenario indicator whose logit is added:
    :math:`\hat y = \sigma(s_m + s_a)`.
    """

    config_class: ClassVar[type] = STARConfig
    head_name: ClassVar[str] = "star"
    multi_scenario: ClassVar[bool] = True

    def __init__(self, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1, config: STARConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        self.norm = PartitionedNorm(in_dim, n_scenarios, c.pn_momentum) if c.partitioned_norm else None
        dims = [in_dim, *c.hidden_dims, n_tasks]
        self.layers = nn.ModuleList(StarLinear(a, b, n_scenarios) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        self.scenario_emb = nn.Embedding(n_scenarios, c.scenario_dim)
        aux_in = c.scenario_dim + in_dim
        self.aux = nn.Sequential(mlp(aux_in, c.aux_dims, c.dropout), nn.Linear(out_dim(aux_in, c.aux_dims), n_tasks))
        nn.init.normal_(self.scenario_emb.weight, std=0.1)

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        assert scenario is not None
        h = self.norm(x, scenario) if self.norm is not None else x
        main = h
        for j, layer in enumerate(self.layers):
            main = layer(main, scenario)
            if j < len(self.layers) - 1:
                main = self.dropout(torch.relu(main))
        aux = self.aux(torch.cat([self.scenario_emb(scenario), h], dim=1))
        return main + aux
