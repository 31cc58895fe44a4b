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

import os
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.nn import functional as F

from mmrec.encoders.robust import BadMedia
from mmrec.errors import ConfigError

CONTENT = "content"
# bytes per cell of a ranking block: the float32 similarity plus the bool ``sims >= own``
BLOCK_BYTES_PER_CELL = 4 + 1


def available_memory(device: torch.device) -> int:
    """Bytes a new allocation can get now: free CUDA memory, or ``MemAvailable`` of /proc/meminfo."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # no /proc: physical RAM


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_block_fits(n_queries: int, n_keys: int, block_size: int, device: torch.device) -> None:
    """Refuse a ranking block larger than the memory available, before allocating it.

    ``eval.block_size`` >= the number of items makes the block the dense items x items
    similarity matrix (1M items: 5 TB): fail with the estimate and the setting that avoids it
    rather than be killed by the OOM killer mid-run.
    """
    if block_size < 1:
        raise ConfigError(f"eval.block_size must be >= 1, got {block_size}")
    rows = min(block_size, n_queries)
    need = rows * n_keys * BLOCK_BYTES_PER_CELL
    have = available_memory(device)
    if need > have:
        fits = have // 2 // max(1, n_keys * BLOCK_BYTES_PER_CELL)  # half: room for the rest of the run
        dense = " (the dense items x items matrix)" if rows >= n_keys else ""
        fix = (f"set eval.block_size to {fits} or less" if fits >= 1 else
               "not even one row fits: free memory or evaluate on a smaller item set")
        raise ConfigError(f"eval.block_size={block_size}: ranking {n_queries} items against {n_keys} needs a "
                          f"[{rows}, {n_keys}] similarity block{dense} of about {_size(need)}, but only "
                          f"{_size(have)} of {device.type} memory is available; {fix}")


@torch.no_grad()
def ranks_of_self(queries: Tensor, keys: Tensor, query_rows: Tensor, block_size: int = 4096) -> Tensor:
    """1-based rank of ``keys[query_rows[i]]`` among all keys for query ``i`` (cosine; ties pessimistic)."""
    check_block_fits(queries.shape[0], keys.shape[0], block_size, keys.device)
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


def content_mean(embs: dict[str, Tensor], masks: dict[str, Tensor], modalities: list[str]) -> tuple[Tensor, Tensor]:
    """Unnormalised mean of each item's available modality embeddings, and which items have any.

    Unlike :func:`fuse` it keeps the size: with ``loss.regression_weight`` the content heads learn
    the behavior rows' norms too, and this vector stands in for a cold item's ID embedding
    (mmrec/cold_items.py).
    """
    first = embs[modalities[0]]
    total = torch.zeros_like(first)
    count = torch.zeros(first.shape[0], device=first.device, dtype=first.dtype)
    for m in modalities:
        keep = masks[m].to(first.device)
        total = total + embs[m] * keep[:, None].to(first.dtype)
        count = count + keep.to(first.dtype)
    has = count > 0
    return total / count.clamp(min=1)[:, None], has


def regression_loss(feats: dict[str, Tensor], masks: dict[str, Tensor], modalities: list[str],
                    target: str = "behavior") -> Tensor:
    """``Σ_i ‖c_i − b_i‖² / Σ_i ‖b_i‖²`` over the batch's items with content: ``c_i`` the
    :func:`content_mean`, ``b_i`` the behavior row. Relative, so its size does not depend on the
    behavior table's scale; a content vector that predicts 0 scores 1."""
    c, has = content_mean(feats, masks, modalities)
    b = feats[target]
    if not bool(has.any()):
        return (c * 0.0).sum()
    diff = (c[has] - b[has]).pow(2).sum()
    return diff / b[has].pow(2).sum().clamp_min(1e-12)


def fit_r2(embs: dict[str, Tensor], masks: dict[str, Tensor], modalities: list[str], items: Any) -> float:
    """``1 − regression_loss`` over ``items``: how much of the behavior rows' size the content vectors
    reproduce (1: exactly; 0: no better than predicting zero; the metric of ``train.stop_metric=valid/R2``)."""
    rows = torch.as_tensor(items, dtype=torch.long, device=embs["behavior"].device)
    sub = {v: embs[v][rows] for v in [*modalities, "behavior"]}
    sub_masks = {m: masks[m][rows] for m in modalities}
    return 1.0 - float(regression_loss(sub, sub_masks, modalities))


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


__all__ = ["CONTENT", "available_memory", "check_block_fits", "content_mean", "embed_items", "fuse",
           "fit_r2", "regression_loss", "rank_metrics", "ranks_of_self", "retrieval_metrics"]
