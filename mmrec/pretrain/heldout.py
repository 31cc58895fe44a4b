"""Held-out items: alignment measured on items it never saw, next to chance, a ridge map and a control.

In-sample retrieval (:mod:`mmrec.pretrain.retrieval`) is passed by a run whose
content <-> behavior pairs are *permuted*: two projection heads can fit the pairing of
a few hundred items whatever the content says. Here the items are split (seeded) into

* ``heldout``: never in a training batch, the loss, the co-occurrence positives or early
  stopping; ranked after training;
* ``valid``: a slice of the other items, also outside the loss: early stopping
  (``train.patience``) and the ridge's ``alpha`` are chosen on it;
* ``fit``: the items alignment trains on (and the ridge is fitted on).

Each held-out item's fused content embedding ranks the behavior embeddings of all
held-out items by cosine (its own is the relevant one): ``heldout/Recall@K`` and
``heldout/MRR``. Next to it: ``heldout/chance/*`` (a uniformly random rank among n:
``K/n`` and ``H_n/n``), ``heldout/ridge/*`` (:func:`ridge_baseline`: a closed-form linear
map from the same frozen content features to the behavior embeddings) and, when asked,
``heldout/control/*``: the same numbers of a run with ``control: permuted``
(:func:`permuted_targets`), which must stay near chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError, DataError
from mmrec.pretrain.config import HeldoutSection
from mmrec.pretrain.retrieval import fuse, rank_metrics, ranks_of_self

PREFIX = "heldout"


@dataclass
class ItemSplit:
    """Disjoint, sorted int64 item indices: ``fit`` (aligned), ``valid`` (early stopping, alpha), ``heldout``."""

    fit: np.ndarray
    valid: np.ndarray
    heldout: np.ndarray
    source: str = "share"

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "fit": int(len(self.fit)), "valid": int(len(self.valid)),
                "heldout": int(len(self.heldout))}


def _read_ids(spec: str | list[Any]) -> tuple[list[str], str]:
    """The ids of ``heldout.items``: a list, or a file with one id a line (``#`` comments allowed)."""
    if isinstance(spec, list):
        return [str(x) for x in spec], "heldout.items"
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"heldout.items: '{spec}' is not a file of item ids (one a line), a list or 'cold'")
    ids = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [x for x in ids if x], str(path)


def cold_split_items(data: Dataset, seed: int) -> np.ndarray:
    """The cold items (validation-cold and test-cold) of the ``cold`` split at ``seed``: those
    ``mmrec train --split cold --seed SEED`` takes every training row from."""
    if data.split != "cold":
        from mmrec.datasets.splits import apply_split
        data = apply_split(data, "cold", seed=seed)
    parts = [np.asarray(data.cold_items if data.cold_items is not None else [], dtype=np.int64),
             np.asarray(data.report.get("cold_valid_items", []), dtype=np.int64)]
    return np.unique(np.concatenate(parts))


def resolve_heldout(spec: str | list[Any], data: Dataset, seed: int) -> tuple[np.ndarray, str]:
    """Indices of the held-out items named by ``heldout.items``; unknown ids are an error naming them."""
    if isinstance(spec, str) and spec.lower() == "cold":
        return cold_split_items(data, seed), "cold"
    ids, where = _read_ids(spec)
    pos = {str(x): i for i, x in enumerate(data.item_ids)}
    missing = [x for x in ids if x not in pos]
    if missing:
        raise DataError(f"{len(missing)} held-out item id(s) not in {data.name}: {missing[:5]}",
                        file=where if where != "heldout.items" else None, field="heldout.items")
    return np.unique(np.array([pos[x] for x in ids], dtype=np.int64)), where


