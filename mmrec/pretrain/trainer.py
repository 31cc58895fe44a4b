"""The alignment model and its training loop (single process or DDP under ``torchrun``).

:class:`AlignmentModel` is a plain ``nn.Module``: content encoders, a behavior
encoder and :class:`~mmrec.pretrain.losses.ContrastiveAlignmentLoss`; its forward
takes one batch of :mod:`mmrec.pretrain.data` and returns the loss of the *global*
batch (features are all-gathered with gradient inside the loss, so DDP's gradient
averaging gives exactly the single-process gradient of the same global batch).

:class:`PretrainTrainer` is the loop around it, open_clip style: AdamW, cosine
schedule with linear warm-up, gradient accumulation, AMP (bf16, or fp16 with a
GradScaler), optional gradient checkpointing, checkpoints every N steps that resume
exactly (model, optimizer, scaler, scheduler, every RNG of every rank, and the data
position: epoch + batch within it), a JSONL log and a tqdm bar on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset
from mmrec.encoders.base import Encoder, create_encoder
from mmrec.encoders.weights import WeightsError
from mmrec.errors import ConfigError, MMRecError
from mmrec.io import atomic_path
from mmrec.pretrain.config import PretrainConfig
from mmrec.pretrain.data import CACHED, CooccurrenceSampler
from mmrec.pretrain.losses import ContrastiveAlignmentLoss
from mmrec.pretrain.retrieval import regression_loss

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


# -- processes and devices ---------------------------------------------------------------
@dataclass
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group ``torchrun`` describes (env://); a no-op for one process.

    Backend: nccl on GPUs, gloo on CPUs. Each rank takes the GPU of its local rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available")
    if world > 1 and not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if want_cuda:
        dev = torch.device(f"cuda:{local_rank}") if world > 1 or device in ("auto", "cuda") else torch.device(device)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# -- the model -----------------------------------------------------------------------------
def _rows(batch: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """The rows ``keep`` of a preprocessed batch (every tensor has the batch axis first)."""
    return {k: v[keep] if isinstance(v, Tensor) else v for k, v in batch.items()}


class FrozenFeatureCache:
    """Backbone features of a frozen encoder, one row per item, filled once before training.

    A frozen backbone runs in eval mode, so its features are a pure function of the
    item: computing them once (in fixed batches, the same in a resumed run) saves its
    forward pass on every later epoch without changing a single number. Kept outside
    the module tree: not saved in checkpoints, not broadcast by DDP.
    """

    def __init__(self, n_items: int, dim: int, device: torch.device) -> None:
        self.features = torch.zeros(n_items, dim, device=device)
        self.filled = torch.zeros(n_items, dtype=torch.bool, device=device)


class AlignmentModel(nn.Module):
    """Content encoders + behavior encoder + the contrastive alignment loss.

    ``forward(batch)`` -> ``(loss, terms)`` with ``terms`` the detached pair losses.
    ``cf_weight`` > 0 adds an item-item co-occurrence InfoNCE on the behavior side
    (``batch["cf_pos"]``, ``batch["cf_ok"]``), keeping a jointly trained ID table
    collaborative instead of letting it drift into a copy of the content.
    ``batch["target"]`` (optional) names the behavior row each item is paired with
    (the permuted-pair control); without it an item is paired with its own row.
    """

    def __init__(self, encoders: dict[str, Encoder], loss: ContrastiveAlignmentLoss,
                 cf_weight: float = 0.0, frozen: Iterable[str] = (), regression_weight: float = 0.0) -> None:
        super().__init__()
        self.regression_weight = float(regression_weight)
        if "behavior" not in encoders:
            raise ConfigError("the alignment model needs a 'behavior' encoder")
        self.encoders = nn.ModuleDict(encoders)
        self.loss_fn = loss
        self.cf_weight = float(cf_weight)
        self.cf_loss = ContrastiveAlignmentLoss(pairs={"behavior-cooc": 1.0}, init_temperature=0.1) \
            if cf_weight > 0 else None
        self.frozen = [m for m in frozen if m in encoders]
        self.caches: dict[str, FrozenFeatureCache] = {}

    @property
    def content(self) -> list[str]:
        return [m for m in self.encoders if m != "behavior"]

    def set_train(self, mode: bool = True) -> "AlignmentModel":
        """``train(mode)`` but frozen backbones stay in eval mode (no dropout, BN statistics kept)."""
        self.train(mode)
        for m in self.frozen:
            self.encoders[m].backbone.eval()
        return self

    def enable_cache(self, modality: str, n_items: int) -> FrozenFeatureCache:
        enc = self.encoders[modality]
        cache = FrozenFeatureCache(n_items, enc.backbone_dim, enc.device)
        self.caches[modality] = cache
        return cache

    def embed(self, modality: str, view: dict[str, Tensor] | None, index: Tensor, mask: Tensor) -> Tensor | None:
        """Projected embeddings of the rows ``mask`` of the batch (``None`` when there are none)."""
        enc = self.encoders[modality]
        cache = self.caches.get(modality)
        if view is None or (view is CACHED and cache is None):
            return None
        if cache is None:
            return enc(view)
        rows = index[mask].to(cache.features.device)
        if rows.numel() == 0:
            return None
        missing = ~cache.filled[rows]
        if missing.any() and view is CACHED:
            raise RuntimeError(f"{modality}: the batch came without media for items the cache does not hold")
        if missing.any():  # not seen by the fill pass (e.g. cache disabled for a resumed shard run)
            with torch.no_grad():
                h = enc.encode(enc.to_device(_rows(view, missing.cpu()))).float()
            cache.features[rows[missing]] = h
            cache.filled[rows[missing]] = True
        return enc.head(cache.features[rows])

    def features(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every view as ``[B, d]`` (rows without the view are zeros and masked out)."""
        index = batch["index"]
        b = index.shape[0]
        beh = self.encoders["behavior"]
        device = beh.device
        # ``target``: the behavior row paired with each item (the permuted-pair control); default itself
        feats: dict[str, Tensor] = {"behavior": beh({"item": batch.get("target", index)}).float()}
        masks: dict[str, Tensor] = {}
        for m in self.content:
            mask = batch["masks"][m]
            z = self.embed(m, batch["views"].get(m), index, mask)
            enc = self.encoders[m]
            full = torch.zeros(b, enc.embed_dim, device=device)
            if z is not None:
                full = full.index_put((torch.nonzero(mask.to(device)).flatten(),), z.float())
            else:
                # no row of this batch has the modality: a zero that still touches every trainable
                # parameter keeps DDP's gradient buckets complete
                full = full + sum((p.sum() * 0.0 for p in enc.parameters() if p.requires_grad),
                                  torch.zeros((), device=device))
            feats[m] = full
            masks[m] = mask.to(device)
        return feats, masks

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        feats, masks = self.features(batch)
        device = feats["behavior"].device
        index = batch["index"].to(device)
        pos = self.encoders["behavior"]({"item": batch["cf_pos"]}).float() if self.cf_loss is not None else None
        with torch.autocast(device_type=device.type, enabled=False):  # the loss in float32 under AMP
            loss, terms = self.loss_fn(feats, masks=masks, item_ids=index, return_terms=True)
            if self.cf_loss is not None:
                cf, _ = self.cf_loss({"behavior": feats["behavior"], "cooc": pos},
                                     masks={"cooc": batch["cf_ok"].to(device)}, item_ids=index, return_terms=True)
                loss = loss + self.cf_weight * cf
                terms["behavior-cooc"] = cf.detach()
            if self.regression_weight > 0:  # content mean -> the behavior row itself (cold-item stand-ins)
                reg = regression_loss(feats, masks, self.content)
                loss = loss + self.regression_weight * reg
                terms["content-regression"] = reg.detach()
        return loss, terms


