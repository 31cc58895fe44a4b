"""Building blocks several heads share: per-scenario linear maps, partitioned norm, gate NU."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def per_scenario(x: Tensor, scenario: Tensor, n_scenarios: int, out_features: int, fn) -> Tensor:
    """Rows of ``x`` grouped by scenario, ``fn(s, x_s)`` applied to each group, put back in order.

    A loop over the (few) scenarios present instead of gathering a weight matrix per
    row: memory stays O(B·out) rather than O(B·in·out).
    """
    out = x.new_zeros(x.size(0), out_features)
    for s in range(n_scenarios):
        idx = (scenario == s).nonzero(as_tuple=True)[0]
        if len(idx):
            out = out.index_put((idx,), fn(s, x[idx]))
    return out


class ScenarioLinear(nn.Module):
    """One affine map per scenario: y = x W_s + b_s (weights stacked [S, in, out])."""

    def __init__(self, in_features: int, out_features: int, n_scenarios: int) -> None:
        super().__init__()
        self.n_scenarios, self.out_features = n_scenarios, out_features
        self.weight = nn.Parameter(torch.empty(n_scenarios, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n_scenarios, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.size(1))
        nn.init.uniform_(self.weight, -bound, bound)   # nn.Linear's default, per scenario
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        return per_scenario(x, scenario, self.n_scenarios, self.out_features,
                            lambda s, xs: xs @ self.weight[s] + self.bias[s])


class PartitionedNorm(nn.Module):
    r"""Partitioned normalisation (STAR, Sheng et al. 2021):

    .. math::
        z' = (\gamma \ast \gamma_p)\,\frac{z - E_p}{\sqrt{\mathrm{Var}_p + \epsilon}} + (\beta + \beta_p)

    Statistics are gathered per scenario ``p``: from that scenario's rows in the batch
    while training (a scenario with fewer than 2 rows uses its running statistics),
    from the per-scenario moving averages at inference. ``scenario_affine=False``
    keeps only the shared γ, β (HAMUR's "domain norm").
    """

    def __init__(self, dim: int, n_scenarios: int, momentum: float = 0.1, eps: float = 1e-5,
                 scenario_affine: bool = True) -> None:
        super().__init__()
        self.n_scenarios, self.momentum, self.eps = n_scenarios, momentum, eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        if scenario_affine:
            self.gamma_p = nn.Parameter(torch.ones(n_scenarios, dim))
            self.beta_p = nn.Parameter(torch.zeros(n_scenarios, dim))
        else:
            self.register_parameter("gamma_p", None)
            self.register_parameter("beta_p", None)
        self.register_buffer("running_mean", torch.zeros(n_scenarios, dim))
        self.register_buffer("running_var", torch.ones(n_scenarios, dim))

    def forward(self, z: Tensor, scenario: Tensor) -> Tensor:
        if self.training:
            cnt = torch.bincount(scenario, minlength=self.n_scenarios).to(z.dtype)
            denom = cnt.clamp(min=1.0).unsqueeze(1)
            mean = z.new_zeros(self.n_scenarios, z.size(1)).index_add(0, scenario, z) / denom
            var = z.new_zeros(self.n_scenarios, z.size(1)).index_add(0, scenario, (z - mean[scenario]) ** 2) / denom
            use = (cnt >= 2).unsqueeze(1)
            with torch.no_grad():
                unbiased = var * cnt.unsqueeze(1) / (cnt - 1).clamp(min=1.0).unsqueeze(1)
                m = self.momentum * use.to(z.dtype)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
            mean = torch.where(use, mean, self.running_mean)
            var = torch.where(use, var, self.running_var)
        else:
            mean, var = self.running_mean, self.running_var
        zn = (z - mean[scenario]) * torch.rsqrt(var[scenario] + self.eps)
        if self.gamma_p is None:
            return self.gamma * zn + self.beta
        return (self.gamma * self.gamma_p[scenario]) * zn + (self.beta + self.beta_p[scenario])


class GateNU(nn.Module):
    r"""PEPNet's gate neural unit (Chang et al. 2023):
    :math:`\delta = \gamma\,\sigma(W_2\,\mathrm{ReLU}(W_1 x + b_1) + b_2)`, γ = 2, so the
    gate scales in (0, 2) and is 1 at a neutral start."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, gamma: float = 2.0) -> None:
        super().__init__()
        hidden = hidden or out_dim
        self.gamma = gamma
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * torch.sigmoid(self.net(x))
