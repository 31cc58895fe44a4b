r"""Feature filtration ``modality-gate`` and modality dropout: learning to ignore a modality.

Adding modalities can hurt: on ml100k-mm's cold split VBPR on year + genre attributes
alone reaches 3.5x random cold Recall@20, with text + image + attributes 2.6x
(docs/results.md). A model needs a way to turn a useless or harmful modality off, and
the way must not hide in a place training can undo.

**Why the weight is taken after a normalisation.** A gate placed beside a free linear
projection has no identifiable level: ``w_m W_m x = (w_m W_m) x``, so training may put a
modality's scale in ``W_m`` instead of ``w_m``, and a mean gate says nothing about the
modality's value (measured for the ``gate`` filtration in docs/models/fusion.md).
``modality-gate`` removes that freedom: each projected modality is divided by its own
RMS size over the catalogue before it is weighted, so rescaling ``W_m`` changes nothing
and the weight alone decides how much of modality ``m`` reaches the fused vector (items
keep their relative sizes within a modality)::

    ê_{i,m} = e_{i,m} / r_m,   r_m = sqrt(mean_{j has m} ‖e_{j,m}‖²)
    w_{i,m} = exp(a_m) / Σ_{m' ∈ M_i} exp(a_{m'})   for m ∈ M_i, else 0   (softmax over present)
    x̃_{i,m} = s · w_{i,m} · ê_{i,m}                 RMS size of modality m: s · w_{i,m}

``r_m`` comes from the content encoder (``scales``; exact for stored features, see
:meth:`~mmrec.fusion.content.FrozenFeatures.projection_rms`), so a batch's rows get the
values of the full forward. ``norm="item"`` divides each row by its own norm instead.
One learnable logit ``a_m`` per modality and one scale ``s`` shared by all modalities
(the content path's overall size next to the ID embeddings; shared, so it cannot favour
a modality). ``M_i`` are the modalities item ``i`` has: the weights are renormalised over
them, so an item that lacks a modality gives its share to the ones it has. With the
``sum`` fusion the content vector is ``c_i = s Σ_m w_{i,m} ê_{i,m}``: ``w`` is each
modality's share of it, and ``a_m → -∞`` switches modality ``m`` off.

What the weights learn is what the training loss rewards, and that can be memorising
warm items rather than ranking new ones (measured on ml100k-mm: docs/models/fusion.md);
VBPR's ``gate_holdout`` learns them on simulated cold items instead.

**Cold items.** The weights depend on the modality and the item's presence mask only,
never on the ID embedding: a cold item (whose ID embedding nothing trained) is weighted
as a warm one with the same modalities.

**Modality dropout** (:func:`drop_modalities`, ``modality_dropout = p`` in every content
model's config, default 0): in training, each modality an item has is hidden from the
filtration and the fusion with probability ``p`` (per item and step; when every one of an
item's modalities is drawn, the item keeps them all). Softmax weightings (this gate, the
``attention`` fusion) renormalise over the kept modalities by construction; for the
others the encoder scales the kept parts by ``|M_i| / |kept|`` (inverted dropout), so the
expected content vector keeps its size. No modality can be relied on alone, and an item
must be scorable from any subset of its content: what a cold item with a missing or
poor modality needs. Off in evaluation (``module.eval()``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.fusion.attention import stack_parts
from mmrec.registry import FILTRATIONS

Parts = dict[str, Tensor]
GATE_NORMS = ("global", "item")


def drop_modalities(masks: Parts, p: float, generator: torch.Generator | None = None) -> Parts:
    """Presence masks with each present (item, modality) dropped with probability ``p``.

    An item whose every present modality is drawn keeps them all (it would otherwise have
    no content this step). ``p = 0`` returns the masks unchanged. Seeded by ``generator``
    or, without one, by torch's global generator (``torch.manual_seed``).
    """
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"modality_dropout must be in [0, 1), got {p}")
    if p == 0.0 or not masks:
        return masks
    names = list(masks)
    present = torch.stack([masks[m].bool() for m in names], dim=1)          # [n, M]
    u = torch.rand(present.shape, generator=generator,
                   device=present.device if generator is None else generator.device).to(present.device)
    keep = present & (u >= p)
    none_left = ~keep.any(dim=1, keepdim=True)
    keep = torch.where(none_left, present, keep)
    return {m: keep[:, k] for k, m in enumerate(names)}


@FILTRATIONS.register("modality-gate")
class ModalityGate(nn.Module):
    r"""One learnable weight per modality on normalised projected modalities (see the module doc).

    .. math::
        \tilde{x}_{i,m} = s \cdot \operatorname{softmax}_{m \in \mathcal{M}_i}(a)_m
        \cdot \frac{e_{i,m}}{r_m}, \qquad r_m = \sqrt{\operatorname{mean}_{j \ni m} \lVert e_{j,m} \rVert^2}

    (``norm="item"``: :math:`r_{i,m} = \lVert e_{i,m} \rVert`, each row to unit norm.)

    ``init_norm``: the starting ``s``; the default ``0.1 √dim`` is the norm the content
    encoder's initial projections have (per-dimension std ``init_std = 0.1``), so switching
    the gate on does not change the content path's size at initialisation.
    """

    kind: ClassVar[str] = "features"
    uses_id: ClassVar[bool] = False        # weights never read the ID embedding (cold items)
    scale_only: ClassVar[bool] = True      # rescales whole modality rows (cosine graphs ignore it)

    def __init__(self, modalities: list[str], dim: int, init_norm: float | None = None, eps: float = 1e-8,
                 norm: str = "global") -> None:
        super().__init__()
        if not modalities:
            raise ConfigError("the modality-gate filtration needs at least one modality")
        if norm not in GATE_NORMS:
            raise ConfigError(f"modality-gate: norm must be one of {', '.join(GATE_NORMS)}, not '{norm}'")
        self.norm = norm
        self.modalities = list(modalities)
        self.dim = dim
        self.eps = eps
        self.init_norm = float(init_norm) if init_norm is not None else 0.1 * dim ** 0.5
        if self.init_norm <= 0:
            raise ConfigError(f"modality-gate: init_norm must be > 0, got {self.init_norm}")
        self.logits = nn.Parameter(torch.zeros(len(self.modalities)))   # a_m
        self.scale = nn.Parameter(torch.tensor(self.init_norm))        # s
        self.last_weights: Tensor | None = None   # [n, M] of the last call, 0 where absent
        self.last_present: Tensor | None = None   # [n, M] bool
        self._frozen = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.logits.zero_()            # equal shares at the start
            self.scale.fill_(self.init_norm)

    @contextmanager
    def weights_frozen(self) -> Iterator[None]:
        """Within the block the logits get no gradient (a model that learns them from other
        pairs, e.g. VBPR's ``gate_holdout``, trains the rest of the model here)."""
        self._frozen, before = True, self._frozen
        try:
            yield
        finally:
            self._frozen = before

    def weights(self, present: Tensor) -> Tensor:
        """``w`` [n, M]: softmax of the logits over each row's present modalities (0 elsewhere)."""
        logits = self.logits.detach() if self._frozen else self.logits
        logits = logits.to(present.device).expand(present.shape[0], -1)
        scores = logits.masked_fill(~present, float("-inf"))
        has_any = present.any(dim=1, keepdim=True)
        scores = torch.where(has_any, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
        return torch.softmax(scores, dim=1) * has_any.to(scores.dtype)

    @property
    def wants_scale(self) -> bool:
        """The content encoder passes each modality's catalogue RMS norm (``scales``) when True."""
        return self.norm == "global"

    def forward(self, parts: Parts, id_emb: Tensor | None = None, masks: Parts | None = None,
                scales: Parts | None = None) -> Parts:
        """Weighted normalised parts. ``id_emb`` is accepted for the filtration interface and ignored.

        ``scales`` (``norm="global"``): each modality's RMS row norm over the catalogue, from
        :meth:`ItemContentEncoder.projection_rms`; without it, the RMS over the present rows
        given here. Without ``masks`` an all-zero row counts as absent (the content encoder
        zeroes absent modalities before the filtration).
        """
        if masks is None:
            masks = {m: parts[m].detach().ne(0).any(dim=-1) for m in self.modalities if m in parts}
        e, present = stack_parts(self.modalities, parts, masks)      # [n, M, d] (absent rows 0), [n, M]
        w = self.weights(present)                                      # [n, M]
        if self.norm == "item":
            unit = F.normalize(e, dim=-1, eps=self.eps)                # absent rows stay 0
        else:
            if scales is None:
                ms = e.pow(2).sum(-1)                                   # [n, M]
                count = present.sum(0).clamp_min(1)
                rms = ((ms * present).sum(0) / count).sqrt()
            else:
                rms = torch.stack([scales[m].reshape(()) for m in self.modalities]).to(e.dtype)
            unit = e / rms.clamp_min(self.eps).unsqueeze(-1)             # [n, M, d] / [M, 1]
        out = self.scale * w.unsqueeze(-1) * unit
        self.last_weights, self.last_present = w.detach(), present.detach()
        return {m: out[:, k] for k, m in enumerate(self.modalities)}

    def modality_weights(self, masks: Parts) -> dict[str, dict[str, float | int | None]]:
        """Per modality: mean and std of ``w_{i,m}`` over the items that have it, their count,
        and ``all_present``, the weight of an item that has every modality (``softmax(a)_m``).

        Computed from the presence masks (evaluation weights: no dropout); what
        ``metrics.json`` reports under ``modality_weights``.
        """
        with torch.no_grad():
            present = torch.stack([masks[m].bool() for m in self.modalities], dim=1)
            w = self.weights(present).float()
            prior = torch.softmax(self.logits.detach().float(), dim=0)
        out: dict[str, dict[str, float | int | None]] = {}
        for k, m in enumerate(self.modalities):
            values = w[present[:, k], k]
            n = int(values.numel())
            out[m] = {"mean": float(values.mean()) if n else None,      # None: no item has it (JSON null)
                      "std": float(values.std(unbiased=False)) if n else None,
                      "n_items": n, "all_present": float(prior[k])}
        return out


__all__ = ["GATE_NORMS", "ModalityGate", "drop_modalities"]
