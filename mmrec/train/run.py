"""``mmrec train`` and ``mmrec evaluate`` as library calls: data -> split -> model -> metrics.json."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mmrec.datasets.features import load_feature_file
from mmrec.datasets.loading import load_dataset
from mmrec.datasets.schema import Dataset
from mmrec.datasets.splits import apply_split
from mmrec.errors import MMRecError
from mmrec.eval.protocols import evaluate as run_protocol
from mmrec.io import atomic_path, write_json
from mmrec.models.base import Recommender, create_model
from mmrec.rundir import check_provenance, holds_run_dir, write_provenance
from mmrec.train.checkpoint import load_weights
from mmrec.train.config import RunConfig, run_config_to_dict
from mmrec.train.features_on_demand import ensure_features
from mmrec.train.trainer import Trainer, resolve_device

METRICS = "metrics.json"


def prepare_data(cfg: RunConfig) -> Dataset:
    """Load, split (seeded) and attach ``--features`` files: the same steps for train and evaluate."""
    data = load_dataset(cfg.data, cfg.format, seed=cfg.seed, on_unseen=cfg.on_unseen, **cfg.data_args)
    data = apply_split(data, cfg.split, seed=cfg.seed, **cfg.split_args)
    for path in cfg.features:  # single-table file -> {stem: table}; extract file -> {image, text, ..., fused}
        data.items.features.update(load_feature_file(path, list(data.item_ids), dataset=data.name))
    # Content models on data with raw content but no stored features: extract once, cached.
    done = ensure_features(data, cfg)
    if done["extracted"] or done["cached"]:
        data.report["features_on_demand"] = {"extracted": done["extracted"],
                                             "cached": {m: str(p) for m, p in done["cached"].items()}}
    return data


def model_args(cfg: RunConfig) -> dict[str, Any]:
    """``model_args`` plus ``--fusion`` / ``--filtration`` / ``--enhancement`` / ``--mode`` routed to a model
    that takes them.

    The flags switch content on (``use_features``); a model without the field is a
    clear error rather than a silently ignored flag.
    """
    from mmrec.models.base import model_config

    args = dict(cfg.model_args)
    fields = {f.name for f in dataclasses.fields(model_config(cfg.model, {}))}
    for flag in ("fusion", "filtration", "enhancement"):
        value = getattr(cfg, flag)
        if value is None:
            continue
        if flag not in fields:
            raise MMRecError(f"model '{cfg.model}' takes no --{flag}; content-aware models: "
                             f"those whose config has a '{flag}' field (see docs/models)")
        args[flag] = value
        if "use_features" in fields:
            args.setdefault("use_features", True)
    if cfg.mode == "end2end" and not cfg.head:  # with a head, end2end trains backbone + head together
        if "mode" not in fields:
            raise MMRecError(f"model '{cfg.model}' has no content path to fine-tune end to end; "
                             f"--mode end2end works with content-aware models (see docs/models)")
        args["mode"] = "end2end"
        if "use_features" in fields:
            args.setdefault("use_features", True)
    return args


def build_model(cfg: RunConfig, data: Dataset, device: torch.device, train_backbone: bool = True) -> Recommender:
    """The run's model: ``--model``, or with ``--head`` a head on that backbone (mmrec/train/heads.py).

    Seeds torch with the run's seed first, so a model whose *structure* draws from the
    generator (``history``'s held-out stack pairs) is rebuilt identically by ``evaluate``,
    ``recommend`` and every other reader of the run, not only by ``train``.
    """
    torch.manual_seed(cfg.seed)
    if cfg.head:
        from mmrec.train.heads import build_head_model
        return build_head_model(cfg, data, device, train_backbone=train_backbone)
    return create_model(cfg.model, data, model_args(cfg)).to(device)


def make_evaluator(cfg: RunConfig):
    """Closure used by the trainer for validation and by the runner for test."""

    def evaluator(model: Recommender, data: Dataset, split: str, **kw: Any) -> dict[str, float]:
        if cfg.head:  # labelled exposures, binary metrics (mmrec/train/heads.py)
            from mmrec.train.heads import evaluate_head
            return evaluate_head(model, split, cfg.train.eval_batch_size)
        opts: dict[str, Any] = {"n_neg": cfg.train.n_neg, "seed": cfg.seed} if cfg.protocol == "sampled" else {}
        model.eval()
        if hasattr(model, "use_history"):  # sequence models: test input = train + valid (never the scored split)
            model.use_history(data, ("train", "valid") if split == "test" and data.valid is not None else ("train",))
        with torch.no_grad():
            return run_protocol(model, data, protocol=cfg.protocol, split=split, ks=cfg.ks(),
                                batch_size=cfg.train.eval_batch_size, **opts, **kw)

    return evaluator


def _cold_start(cfg: RunConfig, model: Recommender, data: Dataset) -> dict[str, Any] | None:
    """Rank each user's held-out cold items among all cold items (content models' job)."""
    if data.cold_items is None or len(data.cold_items) == 0 or data.test is None:
        return None
    test = data.test
    if not np.isin(test.item[test.behavior == data.target_index], data.cold_items).any():
        return None  # cold items exist (e.g. items.tsv rows without interactions) but none is held out
    from mmrec.eval.protocols import evaluate_full
    cold = torch.as_tensor(data.cold_items, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        metrics = evaluate_full(model, data, split="test", ks=cfg.ks() if cfg.protocol == "full" else [10, 20, 50],
                                batch_size=cfg.train.eval_batch_size, items=cold)
    return {**metrics, "n_items": int(len(cold))}


def _modality_weights(model: Recommender) -> dict[str, Any] | None:
    """Learned per-modality weights of the model's content encoder, if it has a weighting (``modality-gate``)."""
    report = getattr(getattr(model, "content", None), "modality_weights", None)
    return report() if callable(report) else None


