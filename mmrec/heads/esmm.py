"""Entire Space Multi-task Model (Ma et al., SIGIR 2018)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.heads.base import Head, HeadConfig, mlp, out_dim
from mmrec.registry import HEADS


@dataclasses.dataclass
class ESMMConfig(HeadConfig):
    """Towers 360-200-80 as in the paper's experiments; ``shared_dims`` is the shared
    representation layer both towers read (the paper shares the embedding lookup; with
    dense inputs that is a shared linear map, empty = the towers read ``x`` itself)."""

    shared_dims: tuple[int, ...] = ()
    tower_dims: tuple[int, ...] = (360, 200, 80)


def log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, stable at both ends (Mächler 2012)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


@HEADS.register("esmm")
class ESMMHead(Head):
    r"""ESMM:

    .. math::
        p(z{=}1, y{=}1\mid x) = p(y{=}1\mid x)\cdot p(z{=}1\mid y{=}1, x),\qquad
        L = \sum_i \ell(y_i, \text{pCTR}_i) + \sum_i \ell(y_i \& z_i, \text{pCTR}_i \times \text{pCVR}_i)

    Both losses run over every exposure: the CVR tower is never fitted on clicked rows
    alone, it is learned through pCTCVR, which removes the sample-selection bias.
    Tasks (outputs) are ``[ctr, ctcvr]`` as logits, so the labels are ``[click, click & convert]``
    and the base class's BCE is exactly the paper's loss; :meth:`cvr_logits` gives pCVR.
    """

    config_class: ClassVar[type] = ESMMConfig
    head_name: ClassVar[str] = "esmm"
    min_tasks: ClassVar[int] = 2
    max_tasks: ClassVar[int | None] = 2
    tasks: ClassVar[tuple[str, str]] = ("ctr", "ctcvr")

    def __init__(self, in_dim: int, n_tasks: int = 2, n_scenarios: int = 1, config: ESMMConfig | None = None) -> None:
        super().__init__(in_dim, n_tasks, n_scenarios, config)
        c = self.config
        self.shared = mlp(in_dim, c.shared_dims, c.dropout)
        d = out_dim(in_dim, c.shared_dims)
        self.ctr_tower = nn.Sequential(mlp(d, c.tower_dims, c.dropout), nn.Linear(out_dim(d, c.tower_dims), 1))
        self.cvr_tower = nn.Sequential(mlp(d, c.tower_dims, c.dropout), nn.Linear(out_dim(d, c.tower_dims), 1))

    def ctr_cvr_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.shared(x)
        return self.ctr_tower(z).squeeze(1), self.cvr_tower(z).squeeze(1)

    def cvr_logits(self, x: Tensor) -> Tensor:
        """pCVR logits [B] = p(convert | click, x), defined on the whole exposure space."""
        return self.ctr_cvr_logits(x)[1]

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:
        a, b = self.ctr_cvr_logits(x)
        log_ctcvr = F.logsigmoid(a) + F.logsigmoid(b)        # log(pCTR · pCVR)
        log_ctcvr = log_ctcvr.clamp(max=-1e-7)
        return torch.stack([a, log_ctcvr - log1mexp(log_ctcvr)], dim=1)