def split_items(data: Dataset, sec: HeldoutSection, seed: int, need_valid: bool = False) -> ItemSplit | None:
    """Seeded fit / valid / held-out items, or None when neither held-out items nor a validation
    slice are asked for (then every item trains, as before)."""
    n = data.n_items
    if not sec.enabled() and not need_valid:
        return None
    rng = np.random.default_rng([seed, 0x4E1D])
    if sec.items is not None:
        heldout, source = resolve_heldout(sec.items, data, seed)
    else:
        heldout = np.sort(rng.permutation(n)[:int(round(sec.share * n))]).astype(np.int64)
        source = "share"
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), heldout)
    n_valid = int(round(sec.valid_share * len(rest)))
    valid = np.sort(rng.permutation(rest)[:n_valid])
    fit = np.setdiff1d(rest, valid)
    if sec.enabled() and len(heldout) < 2:
        raise ConfigError(f"heldout: {len(heldout)} held-out item(s) of {n}; ranking needs at least 2")
    if len(fit) < 2:
        raise ConfigError(f"heldout: only {len(fit)} item(s) left to align of {n}; lower heldout.share / "
                          f"valid_share")
    return ItemSplit(fit=fit, valid=valid, heldout=heldout, source=source)


def permuted_targets(n_items: int, fit: np.ndarray, seed: int) -> np.ndarray:
    """``targets[i]``: the behavior row item ``i`` is paired with; the fit items' rows are permuted
    among themselves (seeded), every other item keeps its own, so no held-out row is touched."""
    targets = np.arange(n_items, dtype=np.int64)
    fit = np.asarray(fit, dtype=np.int64)
    targets[fit] = fit[np.random.default_rng([seed, 0xC0DE]).permutation(len(fit))]
    return targets


def restrict_columns(matrix: Any, items: np.ndarray) -> Any:
    """The user x item matrix with only ``items``' columns kept (others zero, dropped): co-occurrence
    positives drawn from it are never a held-out or validation item."""
    import scipy.sparse as sp
    keep = np.zeros(matrix.shape[1])
    keep[items] = 1.0
    out = sp.csr_matrix(matrix) @ sp.diags(keep)
    out.eliminate_zeros()
    return out.tocsr()


def chance_metrics(n: int, ks: Iterable[int]) -> dict[str, float]:
    """A uniformly random rank among ``n``: ``P(rank <= K) = K/n`` and ``E[1/rank] = H_n / n``."""
    out = {f"Recall@{k}": min(1.0, k / max(n, 1)) for k in sorted(ks)}
    out["MRR"] = float(np.sum(1.0 / np.arange(1, n + 1)) / n) if n else 0.0
    return out


def subset_ranks(queries: Tensor, has: Tensor, keys: Tensor, items: np.ndarray, block_size: int = 4096) -> Tensor:
    """Ranks of each item's own key among the keys of ``items`` only (items without a query skipped)."""
    idx = torch.as_tensor(items, dtype=torch.long, device=queries.device)
    sub_keys = keys[idx]
    with_query = torch.nonzero(has[idx]).flatten()
    return ranks_of_self(queries[idx[with_query]], sub_keys, with_query, block_size)


def content_ranks(embs: dict[str, Tensor], masks: dict[str, Tensor], modalities: list[str], items: np.ndarray,
                  block_size: int = 4096) -> Tensor:
    """Rank of each of ``items``' own behavior embedding among ``items``' behavior embeddings, queried
    by its fused content embedding (items without content skipped): what ``subset_metrics`` summarises,
    kept whole for the held-out curves (:mod:`mmrec.pretrain.plots`)."""
    fused, has = fuse(embs, masks, modalities)
    return subset_ranks(fused, has, embs["behavior"], items, block_size)


def subset_metrics(embs: dict[str, Tensor], masks: dict[str, Tensor], modalities: list[str], items: np.ndarray,
                   ks: Iterable[int], prefix: str, block_size: int = 4096) -> dict[str, float]:
    """Content -> behavior retrieval restricted to ``items`` (queries and candidates)."""
    return rank_metrics(content_ranks(embs, masks, modalities, items, block_size), ks, prefix)


