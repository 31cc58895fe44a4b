"""train.nan_policy: a batch with a NaN / inf loss stops the run (keeping what was saved) or is skipped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmrec.errors import ConfigError, MMRecError
from mmrec.graph.baselines import BPRMF
from mmrec.train.checkpoint import load_state
from mmrec.train.config import build_run_config
from mmrec.train.run import train

BATCH = 128


def _cfg(out: Path, epochs: int = 3, sets: tuple[str, ...] = ()):
    return build_run_config(None, {"model": "bprmf", "data": "synthetic:tiny", "out": str(out), "epochs": epochs,
                                   "batch_size": BATCH, "device": "cpu"}, ["train.progress=false", *sets])


@pytest.fixture
def poison(monkeypatch):
    """Make BPR-MF's loss NaN on the given (1-based) calls; returns the call counter."""
    state = {"calls": 0, "bad": set()}
    original = BPRMF.loss

    def loss(self, batch):
        state["calls"] += 1
        value = original(self, batch)
        return value * float("nan") if state["calls"] in state["bad"] else value

    monkeypatch.setattr(BPRMF, "loss", loss)
    return state


@pytest.fixture
def per_epoch(tmp_path, poison) -> int:
    """Batches in one epoch of the test runs."""
    train(_cfg(tmp_path / "count", epochs=1))
    n, poison["calls"] = poison["calls"], 0
    assert n >= 3
    return n


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_stop_keeps_the_last_checkpoint_and_best_weights_and_says_which(tmp_path, poison, per_epoch):
    out = tmp_path / "run"
    poison["bad"] = {2 * per_epoch + 2}  # second batch of epoch 3
    with pytest.raises(MMRecError) as e:
        train(_cfg(out))
    msg = str(e.value)
    assert "loss became nan at epoch 3, batch 2" in msg
    assert "state after epoch 2" in msg and "--resume" in msg
    best = max(_log(out), key=lambda r: r["valid"]["Recall@20"])["epoch"]
    assert f"best weights (epoch {best})" in msg
    assert load_state(out)["epoch"] == 2  # the checkpoint of the last finished epoch is intact
    weights = load_file(str(out / "best.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["epoch"] for r in _log(out)] == [1, 2]


def test_stop_in_the_first_epoch_says_nothing_was_saved(tmp_path, poison, per_epoch):
    poison["bad"] = {1}
    with pytest.raises(MMRecError, match="no epoch finished, so no checkpoint; no best weights yet"):
        train(_cfg(tmp_path / "run"))


def test_skip_counts_skipped_batches_and_finishes(tmp_path, poison, per_epoch):
    out = tmp_path / "run"
    poison["bad"] = {per_epoch + 1, per_epoch + 3}  # two batches of epoch 2
    result = train(_cfg(out, sets=("train.nan_policy=skip",)))
    assert [r["skipped_batches"] for r in _log(out)] == [0, 2, 0]
    assert result["epochs"] == 3
    weights = load_file(str(out / "best.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_skip_gives_up_after_too_many_in_a_row(tmp_path, poison, per_epoch):
    poison["bad"] = {per_epoch + 1, per_epoch + 2, per_epoch + 3}
    with pytest.raises(MMRecError, match="in 3 batches in a row .*max_nonfinite_in_row=2.*state after epoch 1"):
        train(_cfg(tmp_path / "run", sets=("train.nan_policy=skip", "train.max_nonfinite_in_row=2")))


def test_skip_allows_exactly_the_limit(tmp_path, poison, per_epoch):
    poison["bad"] = {per_epoch + 1, per_epoch + 2}
    out = tmp_path / "run"
    train(_cfg(out, sets=("train.nan_policy=skip", "train.max_nonfinite_in_row=2")))
    assert [r["skipped_batches"] for r in _log(out)] == [0, 2, 0]


@pytest.mark.parametrize("bad", ["train.nan_policy=ignore", "train.max_nonfinite_in_row=-1"])
def test_bad_nan_policy_config(tmp_path, bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        _cfg(tmp_path / "run", sets=(bad,))


# -- a finite loss whose gradient is not finite ---------------------------------------------------
class _NanGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN / inf backward: an overflow inside backward."""

    @staticmethod
    def forward(ctx, x, fill):
        ctx.fill = fill
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.fill, None


@pytest.fixture
def poison_grad(monkeypatch, per_epoch):
    """Make BPR-MF's gradient NaN (``fill``) on the given (1-based) calls while its loss stays finite.

    It wraps the loss after ``per_epoch`` has counted the batches, so its calls start at 0 as well."""
    state = {"calls": 0, "bad": set(), "fill": float("nan"), "losses": []}
    original = BPRMF.loss

    def loss(self, batch):
        state["calls"] += 1
        value = original(self, batch)
        state["losses"].append(float(value.detach()))
        return _NanGrad.apply(value, state["fill"]) if state["calls"] in state["bad"] else value

    monkeypatch.setattr(BPRMF, "loss", loss)
    return state


@pytest.mark.parametrize("fill,clip", [(float("nan"), None), (float("inf"), None), (float("nan"), "1.0")])
def test_stop_on_a_nonfinite_gradient_with_a_finite_loss(tmp_path, poison_grad, per_epoch, fill, clip):
    out = tmp_path / "run"
    poison_grad.update(bad={per_epoch + 3}, fill=fill)  # third batch of epoch 2
    sets = (f"train.grad_clip={clip}",) if clip else ()
    with pytest.raises(MMRecError) as e:
        train(_cfg(out, sets=sets))
    msg = str(e.value)
    assert "gradient became non-finite" in msg and "the loss was finite" in msg
    assert "at epoch 2, batch 3" in msg and "state after epoch 1" in msg
    assert all(math.isfinite(v) for v in poison_grad["losses"])  # the loss check alone would not have fired
    assert load_state(out)["epoch"] == 1
    weights = load_file(str(out / "best.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_skip_a_nonfinite_gradient_leaves_the_weights_finite(tmp_path, poison_grad, per_epoch):
    out = tmp_path / "run"
    poison_grad["bad"] = {2, per_epoch + 1, per_epoch + 2}
    train(_cfg(out, sets=("train.nan_policy=skip", "train.max_nonfinite_in_row=2")))
    assert [r["skipped_batches"] for r in _log(out)] == [1, 2, 0]
    weights = load_file(str(out / "best.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())  # no NaN gradient reached Adam


def test_nonfinite_losses_and_gradients_count_together_in_a_row(tmp_path, poison, poison_grad, per_epoch):
    # a NaN loss then a NaN gradient then a NaN loss: three in a row, one more than allowed
    poison["bad"] = {per_epoch + 1, per_epoch + 3}
    poison_grad["bad"] = {per_epoch + 2}
    with pytest.raises(MMRecError, match="loss became nan at epoch 2, batch 3 in 3 batches in a row"):
        train(_cfg(tmp_path / "run", sets=("train.nan_policy=skip", "train.max_nonfinite_in_row=2")))


# -- pre-training: the same policy per optimizer step ---------------------------------------------
#: a 1-layer random-init BERT on MiniLM's tokenizer (as tests/test_pretrain.py): text only, CPU, seconds
PRETRAIN_SETS = ["modalities=[text]", "train.epochs=2", "loader.batch_size=40", "train.checkpoint_every=2",
                 "train.warmup_steps=1",
                 "text={name: bert, pretrained: null, args: {tokenizer: all-MiniLM-L6-v2, max_length: 32, "
                 "config: {hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}}"]


@pytest.fixture(scope="module")
def tiny():
    from mmrec.datasets.loading import load_dataset
    return load_dataset("synthetic:tiny")


@pytest.fixture
def poison_pretrain(monkeypatch):
    """AlignmentModel's loss made NaN (``loss``) or given a NaN gradient (``grad``) on chosen 1-based calls."""
    from mmrec.pretrain.trainer import AlignmentModel
    state = {"calls": 0, "loss": set(), "grad": set()}
    original = AlignmentModel.forward

    def forward(self, batch):
        state["calls"] += 1
        loss, terms = original(self, batch)
        if state["calls"] in state["loss"]:
            loss = loss * float("nan")
        if state["calls"] in state["grad"]:
            loss = _NanGrad.apply(loss, float("nan"))
        return loss, terms

    monkeypatch.setattr(AlignmentModel, "forward", forward)
    return state


def _pretrain(out: Path, tiny, *sets: str):
    from mmrec.pretrain.config import build_pretrain_config
    from mmrec.pretrain.run import pretrain
    cfg = build_pretrain_config(None, {"out": str(out), "data": "synthetic:tiny", "train.progress": False},
                                [*PRETRAIN_SETS, *sets])
    return pretrain(cfg, data=tiny)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_pretrain_stops_on_a_nonfinite_loss_or_gradient(tmp_path, tiny, poison_pretrain, kind):
    out = tmp_path / "run"
    poison_pretrain[kind] = {3}  # step 3 (5 batches an epoch, one batch a step)
    with pytest.raises(MMRecError) as e:
        _pretrain(out, tiny)
    msg = str(e.value)
    what = "loss became nan" if kind == "loss" else "gradient became non-finite (norm nan; the loss was finite)"
    assert f"{what} at step 3 (epoch 1, batch 3)" in msg
    assert "checkpoint.pt holds the state after step 2" in msg and "train.nan_policy=skip" in msg
    state = load_state_pretrain(out)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                      if torch.is_floating_point(v))


def test_pretrain_skip_counts_steps_and_finishes_finite(tmp_path, tiny, poison_pretrain):
    out = tmp_path / "run"
    poison_pretrain.update(loss={2}, grad={6, 7})
    result = _pretrain(out, tiny, "train.nan_policy=skip", "train.max_nonfinite_in_row=2")
    assert result["steps"] == 10
    log = _log(out)
    assert [r["step"] for r in log] == [1, 3, 4, 5, 8, 9, 10]  # no line for a skipped step
    assert [r["skipped_steps"] for r in log] == [0, 1, 1, 1, 3, 3, 3]
    assert all(math.isfinite(r["loss"]) for r in log)
    from safetensors.torch import load_file as load
    assert all(torch.isfinite(w).all() for w in load(str(out / "encoders.safetensors")).values())


def test_pretrain_skip_gives_up_after_too_many_in_a_row(tmp_path, tiny, poison_pretrain):
    poison_pretrain["grad"] = {2, 3, 4}
    with pytest.raises(MMRecError, match=r"at step 4 \(epoch 1, batch 4\) in 3 steps in a row "
                                         r"\(train.max_nonfinite_in_row=2\); no checkpoint was written yet"):
        _pretrain(tmp_path / "run", tiny, "train.nan_policy=skip", "train.max_nonfinite_in_row=2",
                  "train.checkpoint_every=0")


@pytest.mark.parametrize("bad", ["train.nan_policy=ignore", "train.max_nonfinite_in_row=-1"])
def test_bad_pretrain_nan_policy_config(tmp_path, bad):
    from mmrec.pretrain.config import build_pretrain_config
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        build_pretrain_config(None, {"out": str(tmp_path / "r"), "data": "synthetic:tiny"}, [bad])


def load_state_pretrain(out: Path) -> dict:
    from mmrec.train.checkpoint import safe_torch_load
    return safe_torch_load(out / "checkpoint.pt")


def test_head_training_shares_the_policy(tmp_path, monkeypatch):
    """`train --head` trains its head with the same Trainer: a NaN gradient of the head's loss stops it too."""
    from mmrec.heads.model import HeadModel
    calls = {"n": 0}
    original = HeadModel.loss

    def loss(self, batch):
        calls["n"] += 1
        value = original(self, batch)
        return _NanGrad.apply(value, float("nan")) if calls["n"] == 2 else value

    monkeypatch.setattr(HeadModel, "loss", loss)
    out = tmp_path / "head"
    cfg = build_run_config(None, {"model": "lightgcn-mb", "head": "mmoe", "data": "synthetic:tiny", "out": str(out),
                                  "epochs": 2, "device": "cpu"},
                           ["train.progress=false", "model.dim=16", "model.layers=1", "head_args.backbone_epochs=1",
                            "head_args.n_experts=2", "head_args.expert_dims=[16]", "head_args.tower_dims=[8]"])
    with pytest.raises(MMRecError, match=r"gradient became non-finite \(norm nan; the loss was finite, .*\) at "
                                         r"epoch 1, batch 2; no epoch finished"):
        train(cfg)
    assert (out / "backbone" / "checkpoint.pt").exists()  # the backbone (its own Trainer) finished first