def _svd_item_factors(matrix: Any, dim: int, seed: int) -> np.ndarray:
    """Item factors of the symmetrically normalised user x item matrix (V sqrt(S)), std 0.1."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    x = sp.csr_matrix(matrix, dtype=np.float64)
    du = np.asarray(x.sum(1)).ravel()
    di = np.asarray(x.sum(0)).ravel()
    x = sp.diags(1 / np.sqrt(np.maximum(du, 1))) @ x @ sp.diags(1 / np.sqrt(np.maximum(di, 1)))
    rng = np.random.default_rng(seed)
    out = rng.normal(0, 0.1, (x.shape[1], dim))
    k = min(dim, min(x.shape) - 1)
    if k >= 1 and x.nnz:
        _, s, vt = svds(x, k=k, v0=rng.standard_normal(min(x.shape)), random_state=seed)
        order = np.argsort(-s)
        v = vt[order].T * np.sqrt(s[order])[None, :]
        v *= 0.1 / max(v.std(), 1e-12)
        seen = di > 0
        out[seen, :k] = v[seen]
        out[seen, k:] = 0.0
    return out.astype(np.float32)


def build_encoders(cfg: PretrainConfig, data: Dataset, modalities: list[str]) -> dict[str, Encoder]:
    """The content encoders of ``modalities`` and the behavior encoder, as the config says."""
    encoders: dict[str, Encoder] = {}
    for m in modalities:
        sec = cfg.encoder(m)
        enc = create_encoder(m, sec.name, pretrained=sec.pretrained, embed_dim=cfg.embed_dim, **sec.args)
        if sec.freeze_backbone:
            enc.freeze_backbone()
        encoders[m] = enc
    b = cfg.behavior
    if cfg.behavior_kind() == "run":
        trainable = bool(b.trainable) if b.trainable is not None else False
        try:
            beh = create_encoder("behavior", "run", embed_dim=cfg.embed_dim, head=b.head, run=b.run,
                                 trainable=trainable, item_ids=[str(x) for x in data.item_ids])
        except WeightsError as e:  # name both sides: the run and the data it is matched against
            raise WeightsError(f"behavior.run does not match dataset '{data.name}' ({cfg.data}): {e}") from e
    else:
        beh = create_encoder("behavior", "id", pretrained=None, embed_dim=cfg.embed_dim, head=b.head,
                             num_items=data.n_items, dim=b.dim)
        if b.init == "svd":
            with torch.no_grad():
                beh.table.weight.copy_(torch.from_numpy(_svd_item_factors(data.merged_matrix("train"), b.dim,
                                                                          cfg.seed)))
        if b.trainable is False:
            beh.table.weight.requires_grad_(False)
    encoders["behavior"] = beh
    return encoders


def enable_grad_checkpointing(enc: Encoder) -> bool:
    """Turn on activation checkpointing in the backbone if its library supports it."""
    bb = getattr(enc, "backbone", None)
    if bb is None:
        return False
    if hasattr(bb, "set_grad_checkpointing"):  # timm, open_clip
        bb.set_grad_checkpointing(True)
        return True
    if getattr(bb, "supports_gradient_checkpointing", False):  # transformers
        if hasattr(bb, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            bb.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            bb.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True
    return False


def build_model(cfg: PretrainConfig, data: Dataset, modalities: list[str]) -> AlignmentModel:
    """Encoders + loss, seeded (every rank builds the same initial weights)."""
    torch.manual_seed(cfg.seed)
    encoders = build_encoders(cfg, data, modalities)
    ls = cfg.loss
    loss = ContrastiveAlignmentLoss(pairs=ls.pairs, content_weight=ls.content_weight,
                                    cross_modal_weight=ls.cross_modal_weight, init_temperature=ls.init_temperature,
                                    learn_temperature=ls.learn_temperature, max_logit_scale=ls.max_logit_scale)
    frozen = [m for m in modalities if cfg.encoder(m).freeze_backbone]
    cf = cfg.behavior.cf_weight if cfg.behavior_kind() == "id" else 0.0
    model = AlignmentModel(encoders, loss, cf_weight=cf, frozen=frozen, regression_weight=ls.regression_weight)
    if cfg.train.grad_checkpointing:
        model.grad_checkpointing = {m: enable_grad_checkpointing(encoders[m])  # type: ignore[attr-defined]
                                    for m in modalities if m not in frozen}
    return model


def param_groups(model: AlignmentModel, cfg: PretrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: backbones at ``lr * lr_scale``; no weight decay on biases, norms, scales, tables."""
    lr, wd = cfg.train.lr, cfg.train.weight_decay
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for m, enc in model.encoders.items():
        backbone = {id(p) for p in enc.backbone_parameters()} if m != "behavior" else set()
        scale = cfg.encoder(m).lr_scale if m != "behavior" else 1.0
        for name, p in enc.named_parameters():
            if not p.requires_grad:
                continue
            decay = wd if p.ndim >= 2 and "table" not in name else 0.0
            groups.setdefault((lr * (scale if id(p) in backbone else 1.0), decay), []).append(p)
    for p in list(model.loss_fn.parameters()) + (list(model.cf_loss.parameters()) if model.cf_loss else []):
        if p.requires_grad:
            groups.setdefault((lr, 0.0), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": g_wd} for (g_lr, g_wd), ps in groups.items()]


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine to ``min_ratio`` at ``total_steps``."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# -- RNG and checkpoint state ----------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


@dataclass
class TrainResult:
    step: int = 0
    epoch: int = 0                 # epochs completed (a run stopped mid-epoch: the epoch it is in)
    history: list[dict[str, Any]] = field(default_factory=list)   # log lines (rank 0)
    evals: list[dict[str, Any]] = field(default_factory=list)     # {"step", "epoch", "metrics"}
    bad_media: dict[str, int] = field(default_factory=dict)       # skips during training, all ranks
    train_seconds: float = 0.0
    items: int = 0                 # items trained on (all ranks, all steps)
    interrupted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class PretrainTrainer:
    """The loop: ``fit()`` trains ``model`` on ``source`` and checkpoints into ``run_dir``."""

    def __init__(self, cfg: PretrainConfig, model: AlignmentModel, source: Any, run_dir: str | Path,
                 info: DistInfo, cooc: CooccurrenceSampler | None = None,
                 evaluate: Callable[[AlignmentModel], dict[str, float]] | None = None,
                 extra_state: dict[str, Any] | None = None, targets: np.ndarray | None = None,
                 stop_metric: str = "valid/MRR") -> None:
        """``targets[i]``: the behavior row item ``i`` is paired with (None: its own; the permuted-pair
        control). ``stop_metric``: the key of ``evaluate``'s result that early stopping
        (``train.patience``) watches; it must come from items outside the loss."""
        self.cfg, self.model, self.source, self.info = cfg, model, source, info
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.stop_metric = stop_metric
        self.early: dict[str, Any] = {"best": None, "best_step": 0, "best_epoch": 0, "bad": 0, "stopped": False}
        self.best_state: dict[str, Tensor] | None = None
        self.nonfinite = {"in_row": 0, "skipped": 0}  # train.nan_policy's counts (kept in the checkpoint)
        self.saved_step = 0  # the step of the last checkpoint written (or resumed from)
        self.run_dir = Path(run_dir)
        self.cooc = cooc if model.cf_loss is not None else None
        self.evaluate = evaluate
        self.extra_state = dict(extra_state or {})
        t = cfg.train
        self.accum = t.grad_accum
        if t.max_steps:
            self.total_steps = int(t.max_steps)
            self.epochs = 10 ** 9
        else:
            self.total_steps = t.epochs * math.ceil(source.batches_per_epoch(0) / self.accum)
            self.epochs = t.epochs
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=t.lr, betas=tuple(t.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(self.total_steps, t.warmup_steps, t.min_lr_ratio))
        dev = info.device
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=t.amp == "fp16")
        self.unused: list[str] = []
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            if not t.find_unused_parameters:
                self.unused = self._freeze_unused()
            self.net: nn.Module = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=t.find_unused_parameters)
        else:
            self.net = model

    def _freeze_unused(self) -> list[str]:
        """Stop gradients into parameters no loss reaches, before DDP wraps the model.

        DDP waits for a gradient of every trainable parameter; one probe step on the first
        batch finds those that never get one (on any rank). The built-in encoders leave none
        (text models are built without BERT's pooler, open_clip towers without the other
        tower): the probe is a safety net for other backbones, e.g. a local transformers
        directory whose model has parts a pooled encoder skips. It leaves no trace: RNG
        states and buffers (BatchNorm statistics) are restored, gradients dropped.
        """
        model, info = self.model, self.info
        batch = next(iter(self.source.epoch(0, 0)))
        self._add_cf(batch, 0)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        devices = [info.device] if info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model.set_train(True)
            with self._autocast():
                loss, _ = model(batch)
            loss.backward()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        used = torch.tensor([p.grad is not None for _, p in params], dtype=torch.int32, device=info.device)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
        model.zero_grad(set_to_none=True)
        unused = []
        for (n, p), u in zip(params, used.tolist()):
            if not u:
                p.requires_grad_(False)
                unused.append(n)
        return unused

    # -- state ------------------------------------------------------------------------
    def _state(self, step: int, epoch: int, batch: int, result: TrainResult) -> dict[str, Any]:
        rngs = gather_objects(rng_state(), self.info)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rngs, "world_size": self.info.world, "step": step, "position": {"epoch": epoch, "batch": batch},
                "evals": result.evals, "bad_media": result.bad_media, "train_seconds": result.train_seconds,
                "items": result.items,
                "extra": self.extra_state, "early": dict(self.early), "best_state": self.best_state,
                "nonfinite": dict(self.nonfinite)}

    def save_checkpoint(self, step: int, epoch: int, batch: int, result: TrainResult) -> None:
        state = self._state(step, epoch, batch, result)  # collective: every rank takes part
        if self.info.is_main:
            with atomic_path(self.run_dir / CHECKPOINT) as tmp:
                torch.save(state, tmp)
        self.saved_step = step
        barrier(self.info)

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            return None
        from mmrec.train.checkpoint import safe_torch_load  # weights_only=True: a pickle could run code
        state = safe_torch_load(path, keys=("world_size", "model", "optimizer", "scheduler", "scaler"))
        if state["world_size"] != self.info.world:
            raise MMRecError(f"{path} was written by {state['world_size']} process(es); resume it with the "
                             f"same number (now {self.info.world}) so the data order and RNGs match")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.extra_state = state.get("extra", {})
        self.early = dict(state.get("early") or self.early)
        self.best_state = state.get("best_state")
        self.nonfinite = dict(state.get("nonfinite") or self.nonfinite)
        return state

    # -- logging ------------------------------------------------------------------------
    def _log_path(self) -> Path:
        return self.run_dir / LOG

    def _truncate_log(self, step: int) -> list[dict[str, Any]]:
        """Keep the log lines up to ``step`` (a resumed run redoes what came after)."""
        path = self._log_path()
        if not path.exists():
            return []
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in kept if r.get("step", 0) <= step]
        if self.info.is_main:
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def _append_log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            with open(self._log_path(), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _bad_totals(self, local: Counter) -> dict[str, int]:
        total: Counter = Counter()
        for c in gather_objects(dict(local), self.info):
            total.update(c)
        return dict(sorted(total.items()))

    # -- the loop -------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.amp_dtype)

    def _add_cf(self, batch: dict[str, Any], epoch: int) -> None:
        """The batch's behavior pairing (``target``) and co-occurrence positives of those rows."""
        rows = batch["index"]
        if self.targets is not None:
            rows = self.targets[rows]
            batch["target"] = rows
        if self.cooc is None:
            return
        pos, ok = self.cooc.sample(rows.numpy(), self.cfg.seed, epoch)
        batch["cf_pos"] = torch.from_numpy(pos)
        batch["cf_ok"] = torch.from_numpy(ok)

    def space_needed(self) -> int:
        """Peak bytes this run adds to ``run_dir``: two checkpoints (the one being replaced and its
        replacement: weights + AdamW's two moments of the trainable ones, + the best weights when
        early stopping keeps them) and ``encoders.safetensors``. Shards (streaming) are not counted."""
        from mmrec.rundir import state_bytes
        checkpoint = state_bytes(self.model, trainable_copies=2)
        if self.cfg.train.patience:
            checkpoint += state_bytes(self.model)
        existing = sum((self.run_dir / f).stat().st_size for f in (CHECKPOINT, "encoders.safetensors")
                       if (self.run_dir / f).is_file())
        return max(2 * checkpoint + state_bytes(self.model) - existing, 0)

    def fit(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        t = cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from mmrec.rundir import check_free_space  # before the first step, not at the first checkpoint
        check_free_space(self.run_dir, self.space_needed(),
                         "checkpoint.pt (weights + AdamW moments, old and new while it is replaced) + "
                         "encoders.safetensors")
        result = TrainResult()
        step, start_epoch, start_batch = 0, 0, 0
        state = self.load_checkpoint() if t.resume else None
        if state is not None:
            step = self.saved_step = state["step"]
            start_epoch, start_batch = state["position"]["epoch"], state["position"]["batch"]
            result.evals, result.bad_media = state["evals"], dict(state["bad_media"])
            result.train_seconds = state["train_seconds"]
            result.items = state.get("items", 0)
            result.history = self._truncate_log(step)
            set_rng_state(state["rng"][info.rank])
        elif info.is_main:
            self._log_path().unlink(missing_ok=True)
        barrier(info)
        local_bad: Counter = Counter()
        base_bad = Counter(result.bad_media) if info.is_main else Counter()  # counted once, on rank 0
        from mmrec.progress import progress_bar
        bar = progress_bar(total=self.total_steps, initial=step, desc="pretrain", unit="step",
                           enabled=t.progress and info.is_main)
        self.model.set_train(True)
        self.optimizer.zero_grad(set_to_none=True)
        done = step >= self.total_steps
        saved = step
        epoch = start_epoch
        pos = (start_epoch, start_batch)
        done = done or self.early["stopped"]  # a resumed run that had stopped early
        t0 = time.perf_counter()
        bad_loss: tuple[float, int] | None = None  # (value, batch) of the step's first non-finite loss
        while not done and epoch < self.epochs:
            nb = self.source.batches_per_epoch(epoch)
            b = start_batch if epoch == start_epoch else 0
            group = min(self.accum, nb - b)
            micro, sums, n_items = 0, Counter(), 0
            for batch in self.source.epoch(epoch, b):
                self._add_cf(batch, epoch)
                local_bad.update(batch["bad"])
                last = micro + 1 == group
                sync = contextlib.nullcontext() if (last or not info.distributed) else self.net.no_sync()
                with sync:
                    with self._autocast():
                        loss, terms = self.net(batch)
                    self.scaler.scale(loss / group).backward()
                value = float(loss.detach())
                if not math.isfinite(value) and bad_loss is None:
                    bad_loss = (value, b + 1)  # backward still runs: DDP ranks must stay in step
                sums["loss"] += value / group
                for k, v in terms.items():
                    sums[k] += float(v) / group
                n_items += int(batch["index"].shape[0])
                micro += 1
                b += 1
                if not last:
                    continue
                # -- optimizer step ------------------------------------------------------
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                norm = None
                if t.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                elif not self.scaler.is_enabled():  # fp16: the GradScaler skips inf / NaN gradients itself
                    from mmrec.train.trainer import grad_norm
                    norm = grad_norm(params)
                if self.scaler.is_enabled():
                    norm = None  # fp16: an overflowing gradient is the GradScaler's normal signal, not a fault
                skip = self._check_finite(bad_loss, norm, step + 1, epoch, b)
                bad_loss = None
                if skip:  # no update; the schedule still advances (as for a step the GradScaler skips)
                    if self.scaler.is_enabled():
                        if not t.grad_clip:
                            self.scaler.unscale_(self.optimizer)
                        self.scaler.update()  # lowers the scale when the gradients overflowed
                else:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                step += 1
                result.items += n_items * info.world
                bar.update(1)
                epoch_done = b >= nb
                if t.log_every and (step % t.log_every == 0 or epoch_done):
                    bad = self._bad_totals(local_bad)
                    record = {"step": step, "epoch": epoch, "batch": b, **{k: round(v, 6) for k, v in sums.items()},
                              "lr": self.optimizer.param_groups[0]["lr"],
                              "temperature": float(1.0 / self.model.loss_fn.scale().detach()),
                              "items": n_items * info.world,
                              "bad_media": dict(sorted((base_bad + Counter(bad)).items()))}
                    if t.nan_policy == "skip":
                        record["skipped_steps"] = self.nonfinite["skipped"]
                    if not skip:  # no line for a skipped step (its loss is not a number); later lines count it
                        self._append_log(record)
                        result.history.append(record)
                        bar.set_postfix(loss=f"{sums['loss']:.3f}")
                micro, sums, n_items = 0, Counter(), 0
                group = min(self.accum, nb - b)
                if epoch_done:
                    epoch_end = epoch + 1
                    if cfg.eval.every and epoch_end % cfg.eval.every == 0 and self.evaluate is not None:
                        result.train_seconds += time.perf_counter() - t0
                        metrics = self.evaluate(self.model)
                        self.model.set_train(True)
                        result.evals.append({"step": step, "epoch": epoch_end, "metrics": metrics})
                        if t.patience:
                            self._early_stopping(metrics, step, epoch_end)
                        t0 = time.perf_counter()
                pos = (epoch + 1, 0) if epoch_done else (epoch, b)
                done = step >= self.total_steps or self.early["stopped"]
                stop = t.stop_after is not None and step >= t.stop_after and not done
                if stop or (t.checkpoint_every and step % t.checkpoint_every == 0) or done:
                    result.train_seconds += time.perf_counter() - t0
                    result.bad_media = dict(sorted((base_bad + Counter(self._bad_totals(local_bad))).items()))
                    self.save_checkpoint(step, *pos, result)
                    saved = step
                    t0 = time.perf_counter()
                if stop:
                    bar.close()
                    result.step, result.epoch, result.interrupted = step, pos[0], True
                    return result
                if done:
                    break
            epoch += 1
        bar.close()
        result.train_seconds += time.perf_counter() - t0
        result.bad_media = dict(sorted((base_bad + Counter(self._bad_totals(local_bad))).items()))
        result.step, result.epoch = step, pos[0]  # epochs completed
        if saved != step:  # the epochs ran out before total_steps (streaming epochs can be shorter)
            self.save_checkpoint(step, *pos, result)
        if t.patience and self.best_state is not None:  # early stopping keeps the best weights
            self.model.load_state_dict(self.best_state)
        result.extra["early_stopping"] = dict(self.early, metric=self.stop_metric, patience=t.patience) \
            if t.patience else None
        self.model.eval()
        return result

    def _check_finite(self, bad_loss: tuple[float, int] | None, norm: Tensor | None, step: int, epoch: int,
                      batch: int) -> bool:
        """``train.nan_policy`` for one optimizer step: True to skip it; raises to stop.

        The same policy and message as ``mmrec train``'s (:meth:`mmrec.train.trainer.Trainer._nonfinite`).
        Under DDP the gradients are already all-reduced (a NaN on one rank is a NaN on all); the
        loss is per rank, so the verdict is all-reduced too and every rank skips or stops together.
        """
        t = self.cfg.train
        what = None
        if bad_loss is not None:
            what, batch = f"loss became {bad_loss[0]}", bad_loss[1]
        elif norm is not None and not torch.isfinite(norm):
            what = f"gradient became non-finite (norm {norm.item()}; the loss was finite)"
        if self.info.distributed:
            flag = torch.tensor([what is not None], dtype=torch.int32, device=self.info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and what is None:
                what = "loss became non-finite on another rank"
        if what is None:
            self.nonfinite["in_row"] = 0
            return False
        self.nonfinite["in_row"] += 1
        in_row = self.nonfinite["in_row"]
        if t.nan_policy == "stop" or in_row > t.max_nonfinite_in_row:
            why = "" if t.nan_policy == "stop" else \
                f" in {in_row} steps in a row (train.max_nonfinite_in_row={t.max_nonfinite_in_row})"
            kept = (f"{self.run_dir / CHECKPOINT} holds the state after step {self.saved_step} (--resume continues "
                    f"from it)" if self.saved_step else "no checkpoint was written yet")
            raise MMRecError(f"{what} at step {step} (epoch {epoch + 1}, batch {batch}){why}; {kept}; lower the "
                             f"learning rate (train.lr={t.lr}) or check the input media "
                             f"(train.nan_policy=skip skips such steps)")
        self.nonfinite["skipped"] += 1
        return True

    def _early_stopping(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        """Track ``stop_metric`` (higher is better); stop after ``patience`` evaluations without a gain."""
        if self.stop_metric not in metrics:  # e.g. rank > 0, whose evaluate returns nothing
            value = None
        else:
            value = float(metrics[self.stop_metric])
        if self.info.distributed:  # rank 0 evaluates: every rank follows its decision
            value = gather_objects(value, self.info)[0]
        if value is None:
            raise MMRecError(f"early stopping watches '{self.stop_metric}', which the evaluation did not "
                             f"report (it needs a validation slice: heldout.valid_share > 0)")
        e = self.early
        if e["best"] is None or value > e["best"]:
            e.update(best=value, best_step=step, best_epoch=epoch, bad=0)
            self.best_state = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
        else:
            e["bad"] += 1
            e["stopped"] = e["bad"] >= self.cfg.train.patience


__all__ = ["AlignmentModel", "DistInfo", "FrozenFeatureCache", "PretrainTrainer", "TrainResult", "build_encoders",
           "build_model", "cosine_with_warmup", "enable_grad_checkpointing", "init_distributed", "param_groups"]
