"""``mmrec pretrain`` as a library call: data -> encoders -> alignment -> RUN/.

What a run leaves (rank 0 writes; every file atomically):

* ``encoders.json`` + ``encoders.safetensors``: the trained encoders (``save_encoders``),
  content modalities and ``behavior``: what ``mmrec extract`` reads;
* ``metrics.json``: item retrieval after training (``metrics``) and before (``baseline``),
  bad-media counts, steps, seconds; with held-out items (``heldout.share`` / ``items``)
  also ``heldout/*`` beside chance, a ridge map and, asked for, the permuted-pair control
  (:mod:`mmrec.pretrain.heldout`);
* ``checkpoint.pt`` (resume), ``log.jsonl`` (one line per step), ``config.yaml``, ``curves.png``;
* ``embedding_map.png`` and, with held-out items, ``heldout_curves.png`` + ``heldout_ranks.npz``
  (``plots.*``, :mod:`mmrec.pretrain.plots`; ``plots`` in ``metrics.json``);
* with ``behavior.head: identity``: ``aligned_items.safetensors`` (cold-item stand-ins) and
  ``item_features.safetensors`` (the aligned features), :mod:`mmrec.pretrain.standins`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from mmrec.datasets.loading import SYNTHETIC_PREFIX, load_dataset
from mmrec.datasets.schema import Dataset
from mmrec.datasets.splits import apply_split
from mmrec.encoders.robust import BadMedia
from mmrec.errors import ConfigError
from mmrec.io import atomic_path, write_json
from mmrec.pretrain.artifacts import save_encoders
from mmrec.pretrain.config import PretrainConfig, config_to_dict
from mmrec.pretrain.data import (CooccurrenceSampler, ItemCollator, MemorySource, ShardSource,
                                 check_shards_match, eval_batches)
from mmrec.pretrain.feature_cache import cache_path, load_cached, save_cached
from mmrec.pretrain.heldout import (PREFIX as HELDOUT, ItemSplit, chance_metrics, frozen_content_features,
                                    permuted_targets, restrict_columns, ridge_ranks, split_items,
                                    subset_metrics)
from mmrec.pretrain.plots import write_plots
from mmrec.pretrain.retrieval import embed_items, fit_r2, rank_metrics, retrieval_metrics
from mmrec.pretrain.shards import read_sizes, write_shards
from mmrec.pretrain.standins import write_aligned_items
from mmrec.pretrain.trainer import (CHECKPOINT, AlignmentModel, DistInfo, PretrainTrainer, TrainResult, barrier,
                                    build_model, init_distributed)
from mmrec.progress import log, log_lines, progress_bar
from mmrec.rundir import holds_run_dir, write_provenance

METRICS = "metrics.json"
Log = Callable[[str], None]


def load_pretrain_data(cfg: PretrainConfig) -> Dataset:
    """The dataset with the run's split applied: the behavior side sees training rows only."""
    data = load_dataset(cfg.data, cfg.format, seed=cfg.seed, **cfg.data_args)
    return apply_split(data, cfg.split, seed=cfg.seed)


def available_modalities(cfg: PretrainConfig, data: Dataset) -> tuple[list[str], list[str]]:
    """``(used, dropped)``: configured modalities the data has raw content for, and the rest."""
    items = data.items
    has = {"image": items.image is not None, "text": bool(items.text), "audio": items.audio is not None}
    used = [m for m in cfg.modalities if has[m]]
    if not used:
        raise ConfigError(f"{cfg.data} has no raw content for any of {cfg.modalities} "
                          f"(image paths/bytes, text columns or audio in items.tsv)")
    return used, [m for m in cfg.modalities if not has[m]]


def streaming_dir(cfg: PretrainConfig, data: Dataset, run_dir: Path, info: DistInfo, log: Log) -> Path | None:
    """The shard directory to stream from, or None to train from memory (written here when needed)."""
    ld = cfg.loader
    streaming = ld.streaming
    if streaming is None:
        small = str(cfg.data).startswith(SYNTHETIC_PREFIX) or data.n_items <= ld.max_in_memory_items
        streaming = ld.shards is not None or not small
    if not streaming:
        return None
    shard_dir = Path(ld.shards) if ld.shards else run_dir / "shards"
    if ld.shards is None and info.is_main and not (shard_dir / "sizes.json").exists():
        log(f"writing shards of {data.n_items:,} items to {shard_dir}")
        unreadable = BadMedia()
        write_shards(data, shard_dir, maxcount=ld.shard_maxcount, progress=cfg.train.progress, overwrite=True,
                     unreadable=unreadable)
        if unreadable.total():
            log(f"media files that could not be read (counted as missing in training): {unreadable.as_dict()}")
    barrier(info)
    read_sizes(shard_dir)
    check_shards_match(shard_dir, data)
    return shard_dir


