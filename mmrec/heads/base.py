"""The head contract: features ``x`` [B, d] (+ scenario ids [B]) -> logits [B, n_tasks].

A head sits on top of any backbone (graph model, fusion model, frozen features): the
backbone produces one representation per exposure (user ⊙ item, or a concatenation
with side features) and the head turns it into one logit per task. Every head is a
plain ``nn.Module`` and is used the same way by the trainer:

>>> head = create_head("mmoe", in_dim=32, n_tasks=2)
>>> logits = head(x)                              # [B, 2]
>>> loss = balancer(head.task_losses(logits, y)) + head.aux_loss(logits)

Multi-scenario heads (``multi_scenario = True``) also take ``scenario`` [B] int64.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.config import from_dict
from mmrec.errors import ConfigError, DataError
from mmrec.registry import HEADS


@dataclasses.dataclass
class HeadConfig:
    """Fields every head config shares."""

    dropout: float = 0.0


class Head(nn.Module):
    """Base class of every head: checks inputs, owns the per-task loss.

    Subclasses implement :meth:`logits` and set ``config_class``; the constructor
    signature is ``(in_dim, n_tasks, n_scenarios, config)``.
    """

    config_class: ClassVar[type] = HeadConfig
    head_name: ClassVar[str] = "head"  # the registry name, for messages
    multi_scenario: ClassVar[bool] = False
    #: smallest / largest number of tasks the head is defined for (None: no bound)
    min_tasks: ClassVar[int] = 1
    max_tasks: ClassVar[int | None] = None

    def __init__(self, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1, config: Any = None) -> None:
        super().__init__()
        name = self.head_name
        if in_dim < 1:
            raise ConfigError(f"head '{name}': in_dim must be >= 1, got {in_dim}")
        if n_tasks < self.min_tasks or (self.max_tasks is not None and n_tasks > self.max_tasks):
            bound = f"exactly {self.min_tasks}" if self.min_tasks == self.max_tasks else \
                f"at least {self.min_tasks}" + (f" and at most {self.max_tasks}" if self.max_tasks else "")
            raise ConfigError(f"head '{name}' needs {bound} tasks, got n_tasks={n_tasks}")
        if n_scenarios < 1:
            raise ConfigError(f"head '{name}': n_scenarios must be >= 1, got {n_scenarios}")
        self.in_dim, self.n_tasks, self.n_scenarios = in_dim, n_tasks, n_scenarios
        self.config = config if config is not None else self.config_class()

    # -- the contract ---------------------------------------------------------------
    def forward(self, x: Tensor, scenario: Tensor | None = None) -> Tensor:
        """Logits [B, n_tasks] of features ``x`` [B, in_dim] (and ``scenario`` ids [B])."""
        if x.dim() != 2 or x.size(1) != self.in_dim:
            raise DataError(f"head expects features of shape [B, {self.in_dim}], got {list(x.shape)}",
                            field="x")
        # single-scenario heads ignore the ids, so a trainer can pass them to any head
        scenario = check_scenario(scenario, self.n_scenarios, x.size(0)) if self.multi_scenario else None
        return self.logits(x, scenario)

    def logits(self, x: Tensor, scenario: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def task_losses(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean binary cross-entropy per task, [n_tasks] (``mask`` [B, T]: which labels count)."""
        if labels.shape != logits.shape:
            raise DataError(f"labels have shape {list(labels.shape)}, the head's logits {list(logits.shape)}",
                            field="labels")
        per = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        if mask is None:
            return per.mean(0)
        m = mask.to(per.dtype)
        return (per * m).sum(0) / m.sum(0).clamp(min=1.0)

    def aux_loss(self, logits: Tensor) -> Tensor:
        """Extra loss a head defines on top of the task losses (AITM's calibrator); 0 by default."""
        return logits.new_zeros(())

    def predict_proba(self, x: Tensor, scenario: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self(x, scenario))


def check_scenario(scenario: Tensor | None, n_scenarios: int, n_rows: int) -> Tensor:
    """Scenario ids as int64 [B], or a :class:`DataError` naming the ``scenario`` column."""
    if scenario is None:
        raise DataError("this head needs scenario ids (one per row)", field="scenario")
    scenario = torch.as_tensor(scenario)
    if scenario.dtype.is_floating_point or scenario.dtype == torch.bool:
        raise DataError(f"scenario ids must be integers, got {scenario.dtype}", field="scenario")
    if scenario.shape != (n_rows,):
        raise DataError(f"expected {n_rows} scenario ids, got shape {list(scenario.shape)}", field="scenario")
    if n_rows:
        lo, hi = int(scenario.min()), int(scenario.max())
        if lo < 0 or hi >= n_scenarios:
            bad = lo if lo < 0 else hi
            raise DataError(f"scenario id {bad} out of range [0, {n_scenarios})", field="scenario")
    return scenario.long()


def mlp(in_dim: int, dims: Sequence[int], dropout: float = 0.0, last_activation: bool = True) -> nn.Sequential:
    """Linear -> ReLU -> Dropout blocks; ``dims=()`` is the identity."""
    layers: list[nn.Module] = []
    for j, d in enumerate(dims):
        layers.append(nn.Linear(in_dim, int(d)))
        if last_activation or j < len(dims) - 1:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        in_dim = int(d)
    return nn.Sequential(*layers)


def out_dim(in_dim: int, dims: Sequence[int]) -> int:
    return int(dims[-1]) if len(dims) else in_dim


def create_head(name: str, in_dim: int, n_tasks: int = 1, n_scenarios: int = 1, **cfg: Any) -> Head:
    """Build a registered head (timm-style factory); ``cfg`` fills its config dataclass."""
    cls = HEADS.get(name)
    config = from_dict(cls.config_class, cfg, path="head")
    return cls(in_dim, n_tasks, n_scenarios, config)


def task_labels(labels: Mapping[str, np.ndarray | Tensor], tasks: int | Sequence[str],
                source: str = "exposures.tsv") -> tuple[list[str], Tensor]:
    """The label matrix [n, T] a head trains on, looked up by task name or count.

    ``tasks`` is a list of label names (in cascade order, e.g. ``["click", "convert"]``)
    or a count (the first ``tasks`` labels in the data's order). Asking for more tasks
    than the data defines, or for a name it lacks, lists the tasks it has.
    """
    have = list(labels)
    listing = ", ".join(have) if have else "(none)"
    if isinstance(tasks, int):
        if tasks > len(have):
            raise DataError(f"the head needs {tasks} tasks but the data defines {len(have)}: {listing}",
                            file=source, field="labels")
        names = have[:tasks]
    else:
        names = list(tasks)
        missing = [t for t in names if t not in labels]
        if missing:
            raise DataError(f"task(s) {', '.join(missing)} not in the data; it defines: {listing}",
                            file=source, field="labels")
    cols = [torch.as_tensor(np.asarray(labels[t]), dtype=torch.float32) for t in names]
    return names, torch.stack(cols, dim=1) if cols else torch.zeros(0, 0)