@holds_run_dir("train")  # RUN writable, RUN/.lock held: one writer per run directory
def train(cfg: RunConfig) -> dict[str, Any]:
    """Train, select on valid, evaluate the selected weights on test, write RUN/metrics.json."""
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg)
    device = resolve_device(cfg.device)
    model = build_model(cfg, data, device)
    save_run_config(cfg, run_dir)
    write_provenance(run_dir, cfg.data, "train")  # versions + data fingerprint: evaluate/recommend check it
    evaluator = make_evaluator(cfg)
    t0 = time.perf_counter()
    result = Trainer(cfg, run_dir, evaluator).fit(model, data)
    test = evaluator(model, data, "test")
    metrics = {
        "model": cfg.model,
        "data": cfg.data,
        "protocol": cfg.protocol,
        "split": "test",
        "metrics": test,
        "valid": result.valid,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "train_seconds": round(result.train_seconds or (time.perf_counter() - t0), 3),
        "seed": cfg.seed,
        "split_kind": data.split,
        "select": cfg.select_metric(),
        "n_users": data.n_users,
        "n_items": data.n_items,
        "ids": {"users": id_digest(data.user_ids), "items": id_digest(data.item_ids)},  # `recommend` checks the data
    }
    if getattr(test, "parts", None):
        metrics["parts"] = test.parts  # counts of the repeat / discovery parts (multi-behavior data)
    cold = _cold_start(cfg, model, data) if not cfg.head else None
    if cold is not None:
        metrics["cold_start"] = cold
    weights = _modality_weights(model)
    if weights is not None:
        metrics["modality_weights"] = weights
    if data.report:
        metrics["data_report"] = data.report
    write_json(run_dir / METRICS, metrics)
    _write_item_embeddings(model, data, run_dir)
    try:
        from mmrec.train.report import plot_history
        plot_history(result.history, run_dir / "curves.png", cfg.select_metric())
    except ImportError:  # matplotlib is a core dependency; keep training usable without it
        pass
    return metrics


@holds_run_dir("evaluate", out=lambda run_dir, *a, **k: run_dir, create=False)  # it rewrites RUN/metrics.json
def evaluate(run_dir: str | Path, data: str | None = None, protocol: str | None = None,
             split: str = "test", overrides: dict[str, Any] | None = None, cold_items: str | None = None,
             metrics_out: str | Path | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run (same data, split and seed unless overridden).

    ``cold_items="aligned:PRETRAIN_RUN"``: items without training interactions are scored with
    the aligned content vectors of a pre-training run that was aligned to this run
    (mmrec/cold_items.py). ``metrics_out``: write there instead of ``RUN/metrics.json``.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if data is not None:
        cfg.data = data
    if protocol is not None:
        cfg.protocol = protocol
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    check_provenance(run_dir, cfg.data)  # warns when the data changed since training
    ds = prepare_data(cfg)
    model = build_model(cfg, ds, resolve_device(cfg.device), train_backbone=False)
    model.fit(ds)
    load_weights(model, run_dir)
    standins = None
    if cold_items:
        from mmrec.cold_items import attach_cold_items
        standins = attach_cold_items(model, ds, cold_items)
    values = make_evaluator(cfg)(model, ds, split)
    path = Path(metrics_out) if metrics_out else run_dir / METRICS
    previous: dict[str, Any] = {}
    if (run_dir / METRICS).exists():
        import json
        previous = json.loads((run_dir / METRICS).read_text())
    out = {**previous, "model": cfg.model, "data": cfg.data, "protocol": cfg.protocol,
           "split": split, "metrics": values, "seed": cfg.seed}
    for key in ("valid", "best_epoch", "epochs", "train_seconds"):
        out.setdefault(key, {} if key == "valid" else 0)
    if getattr(values, "parts", None):
        out["parts"] = values.parts
    else:
        out.pop("parts", None)
    cold = _cold_start(cfg, model, ds) if split == "test" and not cfg.head else None
    if cold is not None:
        out["cold_start"] = cold
    else:
        out.pop("cold_start", None)
    if standins is not None:
        out["cold_items"] = standins
    else:
        out.pop("cold_items", None)
    write_json(path, out)
    return out


def save_run_config(cfg: RunConfig, run_dir: Path) -> None:
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))


def id_digest(ids: Any) -> str:
    """SHA-256 of the id list in index order: tells a run's data from other data with the same sizes."""
    import hashlib
    h = hashlib.sha256()
    ids = list(ids)
    for start in range(0, len(ids), 65536):
        h.update("".join(f"{i}\n" for i in ids[start:start + 65536]).encode())
    return h.hexdigest()


def load_run_config(run_dir: Path) -> RunConfig:
    from mmrec.config import from_dict, load_yaml
    path = run_dir / "config.yaml"
    if not path.exists():
        raise MMRecError(f"{run_dir} is not a run directory (no config.yaml)")
    return from_dict(RunConfig, load_yaml(path))  # safe_load; bad YAML -> ConfigError naming the file


def _write_item_embeddings(model: Recommender, data: Dataset, run_dir: Path) -> None:
    """RUN/item_embeddings.safetensors: the alignment target for pre-training (issue: encoders)."""
    with torch.no_grad():
        model.prepare_eval()
        emb = model.item_embeddings()
    if emb is None:
        return
    from mmrec.datasets.features import write_features
    from mmrec.datasets.schema import FeatureTable
    emb = emb.detach().float().cpu()
    write_features(run_dir / "item_embeddings.safetensors",
                   FeatureTable(emb, torch.ones(len(emb), dtype=torch.bool), {"model": model.__class__.__name__}),
                   list(data.item_ids))


__all__ = ["train", "evaluate", "prepare_data"]
