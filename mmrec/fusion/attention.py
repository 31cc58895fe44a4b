r"""Learned modality weighting: ``attention`` (MICRO) and ``gated`` (GMU-style gated sum).

Both take the projected modality embeddings :math:`e_{i,m} \in \mathbb{R}^d` of
:class:`~mmrec.fusion.content.ItemContentEncoder` and their presence masks. A modality an
item lacks gets weight 0 and receives no gradient: it is excluded from the softmax (score
:math:`-\infty`) or its gate is multiplied by the mask, and its row is zeroed before any
product. Items with no modality at all fuse to the zero vector.

Each module keeps the weights of its last call (``last_weights`` [n_items, M], detached) so
tests, reports and users can see which modality a trained model relies on:
:meth:`mean_weights` averages them per modality over the items that have it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.registry import FUSIONS

Parts = dict[str, Tensor]


def stack_parts(modalities: list[str], parts: Parts, masks: Parts) -> tuple[Tensor, Tensor]:
    """(embeddings [n, M, d] with absent rows zeroed, presence [n, M] bool).

    ``torch.where`` rather than a product with the mask: a NaN or inf placeholder in an
    absent row must not survive (``NaN * 0`` is NaN) and must get no gradient.
    """
    missing = [m for m in modalities if m not in parts or m not in masks]
    if missing:
        raise ConfigError(f"fusion built for modalities {modalities} got no input for {missing}")
    present = torch.stack([masks[m].bool() for m in modalities], dim=1)
    e = torch.stack([parts[m] for m in modalities], dim=1)
    return torch.where(present.unsqueeze(-1), e, torch.zeros((), dtype=e.dtype, device=e.device)), present


def mean_over_present(modalities: list[str], values: Tensor, present: Tensor,
                      items: Tensor | None = None) -> dict[str, float]:
    """Per-modality mean of ``values`` [n, M] over the rows (of ``items``) that have the modality.

    NaN for a modality no selected row has. ``items``: bool mask [n] or index tensor.
    """
    if items is not None:
        items = torch.as_tensor(items, device=values.device)
        if items.dtype == torch.bool and items.shape != values.shape[:1]:
            raise ConfigError(f"items mask has shape {tuple(items.shape)}, the last call had {values.shape[0]} rows")
        values, present = values[items], present[items]
    values = values.float()
    counts = present.sum(0)
    means = (values * present).sum(0) / counts.clamp(min=1)
    means = torch.where(counts > 0, means, torch.full_like(means, float("nan")))
    return {m: float(v) for m, v in zip(modalities, means.tolist())}


class _WeightedFusion(nn.Module):
    """Shared bookkeeping: the last per-item modality weights and their per-modality mean."""

    def __init__(self, modalities: list[str], dim: int) -> None:
        super().__init__()
        if not modalities:
            raise ConfigError("a fusion needs at least one modality")
        self.modalities = list(modalities)
        self.dim = dim
        self.last_weights: Tensor | None = None   # [n, M], 0 where the modality is absent
        self.last_present: Tensor | None = None   # [n, M] bool

    def _keep(self, weights: Tensor, present: Tensor) -> None:
        self.last_weights = weights.detach()
        self.last_present = present.detach()

    def mean_weights(self, items: Tensor | None = None) -> dict[str, float]:
        """Mean weight of each modality over the items that have it (from the last call).

        ``items`` (bool mask [n] or indices) restricts the mean to those items, e.g. the
        ones whose text is known to be noise. A modality none of them has is NaN, not 0.
        """
        if self.last_weights is None or self.last_present is None:
            raise ConfigError(f"{type(self).__name__}.mean_weights(): the module has not been called yet")
        return mean_over_present(self.modalities, self.last_weights, self.last_present, items)


@FUSIONS.register("attention")
class AttentionFusion(_WeightedFusion):
    r"""Modality attention of MICRO (Zhang et al., "Latent Structure Mining with Contrastive
    Modality Fusion for Multimedia Recommendation", TKDE 2022).

    .. math::
        \alpha_{i,m} = \operatorname{softmax}_{m \in \mathcal{M}_i}\big(
            \mathbf{q}^\top \tanh(\mathbf{W} e_{i,m} + \mathbf{b})\big),
        \qquad c_i = \sum_{m \in \mathcal{M}_i} \alpha_{i,m}\, e_{i,m}

    :math:`\mathbf{W}, \mathbf{b}, \mathbf{q}` are shared by all modalities (as in MICRO's
    ``query`` network: Linear -> Tanh -> Linear without bias), so the weight depends on
    what the embedding looks like, not on a per-modality prior. :math:`\mathcal{M}_i` are
    the modalities item ``i`` has; the others get score :math:`-\infty`; ``c_i = 0`` when
    :math:`\mathcal{M}_i = \emptyset`.

    Because the score is computed from each item's own embedding and the weights are
    relative (they sum to 1 over the item's modalities), the attention can down-weight a
    modality on the items where it is noise and keep it where it is informative, which a
    per-modality projection scale cannot (measured in docs/models/fusion.md).
    """

    renormalises: ClassVar[bool] = True  # weights sum to 1 over the modalities an item has

    def __init__(self, modalities: list[str], dim: int) -> None:
        super().__init__(modalities, dim)
        self.proj = nn.Linear(dim, dim)             # W, b
        self.query = nn.Linear(dim, 1, bias=False)  # q
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        nn.init.xavier_uniform_(self.query.weight)

    def forward(self, parts: Parts, masks: Parts, id_emb: Tensor | None = None) -> Tensor:
        e, present = stack_parts(self.modalities, parts, masks)          # [n, M, d], [n, M]
        scores = self.query(torch.tanh(self.proj(e))).squeeze(-1)        # qᵀ tanh(W e + b): [n, M]
        scores = scores.masked_fill(~present, float("-inf"))
        has_any = present.any(dim=1, keepdim=True)
        # an item with no modality would softmax over all -inf (NaN): give it finite scores,
        # then zero its weights, so neither its output nor any gradient sees a NaN
        scores = torch.where(has_any, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
        alpha = torch.softmax(scores, dim=1) * has_any.to(scores.dtype)  # [n, M]
        self._keep(alpha, present)
        return (alpha.unsqueeze(-1) * e).sum(dim=1)


@FUSIONS.register("gated")
class GatedFusion(_WeightedFusion):
    r"""Gated sum: one sigmoid gate vector per modality, computed from all modalities.

    .. math::
        g_{i,m} = \sigma\big(\mathbf{W}_m [e_{i,1} \,\|\, \dots \,\|\, e_{i,M}] + \mathbf{b}_m\big),
        \qquad c_i = \sum_m \mathbb{1}[i \text{ has } m]\; g_{i,m} \odot e_{i,m}

    The gate of the Gated Multimodal Unit (Arevalo et al., "Gated Multimodal Units for
    Information Fusion", ICLR workshop 2017), one gate per modality instead of GMU's
    z / (1 - z) pair, so it takes any number of modalities. GMU's ``tanh(W_m x_m)``
    transform is the encoder's linear projection here (no tanh), so ``gated`` and ``sum``
    produce vectors on the same scale. Absent modalities enter the gate input as zeros
    and their gate is masked to 0. ``last_weights[i, m]`` is the mean of ``g_{i,m}``
    over the ``d`` dimensions.
    """

    def __init__(self, modalities: list[str], dim: int) -> None:
        super().__init__(modalities, dim)
        n = len(self.modalities)
        self.gate = nn.Linear(n * dim, n * dim)  # [W_1; ...; W_M], [b_1; ...; b_M]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, parts: Parts, masks: Parts, id_emb: Tensor | None = None) -> Tensor:
        e, present = stack_parts(self.modalities, parts, masks)          # [n, M, d]
        n, M, d = e.shape
        g = torch.sigmoid(self.gate(e.reshape(n, M * d))).view(n, M, d)
        g = g * present.unsqueeze(-1).to(g.dtype)
        self._keep(g.mean(dim=-1), present)
        return (g * e).sum(dim=1)


__all__ = ["AttentionFusion", "GatedFusion", "mean_over_present", "stack_parts"]