@torch.no_grad()
def frozen_content_features(model: Any, batches: Iterable[dict[str, Any]], n_items: int) -> tuple[Tensor, Tensor]:
    """``[n_items, sum d_m + M]`` backbone features (no projection head) of every content modality,
    each block L2-normalised, zeros plus a missing flag where an item lacks it, and the rows with any.

    Called on the model *before* training: pretrained (or random-init) backbones as the
    encoders start, the same features a frozen backbone gives the heads.
    """
    was_training = model.training
    model.eval()
    feats: dict[str, Tensor] = {}
    present: dict[str, Tensor] = {}
    for m in model.content:
        feats[m] = torch.zeros(n_items, model.encoders[m].backbone_dim)
        present[m] = torch.zeros(n_items, dtype=torch.bool)
    for batch in batches:
        index = batch["index"]
        for m in model.content:
            view, mask = batch["views"].get(m), batch["masks"][m]
            if view is None or not bool(mask.any()):
                continue
            cache = model.caches.get(m)
            rows = index[mask]
            if cache is not None and bool(cache.filled[rows.to(cache.filled.device)].all()):
                h = cache.features[rows.to(cache.features.device)]
            else:
                enc = model.encoders[m]
                h = enc.encode(enc.to_device(view))
            feats[m][rows] = h.float().cpu()
            present[m][rows] = True
    if was_training:
        model.set_train(True)
    blocks = []
    for m in model.content:
        blocks += [F.normalize(feats[m], dim=-1) * present[m][:, None], (~present[m]).float()[:, None]]
    has = torch.stack([present[m] for m in model.content]).any(0)
    return torch.cat(blocks, dim=1), has


def ridge_baseline(x: Tensor, has: Tensor, y: Tensor, split: ItemSplit, alphas: Iterable[float],
                   ks: Iterable[int], block_size: int = 4096) -> tuple[dict[str, float], float]:
    """A ridge map ``x -> y`` (sklearn ``Ridge``) fitted on the fit items, ``alpha`` chosen by the
    validation slice's MRR (the fit items when there is none), ranked on the held-out items
    exactly as the trained encoders are: ``(metrics with prefix heldout/ridge, alpha)``."""
    ranks, alpha = ridge_ranks(x, has, y, split, alphas, block_size)
    return rank_metrics(ranks, ks, f"{PREFIX}/ridge"), alpha


def ridge_ranks(x: Tensor, has: Tensor, y: Tensor, split: ItemSplit, alphas: Iterable[float],
                block_size: int = 4096) -> tuple[Tensor, float]:
    """:func:`ridge_baseline`'s held-out ranks (one per held-out item with content) and ``alpha``."""
    from sklearn.linear_model import Ridge

    xn, yn = x.double().numpy(), y.double().numpy()
    train = split.fit[has[split.fit].numpy()]
    if len(train) < 2:
        raise ConfigError(f"heldout ridge: {len(train)} fit item(s) with content; need at least 2")
    pick = split.valid if len(split.valid) >= 2 else split.fit
    best: tuple[float, float, Any] | None = None
    for alpha in sorted(float(a) for a in alphas):
        reg = Ridge(alpha=alpha).fit(xn[train], yn[train])
        pred = torch.from_numpy(reg.predict(xn)).float()
        r = subset_ranks(pred, has, y.float(), pick, block_size)
        mrr = float((1.0 / r.double()).mean()) if r.numel() else 0.0
        if best is None or mrr > best[0]:
            best = (mrr, alpha, pred)
    assert best is not None
    _, alpha, pred = best
    return subset_ranks(pred, has, y.float(), split.heldout, block_size), alpha


__all__ = ["ItemSplit", "PREFIX", "chance_metrics", "cold_split_items", "content_ranks", "frozen_content_features",
           "permuted_targets", "resolve_heldout", "restrict_columns", "ridge_baseline", "ridge_ranks", "split_items",
           "subset_metrics", "subset_ranks"]