def materialize_media(data: Dataset, modalities: list[str]) -> Dataset:
    """Render lazy media once (the synthetic world draws images and audio on every access).

    Only for in-memory training; paths stay paths (the page cache keeps them cheap).
    """
    items = data.items
    changes = {}
    for m, seq in (("image", items.image), ("audio", items.audio)):
        if m in modalities and seq is not None and not isinstance(seq, (list, tuple)):
            changes[m] = list(seq)
    if not changes:
        return data
    return dataclasses.replace(data, items=dataclasses.replace(items, **changes))


def cached_masks(model: AlignmentModel) -> dict[str, torch.Tensor]:
    """Per cached modality, which items' frozen features the cache holds (CPU, for the collator)."""
    return {m: c.filled.detach().cpu().clone() for m, c in model.caches.items()}


def fill_caches(model: AlignmentModel, data: Dataset, cfg: PretrainConfig, info: DistInfo,
                shard_dir: Path | None) -> None:
    """Frozen backbones' features of every item, computed once in fixed batches (resume-safe)."""
    frozen = [m for m in model.frozen if m in model.content]
    if not frozen or not cfg.train.cache_frozen:
        return
    n = data.n_items
    caches = {m: model.enable_cache(m, n) for m in frozen}
    on_disk = {m: cache_path(data, m, cfg.encoder(m), cfg.seed) for m in frozen} if cfg.train.feature_cache else {}
    for m, path in on_disk.items():
        got = load_cached(path, n, caches[m].features.shape[1])
        if got is not None:
            caches[m].features.copy_(got[0].to(caches[m].features.device))
            caches[m].filled.copy_(got[1].to(caches[m].filled.device))
            if info.is_main:
                log(f"frozen {m} features from {path}")
    frozen = [m for m in frozen if not (m in on_disk and bool(caches[m].filled.any()))]
    if not frozen:
        return
    collate = ItemCollator({m: model.encoders[m] for m in frozen}, frozen)
    rank, world = (info.rank, info.world) if shard_dir is None else (0, 1)
    model.eval()
    show = cfg.train.progress and info.is_main
    if log_lines(show):
        log(f"caching frozen {', '.join(frozen)} features of {n:,} items ...")
    t0 = time.perf_counter()
    batches = eval_batches(data, collate, cfg.eval.batch_size, shard_dir, cfg.loader.num_workers, rank=rank,
                           world=world)
    total = -(-n // cfg.eval.batch_size) // world if shard_dir is None else None
    with torch.no_grad():
        for batch in progress_bar(batches, enabled=show, total=total, desc=f"caching {'+'.join(frozen)}",
                                  leave=False):
            for m in frozen:
                view = batch["views"][m]
                if view is None:
                    continue
                enc = model.encoders[m]
                rows = batch["index"][batch["masks"][m]].to(caches[m].features.device)
                caches[m].features[rows] = enc.encode(enc.to_device(view)).float()
                caches[m].filled[rows] = True
    if log_lines(show):
        log(f"cached in {time.perf_counter() - t0:.0f} s")
    if info.distributed and world > 1:  # each rank filled its chunks: sum the disjoint parts
        import torch.distributed as dist
        for c in caches.values():
            dist.all_reduce(c.features)
            filled = c.filled.to(torch.int32)
            dist.all_reduce(filled)
            c.filled = filled > 0
    if info.is_main:
        for m in frozen:
            if m in on_disk:
                save_cached(on_disk[m], caches[m].features, caches[m].filled)


def make_source(cfg: PretrainConfig, data: Dataset, collate: ItemCollator, info: DistInfo,
                shard_dir: Path | None, items: Any = None) -> MemorySource | ShardSource:
    """``items``: the indices to train on (None: all; streaming takes all, see ``pretrain``)."""
    ld = cfg.loader
    if shard_dir is None:
        return MemorySource(data, collate, ld.batch_size, seed=cfg.seed, world=info.world, rank=info.rank,
                            drop_last=ld.drop_last, num_workers=ld.num_workers, items=items)
    return ShardSource(shard_dir, collate, ld.batch_size, seed=cfg.seed, world=info.world, rank=info.rank,
                       num_workers=ld.num_workers, shuffle_buffer=ld.shuffle_buffer)


def evaluate_retrieval(model: AlignmentModel, data: Dataset, cfg: PretrainConfig, modalities: list[str],
                       shard_dir: Path | None, bad: BadMedia | None = None, split: ItemSplit | None = None,
                       heldout: bool = True, keep: dict[str, Any] | None = None) -> dict[str, float]:
    """In-sample retrieval over all items; with ``split`` also ``valid/*`` (the validation slice
    ranked among itself) and, if ``heldout``, ``heldout/*`` (the held-out items among themselves).
    Evaluations during training pass ``heldout=False``: held-out items play no part in them.
    ``keep``: receives the ``embs`` and ``masks`` ranked (the pictures reuse them)."""
    collate = ItemCollator({m: model.encoders[m] for m in modalities}, modalities)
    if bad is None:  # evaluations during training: cached features, no media decoding (the final one counts bad media)
        collate.cached = cached_masks(model)
    batches = eval_batches(data, collate, cfg.eval.batch_size, shard_dir, cfg.loader.num_workers)
    embs, masks = embed_items(model, batches, data.n_items, bad)
    if keep is not None:
        keep.update(embs=embs, masks=masks)
    ks, block = cfg.eval.ks, cfg.eval.block_size
    out = retrieval_metrics(embs, masks, modalities, ks, block)
    regress = cfg.loss.regression_weight > 0
    if split is not None and len(split.valid) >= 2:
        out.update(subset_metrics(embs, masks, modalities, split.valid, ks, "valid", block))
        if regress:
            out["valid/R2"] = fit_r2(embs, masks, modalities, split.valid)
    if split is not None and heldout and len(split.heldout) >= 2:
        out.update(subset_metrics(embs, masks, modalities, split.heldout, ks, HELDOUT, block))
        if regress:
            out[f"{HELDOUT}/R2"] = fit_r2(embs, masks, modalities, split.heldout)
    return out


def ridge_reference(model: AlignmentModel, data: Dataset, cfg: PretrainConfig, modalities: list[str],
                    split: ItemSplit) -> dict[str, Any]:
    """``heldout/ridge/*`` of the untrained model's frozen content features -> its behavior rows
    (the table before any head: a trained recommender's item embeddings, or the SVD start)."""
    collate = ItemCollator({m: model.encoders[m] for m in modalities}, modalities)
    batches = eval_batches(data, collate, cfg.eval.batch_size, None, cfg.loader.num_workers)
    devices = [model.encoders["behavior"].device] if model.encoders["behavior"].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # training starts from the same RNG state
        x, has = frozen_content_features(model, batches, data.n_items)
        beh = model.encoders["behavior"]
        y = beh.encode({"item": torch.arange(data.n_items, device=beh.device)}).float().cpu()
    ranks, alpha = ridge_ranks(x, has, y, split, cfg.heldout.ridge_alphas, cfg.eval.block_size)
    return {"metrics": rank_metrics(ranks, cfg.eval.ks, f"{HELDOUT}/ridge"), "alpha": alpha,
            "features": int(x.shape[1]), "ranks": ranks}


@holds_run_dir("pretrain", main_only=True)  # RUN writable, RUN/.lock held by rank 0 (mmrec/rundir.py)
def pretrain(cfg: PretrainConfig, log: Log | None = None, data: Dataset | None = None) -> dict[str, Any]:
    """Run (or resume) a pre-training run; returns what ``metrics.json`` holds (``{"interrupted": True,
    ...}`` when ``train.stop_after`` stopped it early). Works alone or under ``torchrun``.

    ``data``: an already loaded dataset instead of ``cfg.data`` (split with the run's split
    unless it has one already).
    """
    info = init_distributed(cfg.device)
    log = log or (lambda msg: None)
    say: Log = log if info.is_main else (lambda msg: None)
    run_dir = Path(cfg.out)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.train.resume:
            (run_dir / CHECKPOINT).unlink(missing_ok=True)  # a fresh run never resumes a stale state
        elif not (run_dir / CHECKPOINT).exists():
            say(f"no {run_dir / CHECKPOINT}: starting from scratch")
    barrier(info)
    torch.manual_seed(cfg.seed)
    data_name = cfg.data if data is None else data.name
    if data is None:
        data = load_pretrain_data(cfg)
        if info.is_main:  # versions + data fingerprint (docs/reliability.md)
            write_provenance(run_dir, cfg.data, "pretrain")
    elif data.split is None:
        data = apply_split(data, cfg.split, seed=cfg.seed)
    modalities, dropped = available_modalities(cfg, data)
    if dropped:
        say(f"no raw {', '.join(dropped)} in {cfg.data}: aligning {', '.join(modalities)} only")
    model = build_model(cfg, data, modalities).to(info.device)
    shard_dir = streaming_dir(cfg, data, run_dir, info, say)
    if shard_dir is None and cfg.loader.materialize_media:
        data = materialize_media(data, modalities)
    split = split_items(data, cfg.heldout, cfg.seed, need_valid=cfg.train.patience > 0)
    if split is not None and shard_dir is not None:
        raise ConfigError("held-out items / a validation slice (heldout.*, train.patience) need in-memory "
                          "training: streaming from shards would still feed them to the loss "
                          "(set loader.streaming=false)")
    if split is not None:
        say(f"items: {len(split.fit)} aligned, {len(split.valid)} validation, {len(split.heldout)} held out "
            f"({split.source})")
    item_ids = [str(x) for x in data.item_ids] if shard_dir is not None else None
    collate = ItemCollator({m: model.encoders[m] for m in modalities}, modalities, item_ids)
    source = make_source(cfg, data, collate, info, shard_dir, items=split.fit if split is not None else None)
    fill_caches(model, data, cfg, info, shard_dir)
    collate.cached = cached_masks(model)  # training batches skip decoding media of cached modalities
    ridge = ridge_reference(model, data, cfg, modalities, split) \
        if split is not None and cfg.heldout.enabled() and info.is_main else None
    targets = None
    if cfg.control == "permuted":
        fit = split.fit if split is not None else np.arange(data.n_items)
        targets = permuted_targets(data.n_items, fit, cfg.seed)

    resuming = cfg.train.resume and (run_dir / CHECKPOINT).exists()
    extra: dict[str, Any] = {}
    if not resuming and info.is_main:  # the untrained model (a resumed run keeps the first one's)
        extra["baseline"] = evaluate_retrieval(model, data, cfg, modalities, shard_dir, split=split)
    barrier(info)

    def evaluate(m: AlignmentModel) -> dict[str, float]:
        out = evaluate_retrieval(m, data, cfg, modalities, shard_dir, split=split, heldout=False) \
            if info.is_main else {}
        barrier(info)
        return out

    cooc = None
    if cfg.behavior_kind() == "id":
        matrix = data.merged_matrix("train")
        # positives among the aligned items only: a held-out item's row never reaches the loss
        cooc = CooccurrenceSampler(restrict_columns(matrix, split.fit) if split is not None else matrix)
    trainer = PretrainTrainer(cfg, model, source, run_dir, info, cooc=cooc, evaluate=evaluate, extra_state=extra,
                              stop_metric=cfg.train.stop_metric,
                              targets=targets)
    if shard_dir is not None and info.is_main:
        say(f"streaming {source.n_samples:,} items from {shard_dir}; "  # type: ignore[union-attr]
            f"{source.dropped(0)} left out per epoch to keep ranks in step")  # type: ignore[union-attr]
    result = trainer.fit()
    if result.interrupted:
        barrier(info)
        return {"interrupted": True, "step": result.step, "epoch": result.epoch}
    out: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    if info.is_main:
        bad = BadMedia()
        t0 = time.perf_counter()
        final = evaluate_retrieval(model, data, cfg, modalities, shard_dir, bad, split=split, keep=kept)
        eval_seconds = time.perf_counter() - t0
        heldout_info = None
        if split is not None:
            heldout_info = {**split.summary(), "control": cfg.control}
            if ridge is not None:
                final.update(ridge["metrics"])
                n_held = len(split.heldout)
                final.update({f"{HELDOUT}/chance/{k}": v for k, v in chance_metrics(n_held, cfg.eval.ks).items()})
                heldout_info.update(ridge_alpha=ridge["alpha"], ridge_features=ridge["features"])
        out = _write_outputs(cfg, data_name, run_dir, model, data, modalities, dropped, trainer, result,
                             trainer.extra_state.get("baseline", {}), final, bad, info, shard_dir, eval_seconds,
                             heldout_info)
        standins = write_aligned_items(kept["embs"], kept["masks"], data, cfg, modalities, run_dir)  # stand-ins
        if standins is not None:
            out["aligned_items"] = standins
            write_json(run_dir / METRICS, out)
    barrier(info)
    if cfg.heldout.with_control and cfg.control == "none":
        out = _with_control(cfg, log, data, out)
    if info.is_main and cfg.plots.enabled:  # after the control: its held-out ranks join the curves
        out["plots"] = write_plots(cfg, run_dir, data, modalities, kept["embs"], kept["masks"], split,
                                   ridge["ranks"] if ridge is not None else None, say)
        write_json(run_dir / METRICS, out)
    return out


def _with_control(cfg: PretrainConfig, log: Log, data: Dataset, out: dict[str, Any]) -> dict[str, Any]:
    """Train the permuted-pair control (same config, ``control: permuted``) in RUN/control and add its
    held-out numbers as ``heldout/control/*`` to this run's ``metrics.json``."""
    run_dir = Path(cfg.out)
    ccfg = dataclasses.replace(cfg, out=str(run_dir / "control"), control="permuted",
                               heldout=dataclasses.replace(cfg.heldout, with_control=False))
    log(f"permuted-pair control: {ccfg.out}")
    control = pretrain(ccfg, log=log, data=data)
    if not out:  # ranks > 0
        return out
    keep = {f"{HELDOUT}/control/{k[len(HELDOUT) + 1:]}": v for k, v in control.get("metrics", {}).items()
            if k.startswith(HELDOUT + "/") and k.count("/") == 1}
    out["metrics"].update(keep)
    out["heldout"]["control_run"] = str(ccfg.out)
    write_json(run_dir / METRICS, out)
    return out


def _write_outputs(cfg: PretrainConfig, data_name: str, run_dir: Path, model: AlignmentModel, data: Dataset,
                   modalities: list[str], dropped: list[str], trainer: PretrainTrainer, result: TrainResult, baseline: dict[str, float],
                   final: dict[str, float], bad: BadMedia, info: DistInfo, shard_dir: Path | None,
                   eval_seconds: float, heldout: dict[str, Any] | None = None) -> dict[str, Any]:
    encoders = {m: model.encoders[m] for m in modalities + ["behavior"]}
    save_encoders(run_dir, encoders, extra={"data": data_name, "embed_dim": cfg.embed_dim, "steps": result.step,
                                            "item_ids_hash": _ids_hash(data)})
    n = data.n_items
    items_seen = result.items
    metrics = {
        "model": "pretrain", "data": data_name, "split": data.split, "n_items": n,
        "metrics": final, "baseline": baseline,
        "chance": {f"Recall@{k}": min(1.0, k / max(n, 1)) for k in cfg.eval.ks},
        "bad_media": {"items": bad.as_dict(), "train": result.bad_media,
                      "examples": dict(sorted(bad.examples.items()))},
        "modalities": modalities, "modalities_missing": dropped,
        "behavior": cfg.behavior_kind(), "steps": result.step, "epochs": result.epoch,
        "train_seconds": round(result.train_seconds, 3), "eval_seconds": round(eval_seconds, 3),
        "items_per_second": round(items_seen / result.train_seconds, 2) if result.train_seconds > 0 else None,
        "seed": cfg.seed, "world_size": info.world, "streaming": shard_dir is not None,
        "evals": result.evals,
        "grad_checkpointing": getattr(model, "grad_checkpointing", {}),
        "unused_parameters": trainer.unused,
        "control": cfg.control,
    }
    if heldout is not None:
        metrics["heldout"] = heldout
    if result.extra.get("early_stopping"):
        metrics["early_stopping"] = result.extra["early_stopping"]
    write_json(run_dir / METRICS, metrics)
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    try:
        plot_curves(run_dir / "curves.png", result.history, baseline, final, result.evals, result.step)
    except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
        metrics["curves_error"] = f"{type(e).__name__}: {e}"
        write_json(run_dir / METRICS, metrics)
    return metrics


def _ids_hash(data: Dataset) -> str:
    import hashlib
    h = hashlib.sha1()
    for x in data.item_ids:
        h.update(str(x).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def plot_curves(path: Path, history: list[dict[str, Any]], baseline: dict[str, float], final: dict[str, float],
                evals: list[dict[str, Any]], steps: int) -> None:
    """Loss per step and content -> behavior Recall@10 (before, during, after)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "content_to_behavior/Recall@10"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if history:
        a.plot([r["step"] for r in history], [r["loss"] for r in history], lw=1)
    a.set_xlabel("step")
    a.set_ylabel("alignment loss")
    a.set_title("training loss")
    pts = [(0, baseline.get(key))] + [(e["step"], e["metrics"].get(key)) for e in evals] + [(steps, final.get(key))]
    pts = [(s, v) for s, v in pts if v is not None]
    if pts:
        b.plot([s for s, _ in pts], [v for _, v in pts], marker="o")
    b.set_xlabel("step")
    b.set_ylabel("Recall@10")
    b.set_title("content -> behavior retrieval")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


__all__ = ["METRICS", "available_modalities", "evaluate_retrieval", "fill_caches", "load_pretrain_data",
           "make_source", "plot_curves", "pretrain", "streaming_dir"]
