"""Item retrieval: does an item's content embedding find its own behavior embedding?

For every item with content, all items' behavior embeddings are ranked by cosine
similarity to its content embedding; the relevant item is the item itself, so
``Recall@K`` is the share of items whose behavior embedding is in their top K and
``MRR`` the mean reciprocal rank. Ties count against the model (a collapsed encoder
that maps everything to one point ranks last, not first). ``content`` is the fused
embedding: the normalised mean of the item's available modality embeddings. Ranking
is blockwise (``[block, n_items]`` similarities at a time), never item by item and
never a dense ``n x n`` matrix.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.nn import functional as F

from mmrec.encoders.robust import BadMedia

CONTENT = "content"


@torch.no_grad()
def ranks_of_self(queries: Tensor, keys: Tensor, query_rows: Tensor, block_size: int = 4096) -> Tensor:
    """1-based rank of ``keys[query_rows[i]]`` among all keys for query ``i`` (cosine; ties pessimistic)."""
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    out = []
    for s in range(0, q.shape[0], block_size):
        sims = q[s:s + block_size] @ k.t()                                     # [block, n_items]
        own = sims.gather(1, query_rows[s:s + block_size, None].to(sims.device))  # [block, 1]
        out.append((sims >= own).sum(1))  # includes the item itself: rank 1 = strictly best
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def rank_metrics(ranks: Tensor, ks: Iterable[int], prefix: str) -> dict[str, float]:
    if ranks.numel() == 0:
        return {}
    r = ranks.double()
    out = {f"{prefix}/Recall@{k}": float((r <= k).double().mean()) for k in sorted(ks)}
    out[f"{prefix}/MRR"] = float((1.0 / r).mean())
    return out


@torch.no_grad()
def embed_items(model: Any, batches: Iterable[dict[str, Any]], n_items: int,
                bad: BadMedia | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every item's projected embedding per view (``behavior`` and each content modality) and masks.

    ``model`` is an :class:`~mmrec.pretrain.trainer.AlignmentModel` (put in eval mode here).
    Frozen-feature caches are filled on the way (they hold eval-mode features anyway).
    """
    was_training = model.training
    model.eval()
    device = model.encoders["behavior"].device
    embs: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for m in model.content:
        embs[m] = torch.zeros(n_items, model.encoders[m].embed_dim, device=device)
        masks[m] = torch.zeros(n_items, dtype=torch.bool, device=device)
    for batch in batches:
        index = batch["index"]
        if bad is not None:
            bad.merge(batch["bad"], batch.get("bad_examples"))
        for m in model.content:
            mask = batch["masks"][m]
            z = model.embed(m, batch["views"].get(m), index, mask)
            if z is not None:
                rows = index[mask].to(device)
                embs[m][rows] = z.float()
                masks[m][rows] = True
    beh = model.encoders["behavior"]
    all_items = torch.arange(n_items)
    embs["behavior"] = torch.cat([beh({"item": all_items[s:s + 8192]}).float()
                                  for s in range(0, n_items, 8192)]) if n_items else torch.zeros(0, beh.embed_dim)
    masks["behavior"] = torch.ones(n_items, dtype=torch.bool, device=device)
    if was_training:
        model.set_train(True)
    return embs, masks


def fuse(embs: dict[str, Tensor], masks: dict[str, Tensor], modalities: list[str]) -> tuple[Tensor, Tensor]:
    """Normalised mean of each item's available modality embeddings (items with none are masked)."""
    first = embs[modalities[0]]
    total = torch.zeros_like(first)
    count = torch.zeros(first.shape[0], device=first.device)
    for m in modalities:
        total = total + F.normalize(embs[m], dim=-1) * masks[m][:, None]
        count = count + masks[m].float()
    has = count > 0
    return F.normalize(total / count.clamp(min=1)[:, None], dim=-1), has


def retrieval_metrics(embs: dict[str, Tensor], masks: dict[str, Tensor], modalities: list[str],
                      ks: Iterable[int] = (1, 10, 50), block_size: int = 4096) -> dict[str, float]:
    """``content_to_behavior/Recall@K`` (fused) and ``<modality>_to_behavior/...`` for each modality."""
    ks = list(ks)
    keys = embs["behavior"]
    out: dict[str, float] = {}
    fused, has = fuse(embs, masks, modalities)
    rows = torch.nonzero(has).flatten()
    out.update(rank_metrics(ranks_of_self(fused[rows], keys, rows, block_size), ks, f"{CONTENT}_to_behavior"))
    for m in modalities:
        rows = torch.nonzero(masks[m]).flatten()
        out.update(rank_metrics(ranks_of_self(embs[m][rows], keys, rows, block_size), ks, f"{m}_to_behavior"))
    return out


__all__ = ["CONTENT", "embed_items", "fuse", "rank_metrics", "ranks_of_self", "retrieval_metrics"]
