"""MESI (Multi-Expert with Separate Input, CIGF: Guo et al., KDD 2023) as a stand-alone head."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.graph.cigf import MESI
from mmrec.heads.base import Head, HeadConfig
from mmrec.registry import HEADS


@dataclasses.dataclass
class MESIConfig(HeadConfig):
    """``dim=None``: ``x`` already holds the separate inputs; else each expert's input is projected to ``dim``."""

    dim: int | None = None
    shared_gate: bool = False
    mult: float = 1.0


@HEADS.register("mesi")
class MESIHead(Head):
    r"""CIGF's :class:`~mmrec.graph.cigf.MESI` on a feature vector: one expert per task.

    Expert k reads only its own input, the pair :math:`(\mathbf e^k_u, \mathbf e^k_i)`, and
    scores :math:`\mathbf 1^\top(\mathbf e^k_u \odot \mathbf e^k_i)`; task t mixes the experts
    with a gate fed by task t's own input (see the MESI docstring for the equations).

    With ``dim=None``, ``x`` is the multi-behaviour backbone's output laid out as
    ``[e_u^1 ‖ e_i^1 ‖ … ‖ e_u^T ‖ e_i^T]`` (``in_dim = 2·T·d``), the paper's separate
    inputs. With ``dim`` set, a learned linear map per expert builds those inputs from
    any ``x`` (our addition, so MESI can sit on single-representation backbones). A
    per-task bias is added to the logits: the BCE-trained tasks need an intercept that
    CIGF's BPR loss did not.
    """

    config_class: ClassVar[type] = MESIConfig
    head_name: ClassVar[str] = "mesi"

    def __init__(self, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1, config: MESIConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        if c.dim is None:
            if in_dim % (2 * n_tasks):
                raise ConfigError(f"head 'mesi' without head.dim reads x as [e_u^k ‖ e_i^k] for each of the "
                                  f"{n_tasks} tasks, so in_dim must be divisible by {2 * n_tasks}; got {in_dim} "
                                  f"(set head.dim to project instead)")
            self.dim, self.project = in_dim // (2 * n_tasks), None
        else:
            self.dim = int(c.dim)
            self.project = nn.Linear(in_dim, 2 * n_tasks * self.dim)
        self.mesi = MESI(self.dim, n_tasks, c.shared_gate, c.mult)
        self.bias = nn.Parameter(torch.zeros(n_tasks))

    def separate_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(u, i), each [T, B, d]: expert k's user and item representations."""
        z = x if self.project is None else self.project(x)
        z = z.view(x.size(0), self.n_tasks, 2, self.dim).permute(2, 1, 0, 3)
        return z[0], z[1]

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        u, i = self.separate_inputs(x)
        rows = x.size(0)
        cols = [self.mesi(torch.full((rows,), t, dtype=torch.long, device=x.device), u, i)
                for t in range(self.n_tasks)]
        return torch.stack(cols, dim=1) + self.bias
