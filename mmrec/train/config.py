"""The run configuration of ``mmrec train`` / ``mmrec evaluate``.

YAML shape (every key optional; CLI flags and ``--set`` override it)::

    model: {name: cigf, dim: 64, layers: 2}   # or just `model: cigf`
    data: synthetic:tiny
    protocol: sampled
    train: {epochs: 100, lr: 0.001, batch_size: 4096}

``--set model.dim=32`` reaches the model's own config dataclass, ``--set train.lr=0.01``
the training loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mmrec.config import apply_overrides, from_dict, load_yaml
from mmrec.errors import ConfigError

NAN_POLICIES = ("stop", "skip")
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class TrainSection:
    """Optimisation and selection settings."""

    epochs: int = 30
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's; SASRec uses [0.9, 0.98]
    lr_decay: float = 1.0       # learning rate multiplied by this after every epoch (CIGF/MB-GMN: 0.96)
    lr_decay_steps: int | None = None  # ... or after every N optimiser steps instead (staircase; the
                                       # CIGF/MB-GMN code's decay_step = 10000 users // 256 = 39)
    eval_every: int = 1
    patience: int = 5           # evaluations without improvement on valid before stopping
    select: str | None = None   # metric selected on valid; default Recall@20 (full) / NDCG@10 (sampled)
    grad_clip: float | None = None
    # a batch whose loss is NaN / inf: "stop" the run (the last checkpoint and best weights stay), or
    # "skip" its optimiser step, counting it, and stop after more than max_nonfinite_in_row in a row
    nan_policy: str = "stop"
    max_nonfinite_in_row: int = 10
    eval_batch_size: int = 1024
    ks: list[int] | None = None  # default: 5,10,20,50 (full) / 5,10,20 (sampled)
    n_neg: int = 99             # negatives of the sampled protocol
    progress: bool = True


@dataclass
class RunConfig:
    """Everything that defines a run; saved as RUN/config.yaml so `evaluate` can rebuild it."""

    model: str = "bprmf"
    data: str = "synthetic:tiny"
    out: str = "runs/run"
    format: str | None = None
    split: str | None = None
    protocol: str = "full"
    seed: int = 0
    device: str = "auto"
    mode: str = "two-step"
    fusion: str | None = None
    filtration: str | None = None
    enhancement: str | None = None   # feature enhancement after the fusion: mdr | ghmfc (model.enhancement)
    head: str | None = None
    features: list[str] = field(default_factory=list)
    on_unseen: str = "drop"
    resume: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)
    split_args: dict[str, Any] = field(default_factory=dict)
    data_args: dict[str, Any] = field(default_factory=dict)  # reader / synthetic-world options, e.g. noisy_modality
    head_args: dict[str, Any] = field(default_factory=dict)  # --head: tasks, scenarios, balancing, the head's config
    train: TrainSection = field(default_factory=TrainSection)

    def ks(self) -> list[int]:
        if self.train.ks:
            return sorted(set(int(k) for k in self.train.ks))
        return [5, 10, 20] if self.protocol == "sampled" else [5, 10, 20, 50]

    def select_metric(self) -> str:
        if self.train.select:
            return self.train.select
        if self.head:  # a head is selected on its mean task AUC over the valid exposures
            return "AUC"
        return "NDCG@10" if self.protocol == "sampled" else "Recall@20"


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """Accept ``model: {name: ..., **args}`` and route ``model.x`` keys to model_args."""
    raw = dict(raw)
    model = raw.get("model")
    if isinstance(model, dict):
        model = dict(model)
        name = model.pop("name", None)
        raw["model_args"] = {**model, **raw.get("model_args", {})}
        if name is not None:
            raw["model"] = name
        else:
            raw.pop("model")
    return raw


def default_recipe(model: str) -> Path | None:
    """``configs/<model>.yaml`` of the source checkout, if it exists (the paper's settings)."""
    path = REPO_CONFIGS / f"{model}.yaml"
    return path if path.exists() else None


def build_run_config(config_file: str | None, cli: dict[str, Any], overrides: Iterable[str]) -> RunConfig:
    """YAML recipe < CLI flags < ``--set`` overrides."""
    raw: dict[str, Any] = {}
    model_name = cli.get("model")
    recipe = config_file or (default_recipe(model_name) if model_name else None)
    if recipe:
        raw = _normalise(load_yaml(recipe))
        if model_name and raw.get("model") not in (None, model_name) and config_file is None:
            raw.pop("model")
    for key, value in cli.items():
        if value is None or value is False or value == []:
            continue
        if key in ("epochs", "batch_size", "lr"):
            raw.setdefault("train", {})[key] = value
        else:
            raw[key] = value
    overrides = list(overrides)
    model_sets = [o[len("model."):] for o in overrides if o.startswith("model.")]
    other_sets = [o for o in overrides if not o.startswith("model.")]
    raw = apply_overrides(raw, other_sets)
    raw["model_args"] = apply_overrides(dict(raw.get("model_args", {})), model_sets)
    cfg = run_config_from_dict(raw)
    cfg.recipe = str(recipe) if recipe else None  # type: ignore[attr-defined]
    return cfg


def run_config_from_dict(raw: dict[str, Any], path: str = "") -> RunConfig:
    """A checked :class:`RunConfig` from a YAML-shaped dict (``model: {name, ...}`` accepted).

    ``path`` prefixes key names in errors (``mmrec pipeline`` passes ``train``).
    """
    cfg = from_dict(RunConfig, _normalise(raw), path)
    where = f"{path}." if path else ""
    if cfg.protocol not in ("full", "sampled"):
        raise ConfigError(f"{where}protocol must be 'full' or 'sampled', not '{cfg.protocol}'")
    if cfg.mode not in ("two-step", "end2end"):
        raise ConfigError(f"{where}mode must be 'two-step' or 'end2end', not '{cfg.mode}'")
    if cfg.train.nan_policy not in NAN_POLICIES:
        raise ConfigError(f"{where}train.nan_policy must be one of {', '.join(NAN_POLICIES)}, "
                          f"not '{cfg.train.nan_policy}'")
    if cfg.train.max_nonfinite_in_row < 0:
        raise ConfigError(f"{where}train.max_nonfinite_in_row must be >= 0, got {cfg.train.max_nonfinite_in_row}")
    if cfg.on_unseen not in ("drop", "error"):
        raise ConfigError(f"{where}on_unseen must be 'drop' or 'error', not '{cfg.on_unseen}'")
    return cfg


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
