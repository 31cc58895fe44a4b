"""train.nan_policy: a batch with a NaN / inf loss stops the run (keeping what was saved) or is skipped."""

from __future__ import annotations

import json
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
