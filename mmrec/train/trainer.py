"""The training loop: epochs of model-provided batches, selection on validation only.

The loop knows nothing about particular models: it asks the model for batches
(:meth:`Recommender.training_batches`) and a loss, evaluates the validation split
with the run's protocol, keeps the best weights, stops early, and checkpoints every
epoch so ``--resume`` continues exactly.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError, MMRecError
from mmrec.io import atomic_path
from mmrec.models.base import Recommender
from mmrec.progress import log, log_lines, progress_bar
from mmrec.rundir import check_free_space, training_bytes
from mmrec.train.checkpoint import load_state, load_weights, save_state, save_weights
from mmrec.train.config import RunConfig

Evaluator = Callable[[Recommender, Dataset, str], dict[str, float]]


@dataclass
class TrainResult:
    best_epoch: int = 0
    epochs: int = 0
    valid: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def grad_norm(params: Iterable[torch.nn.Parameter], clip: float | None = None) -> torch.Tensor:
    """The total 2-norm of the gradients (after backward, before the step), clipping them to ``clip`` if set.

    One number answers "is any gradient inf / NaN" (a non-finite entry makes the norm non-finite),
    which ``train.nan_policy`` checks: a finite loss can still overflow in backward.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip)  # returns the norm before clipping
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class Trainer:
    """Fits one model on one (already split) dataset, writing into ``run_dir``."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, evaluator: Evaluator) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.evaluator = evaluator
        self.select = cfg.select_metric()

    def fit(self, model: Recommender, data: Dataset) -> TrainResult:
        cfg, tc = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        model.fit(data)
        result = TrainResult()
        t0 = time.perf_counter()

        if not model.trainable or tc.epochs <= 0:
            result.valid = self.evaluator(model, data, "valid")
            save_weights(model, self.run_dir)
            result.train_seconds = time.perf_counter() - t0
            result.history.append({"epoch": 0, "valid": result.valid})
            self._log(result.history[-1])
            return result

        # before the first epoch, not when the first checkpoint fails to fit (docs/reliability.md, section 4)
        check_free_space(self.run_dir, training_bytes(model, self.run_dir),
                         "checkpoint.pt (weights + Adam moments, old and new while it is replaced) + best.safetensors")
        optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))
        if tc.lr_decay_steps is not None and tc.lr_decay_steps < 1:
            raise ConfigError(f"train.lr_decay_steps must be >= 1 (or null for a decay per epoch), got {tc.lr_decay_steps}")
        # per step: the schedule does not depend on how many steps an epoch has (small datasets)
        per_step = tc.lr_decay_steps is not None
        scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, step_size=tc.lr_decay_steps, gamma=tc.lr_decay)
                     if per_step else torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=tc.lr_decay))
        selection = {"best": -math.inf, "best_epoch": 0, "bad_evals": 0, "valid": {}}
        self._selection, self._saved_epoch, self._bad_in_row = selection, 0, 0
        start_epoch = 1
        if cfg.resume:
            state = load_state(self.run_dir)
            if state is not None:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                if state.get("scheduler") is not None:
                    scheduler.load_state_dict(state["scheduler"])
                rng.bit_generator.state = state["numpy_rng"]
                torch.set_rng_state(state["torch_rng"])
                selection = self._selection = state["selection"]
                self._saved_epoch = state["epoch"]
                result.history = state["history"]
                start_epoch = state["epoch"] + 1
                result.train_seconds = sum(h.get("seconds", 0.0) for h in result.history)
                self._rewrite_log(result.history)  # drop records of an epoch killed after its log line
                print(f"resuming {self.run_dir} after epoch {state['epoch']}")
        elif (self.run_dir / "checkpoint.pt").exists():
            (self.run_dir / "checkpoint.pt").unlink()  # a fresh run must not resume a stale state
            log = self.run_dir / "log.jsonl"
            if log.exists():
                log.unlink()

        epoch = start_epoch - 1
        for epoch in range(start_epoch, tc.epochs + 1):
            if selection["bad_evals"] >= tc.patience:
                result.stopped_early = True
                epoch -= 1
                break
            e0 = time.perf_counter()
            loss, skipped = self._train_epoch(model, data, optimizer, rng, epoch, scheduler if per_step else None)
            if not per_step:
                scheduler.step()
            record: dict[str, Any] = {"epoch": epoch, "loss": loss}
            if tc.nan_policy == "skip":
                record["skipped_batches"] = skipped
            if epoch % tc.eval_every == 0 or epoch == tc.epochs:
                valid = self.evaluator(model, data, "valid")
                record["valid"] = valid
                value = valid.get(self.select)
                if value is None:
                    raise MMRecError(f"selection metric '{self.select}' not among {sorted(valid)}")
                if value > selection["best"]:
                    selection.update(best=value, best_epoch=epoch, bad_evals=0, valid=valid)
                    save_weights(model, self.run_dir)
                else:
                    selection["bad_evals"] += 1
            record["seconds"] = time.perf_counter() - e0
            result.history.append(record)
            self._log(record)
            save_state(self.run_dir, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                       rng=rng, selection=selection, history=result.history)
            self._saved_epoch = epoch
            result.train_seconds += record["seconds"]

        result.epochs = epoch
        result.best_epoch = selection["best_epoch"]
        result.valid = selection["valid"]
        if selection["best_epoch"] == 0:  # never evaluated (e.g. epochs < eval_every)
            save_weights(model, self.run_dir)
        load_weights(model, self.run_dir)
        return result

    def _train_epoch(self, model: Recommender, data: Dataset, optimizer: torch.optim.Optimizer,
                     rng: np.random.Generator, epoch: int,
                     step_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> tuple[float, int]:
        """One epoch; returns the mean finite loss and the number of non-finite batches skipped."""
        tc = self.cfg.train
        model.train()
        device = model.device
        total, n, skipped = 0.0, 0, 0
        bar = progress_bar(model.training_batches(data, tc.batch_size, rng), desc=f"epoch {epoch}",
                           leave=False, enabled=tc.progress, unit="batch")
        for batch in bar:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            model.on_batch(batch)
            loss = model.loss(batch)
            aux = model.auxiliary_loss()
            if aux is not None:
                loss = loss + aux
            if not torch.isfinite(loss):
                self._nonfinite(f"loss became {loss.item()}", epoch, n + skipped + 1)
                skipped += 1  # skip: no backward, no optimiser (or scheduler) step for this batch
                continue
            loss.backward()
            norm = grad_norm(model.parameters(), tc.grad_clip)
            if not torch.isfinite(norm):  # a finite loss can still give inf / NaN gradients (overflow in backward)
                self._nonfinite(f"gradient became non-finite (norm {norm.item()}; the loss was finite, "
                                f"{loss.item():.6g})", epoch, n + skipped + 1)
                skipped += 1  # skip: no optimiser (or scheduler) step; zero_grad drops the gradient
                continue
            self._bad_in_row = 0
            optimizer.step()
            if step_scheduler is not None:
                step_scheduler.step()
            total += float(loss.detach())
            n += 1
            bar.set_postfix(loss=f"{total / n:.4f}")
        model.eval()
        return total / max(n, 1), skipped

    def _nonfinite(self, what: str, epoch: int, batch: int) -> None:
        """``train.nan_policy``: raise (stop, or too many in a row), else return and the batch is skipped."""
        tc = self.cfg.train
        self._bad_in_row += 1
        if tc.nan_policy == "stop" or self._bad_in_row > tc.max_nonfinite_in_row:
            why = "" if tc.nan_policy == "stop" else \
                f" in {self._bad_in_row} batches in a row (train.max_nonfinite_in_row={tc.max_nonfinite_in_row})"
            raise MMRecError(f"{what} at epoch {epoch}, batch {batch}{why}; "
                             f"{self._kept()}; lower the learning rate (train.lr={tc.lr}) or check the "
                             f"input features (train.nan_policy=skip skips such batches)")

    def _kept(self) -> str:
        """What a stopped run leaves behind, so the user knows what to resume or evaluate."""
        best = self._selection.get("best_epoch", 0)
        parts = [f"{self.run_dir / 'checkpoint.pt'} holds the state after epoch {self._saved_epoch} "
                 f"(--resume continues from it)" if self._saved_epoch else "no epoch finished, so no checkpoint"]
        parts.append(f"{self.run_dir / 'best.safetensors'} holds the best weights (epoch {best})" if best
                     else "no best weights yet")
        return "; ".join(parts)

    def _rewrite_log(self, history: list[dict[str, Any]]) -> None:
        """log.jsonl = the checkpoint's history, so a resumed run's log has each epoch once."""
        with atomic_path(self.run_dir / "log.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in history))

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if log_lines(self.cfg.train.progress):  # no bar off a terminal: one plain line per epoch instead
            log(self._epoch_line(record))

    def _epoch_line(self, record: dict[str, Any]) -> str:
        """``epoch 3/20  loss 0.4123  valid Recall@20 0.1234  1.2 s`` (fields the record has)."""
        parts = [f"epoch {record['epoch']}/{self.cfg.train.epochs}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if record.get("valid") and self.select in record["valid"]:
            parts.append(f"valid {self.select} {record['valid'][self.select]:.4f}")
        if "seconds" in record:
            parts.append(f"{record['seconds']:.1f} s")
        return "  ".join(parts)
