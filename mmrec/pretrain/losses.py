"""Contrastive alignment of item content with behavior, and modality with modality.

For a pair of views (a, b) of the same N items, L2-normalised, and a learnable
inverse temperature ``s = exp(t)`` (CLIP; Radford et al. 2021, Eq. in Fig. 3):

    logits_ij = s * <a_i, b_j>
    L(a, b) = 1/2 [ CE(logits, diag) + CE(logits^T, diag) ]   (symmetric InfoNCE)

Items appear twice in a batch when they are sampled twice (popular items under
interaction sampling): their other copies are the same item, not negatives, so
those logits are removed from the softmax (``item_ids``). An item without a
modality (mask False) takes no part in the terms of that modality: rows and columns
are dropped, never filled with zeros. Under ``torch.distributed`` the features of
every rank are gathered with gradient (open_clip ``gather_with_grad=True``,
``local_loss=False``) so each rank computes the loss of the global batch.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from mmrec.errors import ConfigError

PairKey = tuple[str, str]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _Gather:
    """All-gather along the batch axis; ranks may hold different batch sizes.

    Tensors are padded to the largest local batch for the collective and the
    padding is cut off afterwards. ``with_grad`` uses the functional collective
    ``all_gather_single`` (``torch.distributed._functional_collectives``, what torch
    recommends in place of the deprecated ``torch.distributed.nn.functional.all_gather``):
    its backward is a sum reduce-scatter, so the gradient of each gathered row flows
    back to the rank that owns it, summed over the ranks' losses (open_clip's
    ``gather_with_grad=True``).
    """

    def __init__(self, local_size: int, device: torch.device) -> None:
        n = torch.tensor([local_size], device=device, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, n)
        self.sizes = [int(s) for s in sizes]
        self.max = max(self.sizes)

    def _pad(self, x: Tensor) -> Tensor:
        if x.shape[0] == self.max:
            return x.contiguous()
        return torch.cat([x, x.new_zeros((self.max - x.shape[0],) + tuple(x.shape[1:]))]).contiguous()

    def __call__(self, x: Tensor, with_grad: bool) -> Tensor:
        if with_grad:
            from torch.distributed import _functional_collectives as funcol
            full = funcol.all_gather_single(self._pad(x), 0, dist.group.WORLD)
            parts = list(full.split(self.max))
        else:
            dtype = x.dtype
            y = self._pad(x.to(torch.long) if dtype == torch.bool else x)
            parts = [torch.empty_like(y) for _ in self.sizes]
            dist.all_gather(parts, y)
            parts = [p.to(dtype) for p in parts]
        return torch.cat([p[:s] for p, s in zip(parts, self.sizes)])


def info_nce(a: Tensor, b: Tensor, scale: Tensor, item_ids: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of row-aligned views; other copies of an item are not negatives.

    ``a``, ``b``: [n, d] (already normalised); ``scale``: the inverse temperature.
    """
    n = a.shape[0]
    if n == 0:  # nothing to align: zero that still belongs to the graph
        return (a.sum() + b.sum()) * 0.0 + scale * 0.0
    logits = scale * a @ b.t()
    if item_ids is not None:
        same = item_ids[:, None] == item_ids[None, :]
        same.fill_diagonal_(False)
        if same.any():
            logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(n, device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class ContrastiveAlignmentLoss(nn.Module):
    """Weighted sum of symmetric InfoNCE terms over pairs of views of the same items.

    ``pairs``: ``{"image-behavior": 1.0, "image-text": 0.5, ...}`` (or tuple keys);
    None: every content view with ``target`` (weight ``content_weight``) and every
    two content views (weight ``cross_modal_weight``) among those passed to forward.
    The temperature is learnable: ``logit_scale`` starts at log(1/0.07) and is clamped
    to <= log(``max_logit_scale``) in the forward pass (CLIP).
    """

    def __init__(self, pairs: Mapping[str | PairKey, float] | None = None, target: str = "behavior",
                 content_weight: float = 1.0, cross_modal_weight: float = 0.5,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 learn_temperature: bool = True, normalize: bool = True, gather: bool = True) -> None:
        super().__init__()
        self.pairs = {self._key(k): float(w) for k, w in pairs.items()} if pairs is not None else None
        self.target = target
        self.content_weight, self.cross_modal_weight = content_weight, cross_modal_weight
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)),
                                        requires_grad=learn_temperature)
        self.max_log_scale = math.log(max_logit_scale)
        self.normalize, self.gather = normalize, gather

    @staticmethod
    def _key(k: str | PairKey) -> PairKey:
        if isinstance(k, str):
            a, sep, b = k.partition("-")
            if not sep or not a or not b:
                raise ConfigError(f"alignment pair '{k}' must look like 'image-behavior'")
            return a, b
        a, b = k
        return a, b

    def pair_weights(self, views: list[str]) -> dict[PairKey, float]:
        """The weighted pairs used for these views."""
        if self.pairs is not None:
            missing = sorted({m for p in self.pairs for m in p} - set(views))
            if missing:
                raise ConfigError(f"alignment pairs use views {missing} that were not passed; got {views}")
            return {p: w for p, w in self.pairs.items() if w != 0}
        content = [v for v in views if v != self.target]
        out: dict[PairKey, float] = {}
        if self.target in views and self.content_weight:
            out.update({(v, self.target): self.content_weight for v in content})
        if self.cross_modal_weight:
            out.update({(u, v): self.cross_modal_weight for i, u in enumerate(content) for v in content[i + 1:]})
        return out

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, features: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None,
                item_ids: Tensor | None = None, return_terms: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """``features``: view name -> [B, d] (row i = item i of the batch, every view);
        ``masks``: view name -> [B] bool (False: the item lacks it; absent: all present);
        ``item_ids``: [B] ids, so that other copies of an item are not negatives.

        Returns the weighted loss (and, with ``return_terms``, each detached pair term).
        """
        if not features:
            raise ConfigError("no features to align")
        views = list(features)
        sizes = {v: features[v].shape[0] for v in views}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every view needs the same batch rows, got sizes {sizes}")
        masks = dict(masks or {})
        for v, m in masks.items():
            if v not in features:
                raise ValueError(f"mask for view '{v}' that has no features")
            if m.shape != (sizes[v],):
                raise ValueError(f"mask of '{v}' has shape {tuple(m.shape)}, expected ({sizes[v]},)")
        if item_ids is not None and item_ids.shape != (sizes[views[0]],):
            raise ValueError(f"item_ids has shape {tuple(item_ids.shape)}, expected ({sizes[views[0]]},)")
        weights = self.pair_weights(views)
        used = sorted({m for p in weights for m in p})
        device = features[views[0]].device
        feats = {v: features[v] for v in used}
        present = {v: masks[v].to(device=device, dtype=torch.bool) if v in masks else
                   torch.ones(sizes[v], dtype=torch.bool, device=device) for v in used}
        ids = item_ids.to(device) if item_ids is not None else None
        if self.gather and _distributed():
            g = _Gather(sizes[views[0]], device)
            feats = {v: g(x, with_grad=True) for v, x in feats.items()}
            present = {v: g(m, with_grad=False) for v, m in present.items()}
            ids = g(ids, with_grad=False) if ids is not None else None
        scale = self.scale()
        total = scale * 0.0
        terms: dict[str, Tensor] = {}
        for (a, b), w in weights.items():
            keep = present[a] & present[b]
            xa, xb = feats[a][keep], feats[b][keep]
            if self.normalize:
                xa, xb = F.normalize(xa, dim=-1), F.normalize(xb, dim=-1)
            term = info_nce(xa, xb, scale, ids[keep] if ids is not None else None)
            total = total + w * term
            terms[f"{a}-{b}"] = term.detach()
        return (total, terms) if return_terms else total
