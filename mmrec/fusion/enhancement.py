r"""Feature enhancement: representations that hold up when interactions are sparse.

A *feature enhancement* runs after the fusion of
:class:`~mmrec.fusion.content.ItemContentEncoder` (``--enhancement NAME`` or
``model.enhancement``). It sees the projected (and filtered) modality parts
:math:`e^m_i` [B, d] with their presence masks and the fused vector :math:`c_i`, returns the
item's enhanced vector, and adds a self-supervised loss over the items of the training step
(weighted by ``model.enhance_weight``; :meth:`Recommender.auxiliary_loss`).

Why it helps cold and few-interaction items: the recommendation loss reaches an item's
content only through that item's interactions, so the projections of rarely-seen items are
fitted on almost nothing. These losses need no interaction at all: every item with two or
more modalities tells the encoder which directions of one modality mean the same thing as
directions of another, so the content vector of an item no one has bought yet is placed by
what the whole catalogue's content agrees on, not by noise the BPR loss never corrected.

Modules: ``cls(modalities: list[str], dim: int, temperature: float)``;
``forward(fused, parts, masks) -> Tensor`` (the enhanced ``[B, d]``) and
``loss(parts, masks) -> Tensor`` over the rows passed (a missing modality drops the item out
of every term of that modality, never a zero row in a cosine).

- ``ghmfc``: cross-modal contrastive training of GHMFC (Wang et al., "Multimodal Entity
  Linking with Gated Hierarchical Fusion and Contrastive Training", SIGIR 2022).
- ``mdr``: a shared / specific split of each modality (disentangled multimodal
  representation; the split and its losses follow MISA, Hazarika et al., "MISA:
  Modality-Invariant and -Specific Representations for Multimodal Sentiment Analysis",
  ACM MM 2020; the disentanglement motivation follows Liu et al., "Disentangled Multimodal
  Representation Learning for Recommendation", IEEE TMM 2022, whose factor-wise attention
  model is *not* what is implemented here).
"""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmrec.errors import ConfigError
from mmrec.pretrain.losses import info_nce
from mmrec.registry import ENHANCEMENTS

Parts = dict[str, Tensor]


def _check(name: str, modalities: list[str], temperature: float) -> None:
    if len(modalities) < 2:
        raise ConfigError(f"enhancement '{name}' relates the modalities of an item to each other; the features "
                          f"have {len(modalities)} modality ({', '.join(modalities) or 'none'}), at least 2 are needed")
    if not temperature > 0:
        raise ConfigError(f"model.enhance_temperature must be > 0, got {temperature}")


def cross_modal_info_nce(views: Parts, masks: Parts, temperature: float) -> Tensor:
    """Mean over pairs (a, b) of modalities of the symmetric InfoNCE between ``views[a]`` and
    ``views[b]`` of the items that have both (cosine similarity / temperature).

    Terms of pairs no item of the rows shares are left out; with none at all the result is
    a zero that still belongs to the graph.
    """
    scale = torch.tensor(1.0 / temperature, device=next(iter(views.values())).device)
    terms = []
    for a, b in combinations(sorted(views), 2):
        keep = masks[a].bool() & masks[b].bool()
        if int(keep.sum()) < 2:    # one item: no negative, nothing to contrast
            continue
        terms.append(info_nce(F.normalize(views[a][keep], dim=-1), F.normalize(views[b][keep], dim=-1), scale))
    if not terms:
        return sum(views[m][masks[m].bool()].sum() for m in views) * 0.0   # absent rows may hold anything
    return torch.stack(terms).mean()


@ENHANCEMENTS.register("ghmfc")
class ContrastiveEnhancement(nn.Module):
    r"""GHMFC's contrastive training: text→image and image→text InfoNCE between the modality
    representations of the same item, for every pair of modalities an item has.

    .. math::
        \mathcal L_{a\to b} = -\frac1{|B|}\sum_i \log
            \frac{\exp(\cos(e^a_i, e^b_i)/\tau)}{\sum_{j\in B} \exp(\cos(e^a_i, e^b_j)/\tau)},\qquad
        \mathcal L = \operatorname{mean}_{a<b}\tfrac12(\mathcal L_{a\to b} + \mathcal L_{b\to a})

    over the items :math:`B` of the step that have both modalities; the other items of the
    step are the negatives. GHMFC contrasts the mean-pooled text and image features of each
    mention (its code: normalised vectors, temperature 0.6, both directions); here the
    views are the projected parts :math:`e^m = W_m x^m` that the fusion reads, so the loss
    shapes exactly what enters the recommender. ``forward`` returns the fused vector
    unchanged: the module is a loss only, without parameters.

    Under sparse data: an item's projection is pulled to agree with its other modalities
    and away from other items' (InfoNCE), a signal every item with two modalities gives,
    with or without interactions, and one that filters out what a single modality says
    that the others do not confirm (GHMFC's "reduce noise").
    """

    def __init__(self, modalities: list[str], dim: int, temperature: float = 0.2) -> None:
        super().__init__()
        _check("ghmfc", list(modalities), temperature)
        self.modalities = list(modalities)
        self.dim = dim
        self.temperature = float(temperature)

    def reset_parameters(self) -> None:
        """No parameters."""

    def forward(self, fused: Tensor, parts: Parts, masks: Parts) -> Tensor:
        return fused

    def loss(self, parts: Parts, masks: Parts) -> Tensor:
        return cross_modal_info_nce(parts, masks, self.temperature)


