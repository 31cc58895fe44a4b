r"""Feature filtration ``gate``: behaviour-guided purification of modality features.

Raw modality features carry content that has nothing to do with why users interact
with an item (a background colour, a noisy caption). MGCN (Yu et al., "Multi-View Graph
Convolutional Network for Multimedia Recommendation", ACM MM 2023) purifies them with
sigmoid gates that tie each modality to the item's behaviour (ID) embedding. Here (the
project issue's form) the gate is computed from the ID embedding and filters the
projected feature::

    x̃_m = x_m ⊙ σ(W_m e_id + b_m)

so behaviour decides, per item and per dimension, how much of each modality passes, and
the output stays in the modality's space (it is fused afterwards). This is the shape of
MGCN's *preference* gates (behaviour-aware fuser: ``σ(W e_id + b)`` times the
modality-specific features; ``gate_image_prefer`` / ``gate_text_prefer`` in the authors'
code). MGCN's purifier proper, Eq. 2, swaps the roles (``E_id ⊙ σ(W_2 Ė_m + b_2)``: the
feature gates the ID embedding); it is ``BehaviorGate(..., mode="feature-gates-id")``.

What such a gate can learn, and what it cannot (measured in docs/models/fusion.md):
a gate level shared by all items is a rescaling of the modality's linear projection
(``σ(b) ⊙ W x = diag(σ(b)) W x``), so training is free to put a modality's scale in the
projection instead, and the mean gate of a modality is no measure of its quality. What the
gate adds is per-item variation, and it sees only ``e_id``: it can learn to trust content
less for items whose *behaviour* looks some way, not spot a noisy feature row whose noise
is unrelated to behaviour (the content-dependent ``attention`` fusion does that).

Runs inside :class:`~mmrec.fusion.content.ItemContentEncoder` between the per-modality
projection and the fusion; ``kind = "features"`` marks it as a feature (not edge)
filtration. Every operation is per item, so computing it for a subset of rows (as
``ItemContentEncoder.encode_rows`` does) gives the same rows.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.fusion.attention import mean_over_present
from mmrec.registry import FILTRATIONS

Parts = dict[str, Tensor]
MODES = ("id-gates-feature", "feature-gates-id")


@FILTRATIONS.register("gate")
class BehaviorGate(nn.Module):
    r"""Per-modality sigmoid gates driven by the item ID embedding.

    .. math::
        \tilde{x}_{i,m} = x_{i,m} \odot \sigma(\mathbf{W}_m e^{id}_i + \mathbf{b}_m)

    (``mode="feature-gates-id"``: :math:`\tilde{x}_{i,m} = e^{id}_i \odot
    \sigma(\mathbf{W}_m x_{i,m} + \mathbf{b}_m)`, MGCN Eq. 2.) The gates start near 0.5
    (zero bias); ``last_gates`` [n, M] keeps each item's mean gate per modality from the
    last call and :meth:`mean_gates` averages it over the items that have the modality.
    """

    kind: ClassVar[str] = "features"

    def __init__(self, modalities: list[str], dim: int, mode: str = "id-gates-feature") -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"gate filtration mode must be one of {', '.join(MODES)}, not '{mode}'")
        if not modalities:
            raise ConfigError("the gate filtration needs at least one modality")
        self.modalities = list(modalities)
        self.dim = dim
        self.mode = mode
        self.gates = nn.ModuleDict({m: nn.Linear(dim, dim) for m in self.modalities})  # W_m, b_m
        self.last_gates: Tensor | None = None     # [n, M] mean gate over the d dimensions
        self.last_present: Tensor | None = None   # [n, M] bool
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in self.gates.values():
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, parts: Parts, id_emb: Tensor | None, masks: Parts | None = None) -> Parts:
        """Purified parts. ``masks`` is optional: with it absent rows come out as zeros; without
        it the caller masks (the content encoder does) and an all-zero input row counts as
        absent in :meth:`mean_gates` (the encoder zeroes absent modalities before filtration)."""
        if id_emb is None:
            raise ConfigError("filtration 'gate' purifies features with the item ID embedding (behaviour), "
                              "but the model passed id_emb=None; call the content encoder with "
                              "content(id_emb=item_id_embedding), or choose no --filtration")
        out: Parts = {}
        gates, present = [], []
        for m in self.modalities:
            x = parts[m]
            if id_emb.shape != x.shape:
                raise ConfigError(f"filtration 'gate': id_emb has shape {tuple(id_emb.shape)}, "
                                  f"modality '{m}' {tuple(x.shape)}; both must be [n_items, {self.dim}]")
            if self.mode == "id-gates-feature":
                g = torch.sigmoid(self.gates[m](id_emb))   # σ(W_m e_id + b_m)
                out[m] = x * g
            else:
                g = torch.sigmoid(self.gates[m](x))        # MGCN Eq. 2: σ(W_2 Ė_m + b_2)
                out[m] = id_emb * g
            if masks is not None:  # standalone use: absent rows leave as zeros, with no gradient
                zero = torch.zeros((), dtype=x.dtype, device=x.device)
                out[m] = torch.where(masks[m].bool().unsqueeze(1), out[m], zero)
            gates.append(g.detach().mean(dim=-1))
            present.append(masks[m].bool() if masks is not None else x.detach().ne(0).any(dim=-1))
        self.last_gates = torch.stack(gates, dim=1)
        self.last_present = torch.stack(present, dim=1)
        return out

    def mean_gates(self, items: Tensor | None = None) -> dict[str, float]:
        """Mean gate value of each modality over the items that have it (last call; NaN if none).

        ``items`` (bool mask [n] or indices) restricts the mean to those items.
        """
        if self.last_gates is None or self.last_present is None:
            raise ConfigError("BehaviorGate.mean_gates(): the filtration has not been called yet")
        return mean_over_present(self.modalities, self.last_gates, self.last_present, items)


__all__ = ["BehaviorGate", "MODES"]
