"""Loss balancing across tasks: fixed weights, uncertainty weighting, GradNorm.

Every balancer is an ``nn.Module`` mapping the per-task losses [T] (``Head.task_losses``)
to one scalar to back-propagate; learnable balancers own parameters that go into the
same optimizer as the model:

>>> bal = create_balancer("uncertainty", n_tasks=2)
>>> opt = torch.optim.Adam([*head.parameters(), *bal.parameters()])
>>> loss = bal(head.task_losses(logits, y)) + head.aux_loss(logits)
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.registry import Registry

BALANCERS: Registry = Registry("loss balancing")


class LossBalancer(nn.Module):
    """Base: ``forward(losses [T]) -> scalar``; ``weights()`` the current task weights [T]."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        if n_tasks < 1:
            raise ConfigError(f"loss balancing needs n_tasks >= 1, got {n_tasks}")
        self.n_tasks = n_tasks

    def check(self, losses: Tensor) -> None:
        if losses.shape != (self.n_tasks,):
            raise ConfigError(f"expected {self.n_tasks} per-task losses, got shape {list(losses.shape)}")

    def weights(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@BALANCERS.register("fixed")
class FixedWeights(LossBalancer):
    """L = Σ_t w_t L_t with constant weights (default: all 1)."""

    def __init__(self, n_tasks: int, weights: Sequence[float] | None = None) -> None:
        super().__init__(n_tasks)
        w = [1.0] * n_tasks if weights is None else [float(v) for v in weights]
        if len(w) != n_tasks:
            raise ConfigError(f"loss weights: {len(w)} given for {n_tasks} tasks")
        if any(v < 0 for v in w):
            raise ConfigError(f"loss weights must be >= 0, got {w}")
        self.register_buffer("w", torch.tensor(w, dtype=torch.float32))

    def forward(self, losses: Tensor) -> Tensor:
        self.check(losses)
        return (self.w.to(losses.dtype) * losses).sum()

    def weights(self) -> Tensor:
        return self.w.clone()


@BALANCERS.register("uncertainty")
class UncertaintyWeighting(LossBalancer):
    r"""Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    With :math:`s_t = \log\sigma_t^2` learned (stable, unconstrained):

    .. math::
        L = \sum_t c_t\, e^{-s_t} L_t + \tfrac12 s_t,\qquad
        c_t = 1 \text{ (classification)},\ \tfrac12 \text{ (regression)}

    A noisier task learns a larger :math:`\sigma_t` and is down-weighted; the
    :math:`\log\sigma` term keeps it from switching the task off.
    """

    def __init__(self, n_tasks: int, kinds: Sequence[str] | None = None, init_log_var: float = 0.0) -> None:
        super().__init__(n_tasks)
        kinds = list(kinds) if kinds is not None else ["classification"] * n_tasks
        if len(kinds) != n_tasks or any(k not in ("classification", "regression") for k in kinds):
            raise ConfigError(f"uncertainty weighting: kinds must be {n_tasks} of classification/regression, got {kinds}")
        self.register_buffer("c", torch.tensor([1.0 if k == "classification" else 0.5 for k in kinds]))
        self.log_var = nn.Parameter(torch.full((n_tasks,), float(init_log_var)))

    def forward(self, losses: Tensor) -> Tensor:
        self.check(losses)
        return (self.c * torch.exp(-self.log_var) * losses + 0.5 * self.log_var).sum()

    def weights(self) -> Tensor:
        return (self.c * torch.exp(-self.log_var)).detach()


@BALANCERS.register("gradnorm")
class GradNorm(LossBalancer):
    r"""GradNorm (Chen et al., ICML 2018): learn task weights :math:`w_t` so that each
    task's gradient norm on the shared weights ``W`` trains at a rate matched to its
    relative inverse training rate.

    .. math::
        G^{(t)}_W = \|\nabla_W\, w_t L_t\|_2,\quad \tilde L_t = L_t / L_t(0),\quad
        r_t = \tilde L_t / \mathbb E_t[\tilde L_t]

        L_{grad} = \sum_t \big|\,G^{(t)}_W - \mathrm{sg}\big[\bar G_W\, r_t^{\alpha}\big]\big|_1

    :meth:`forward` returns :math:`\sum_t \mathrm{sg}[w_t] L_t + L_{grad}`, in which
    :math:`L_{grad}` reaches only the weights (we use :math:`G^{(t)}_W = w_t\,\mathrm{sg}[\|\nabla_W L_t\|]`,
    which has the same gradient with respect to :math:`w_t`, and the network is trained
    by the weighted loss only, as in the paper). Call :meth:`renormalize` after each
    optimizer step so that :math:`\sum_t w_t = T`. ``shared``: the parameters of the last
    shared layer (e.g. ``head.bottom[-2].weight`` of shared-bottom).
    """

    def __init__(self, n_tasks: int, shared: Iterable[Tensor] | Tensor, alpha: float = 1.5) -> None:
        super().__init__(n_tasks)
        self.shared = [shared] if isinstance(shared, Tensor) else list(shared)
        if not self.shared:
            raise ConfigError("gradnorm needs the shared layer's parameters")
        self.alpha = alpha
        self.w = nn.Parameter(torch.ones(n_tasks))
        self.register_buffer("initial", torch.zeros(n_tasks))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, losses: Tensor) -> Tensor:
        self.check(losses)
        if not bool(self.started):
            self.initial.copy_(losses.detach().clamp(min=1e-12))
            self.started.fill_(True)
        norms = []
        for t in range(self.n_tasks):
            grads = torch.autograd.grad(losses[t], self.shared, retain_graph=True, allow_unused=True)
            sq = sum((g.detach() ** 2).sum() for g in grads if g is not None)
            norms.append(torch.sqrt(torch.as_tensor(sq, dtype=losses.dtype, device=losses.device)))
        g = self.w * torch.stack(norms)                                   # G_W^(t)
        ratio = losses.detach() / self.initial
        target = (g.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        l_grad = (g - target).abs().sum()
        return (self.w.detach() * losses).sum() + l_grad

    @torch.no_grad()
    def renormalize(self) -> None:
        """Rescale the weights to sum to T (and keep them positive)."""
        self.w.clamp_(min=1e-6)
        self.w.mul_(self.n_tasks / self.w.sum())

    def weights(self) -> Tensor:
        return self.w.detach().clone()


def create_balancer(name: str, n_tasks: int, **kwargs: Any) -> LossBalancer:
    """Build a registered balancer (``fixed``, ``uncertainty``, ``gradnorm``)."""
    return BALANCERS.get(name)(n_tasks, **kwargs)