def decorrelation(a: Tensor, b: Tensor) -> Tensor:
    r"""Mean squared cross-correlation :math:`\tfrac1{d^2}\sum_{jk}\operatorname{corr}(a_{\cdot j}, b_{\cdot k})^2`
    of two views [n, d] of the same rows (each column centred and scaled over the rows).

    MISA's soft orthogonality :math:`\lVert A^\top B\rVert_F^2` (its ``DiffLoss`` centres and
    row-normalises) grows with the number of rows; the correlation form lies in [0, 1]
    whatever the batch, and scaling a view down cannot satisfy it. Zero (in the graph) for n < 2.
    """
    n = a.shape[0]
    if n < 2:
        return (a.sum() + b.sum()) * 0.0
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    a = a / a.pow(2).mean(0, keepdim=True).clamp_min(1e-12).sqrt()
    b = b / b.pow(2).mean(0, keepdim=True).clamp_min(1e-12).sqrt()
    return (a.t() @ b / n).pow(2).mean()


def masked_mean(views: Parts, masks: Parts) -> Tensor:
    """Per item, the mean of the views of the modalities it has (zero when it has none; whatever
    an absent row holds, NaN included, never enters)."""
    total = sum(torch.where(masks[m].bool().unsqueeze(1), views[m], torch.zeros((), dtype=views[m].dtype,
                                                                                   device=views[m].device))
                for m in views)
    count = sum(masks[m].to(total.dtype) for m in views).clamp_min(1.0)
    return total / count.unsqueeze(1)


@ENHANCEMENTS.register("mdr")
class DisentangledEnhancement(nn.Module):
    r"""A shared and a specific part per modality; the shared parts of an item pulled together,
    the specific ones kept apart.

    For modality m of item i, :math:`s^m_i = S_m e^m_i` (shared) and :math:`p^m_i = P_m e^m_i`
    (specific), two linear maps per modality. Loss over the step's items (each term over
    the items that have the modalities involved):

    - *similarity*: symmetric InfoNCE between :math:`s^a_i` and :math:`s^b_i` for every pair
      of modalities (MISA's :math:`\mathcal L_{sim}` pulls the invariant parts together, by
      CMD there; InfoNCE here also pushes other items' shared parts away);
    - *difference*: decorrelation (:func:`decorrelation`, MISA's soft orthogonality
      :math:`\mathcal L_{diff}` made independent of the batch size) between the shared and
      specific parts of each modality, and between the specific parts of every two modalities;
    - *reconstruction*: :math:`\lVert e^m_i - (s^m_i + p^m_i)\rVert^2 / \lVert e^m_i\rVert^2` (MISA's
      :math:`\mathcal L_{recon}`, with the sum itself as the decoder, relative so that it does
      not depend on the features' scale), so the split stays a decomposition of :math:`e^m`
      and the specific part cannot vanish to satisfy the difference term.

    The three are summed with equal weights. **Enhanced vector** (what we chose): the fused
    vector plus a learned map of the item's consensus shared part and its specific parts,

    .. math::  \tilde c_i = c_i + O\,[\bar s_i \,\|\, \bar p_i],\qquad
               \bar s_i = \operatorname{mean}_{m \in M_i} s^m_i,\ \bar p_i = \operatorname{mean}_{m \in M_i} p^m_i

    (:math:`M_i`: the modalities item i has), with :math:`O` initialised to zero, so an
    untrained module leaves the chosen fusion's output as it is and training decides how much
    of the rebuilt representation to add.

    Under sparse data: the shared part is what the modalities agree on, learnt from every
    item's content alone, so it is a denoised summary even for items without interactions
    (and an item missing a modality still gets it from the others); the specific part keeps
    what only one modality carries, without letting it drown the shared signal.
    """

    def __init__(self, modalities: list[str], dim: int, temperature: float = 0.2) -> None:
        super().__init__()
        _check("mdr", list(modalities), temperature)
        self.modalities = list(modalities)
        self.dim = dim
        self.temperature = float(temperature)
        self.shared = nn.ModuleDict({m: nn.Linear(dim, dim, bias=False) for m in self.modalities})
        self.specific = nn.ModuleDict({m: nn.Linear(dim, dim, bias=False) for m in self.modalities})
        self.out = nn.Linear(2 * dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (*self.shared.values(), *self.specific.values()):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.out.weight)

    def split(self, parts: Parts) -> tuple[Parts, Parts]:
        """(shared parts, specific parts), each modality -> [B, d]."""
        return ({m: self.shared[m](parts[m]) for m in self.modalities},
                {m: self.specific[m](parts[m]) for m in self.modalities})

    def forward(self, fused: Tensor, parts: Parts, masks: Parts) -> Tensor:
        shared, specific = self.split(parts)
        rebuilt = torch.cat([masked_mean(shared, masks), masked_mean(specific, masks)], dim=1)
        return fused + self.out(rebuilt.to(fused.dtype))

    def loss(self, parts: Parts, masks: Parts) -> Tensor:
        shared, specific = self.split(parts)
        present = {m: masks[m].bool() for m in self.modalities}
        sim = cross_modal_info_nce(shared, present, self.temperature)
        diff = [decorrelation(shared[m][present[m]], specific[m][present[m]]) for m in self.modalities]
        for a, b in combinations(self.modalities, 2):
            both = present[a] & present[b]
            diff.append(decorrelation(specific[a][both], specific[b][both]))
        recon = []
        for m in self.modalities:
            e = parts[m][present[m]]
            err = e - shared[m][present[m]] - specific[m][present[m]]
            recon.append((err.pow(2).sum(1) / e.pow(2).sum(1).clamp_min(1e-12)).mean() if e.shape[0]
                         else err.sum() * 0.0)
        return sim + torch.stack(diff).sum() + torch.stack(recon).mean()


__all__ = ["ContrastiveEnhancement", "DisentangledEnhancement", "cross_modal_info_nce", "decorrelation",
           "masked_mean"]
