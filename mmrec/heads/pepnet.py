"""PEPNet: Parameter and Embedding Personalized Network (Chang et al., KDD 2023)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.heads.base import Head, HeadConfig
from mmrec.heads.layers import GateNU
from mmrec.registry import HEADS


@dataclasses.dataclass
class PEPNetConfig(HeadConfig):
    """γ = 2 as in the paper; tower widths and the scenario-embedding size are ours.

    ``prior_dim``: the last ``prior_dim`` columns of ``x`` are the personal priors
    (user / item / author id embeddings) PPNet's gates read; 0 = the whole ``x``.
    """

    hidden_dims: tuple[int, ...] = (128, 64)
    scenario_dim: int = 16
    gate_hidden: int | None = None   # GateNU hidden width (None: its output width)
    gamma: float = 2.0
    prior_dim: int = 0


@HEADS.register("pepnet")
class PEPNetHead(Head):
    r"""PEPNet, with ∅ the stop-gradient:

    .. math::
        \delta_{domain} = U_{ep}\big(E(F_d) \oplus ∅(E)\big),\quad O_{ep} = \delta_{domain}\otimes E

        \delta^{(l)}_{task} = U^{(l)}_{pp}\big(E(F_u)\oplus E(F_i)\oplus E(F_a) \oplus ∅(O_{ep})\big),\quad
        O^{(l)}_{pp} = \delta^{(l)}_{task} \otimes H^{(l)},\quad H^{(l+1)} = f(O^{(l)}_{pp} W^{(l)} + b^{(l)})

    EPNet scales the general input :math:`E` (here ``x``) per scenario; PPNet gates the
    input of every layer of every task tower from the personal priors. One GateNU per
    layer emits the gates of all T towers at once, split per task (as in the paper).
    """

    config_class: ClassVar[type] = PEPNetConfig
    head_name: ClassVar[str] = "pepnet"
    multi_scenario: ClassVar[bool] = True

    def __init__(self, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1, config: PEPNetConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        if not 0 <= c.prior_dim < in_dim:
            raise ConfigError(f"head.prior_dim must be in [0, {in_dim}) (in_dim={in_dim}), got {c.prior_dim}")
        self.general_dim = in_dim - c.prior_dim
        prior_width = c.prior_dim or in_dim
        self.scenario_emb = nn.Embedding(n_scenarios, c.scenario_dim)
        nn.init.normal_(self.scenario_emb.weight, std=0.1)
        self.epnet = GateNU(c.scenario_dim + self.general_dim, self.general_dim, c.gate_hidden, c.gamma)
        dims = [self.general_dim, *c.hidden_dims]
        self.ppnet = nn.ModuleList(GateNU(prior_width + self.general_dim, n_tasks * d, c.gate_hidden, c.gamma)
                                   for d in dims)
        self.towers = nn.ModuleList(
            nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, [*dims[1:], 1])) for _ in range(n_tasks))
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        assert scenario is not None
        c = self.config
        general = x[:, :self.general_dim]
        prior = x[:, self.general_dim:] if c.prior_dim else x
        delta_domain = self.epnet(torch.cat([self.scenario_emb(scenario), general.detach()], dim=1))
        o_ep = delta_domain * general
        gate_in = torch.cat([prior, o_ep.detach()], dim=1)
        gates = [g(gate_in).view(x.size(0), self.n_tasks, -1) for g in self.ppnet]   # L+1 x [B, T, d_l]
        outs = []
        for t, tower in enumerate(self.towers):
            h = o_ep
            for layer_idx, layer in enumerate(tower):
                h = layer(gates[layer_idx][:, t] * h)
                if layer_idx < len(tower) - 1:
                    h = self.dropout(torch.relu(h))
            outs.append(h)
        return torch.cat(outs, dim=1)
