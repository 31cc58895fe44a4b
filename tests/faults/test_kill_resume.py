"""kill -9 in the middle of `mmrec train` (also `--head mmoe`) and `mmrec pretrain`, then `--resume`:
the same best weights and metrics.json; kill -9 in `mmrec extract`, then a rerun: the same file.

And a process killed while writing through :func:`mmrec.io.atomic_path` never leaves a
partial file under the real name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from mmrec.train.checkpoint import load_state

EPOCHS, KILL_AFTER = 5, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _without_timing(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if "seconds" not in k and "per_second" not in k}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _cmd(model: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmrec.cli", "train", "--model", model, "--data", "synthetic:tiny",
            "--epochs", str(EPOCHS), "--batch-size", "64", "--device", "cpu", "--out", str(out),
            "--set", "train.progress=false", "--set", "train.patience=100", *extra]


def _epochs_logged(out: Path) -> int:
    try:
        return len((out / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # three mmrec processes per model: about 25 s each on one core
@pytest.mark.parametrize("model", ["lightgcn", "vbpr"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, model):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run(_cmd(model, whole))

    proc = subprocess.Popen(_cmd(model, broken), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # epoch k is logged just before its checkpoint is written: wait for the checkpoint too
        while proc.poll() is None and not (_epochs_logged(broken) >= KILL_AFTER
                                           and (broken / "checkpoint.pt").exists()
                                           and load_state(broken)["epoch"] >= KILL_AFTER):
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_state(broken)["epoch"]
    assert KILL_AFTER <= killed_at < EPOCHS and not (broken / "metrics.json").exists()

    _run(_cmd(model, broken, "--resume"))
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert a["epochs"] == b["epochs"] == EPOCHS
    keep = lambda m: {k: v for k, v in _without_timing(m).items() if k not in ("out", "run_dir")}  # noqa: E731
    assert keep(a) == keep(b)  # every metric, bit for bit
    logs = [[_without_timing(json.loads(x)) for x in (d / "log.jsonl").read_text().splitlines()]
            for d in (whole, broken)]
    assert logs[0] == logs[1] and len(logs[0]) == EPOCHS  # each epoch once, with the same numbers
    wa, wb = load_file(str(whole / "best.safetensors")), load_file(str(broken / "best.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


WRITER = textwrap.dedent("""
    import sys
    from mmrec.io import atomic_path
    target, size = sys.argv[1], int(sys.argv[2])
    i = 0
    while True:
        i += 1
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                for _ in range(size // (1 << 20)):
                    f.write(bytes([i % 256]) * (1 << 20))
        print(i, flush=True)
""")


def test_sigkill_during_atomic_write_leaves_a_whole_old_file(tmp_path):
    target, size = tmp_path / "big.bin", 32 << 20
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for delay in (0.05, 0.2, 0.45, 0.8, 1.3):
        proc = subprocess.Popen([sys.executable, str(script), str(target), str(size)], env=ENV,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # one whole version exists
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        data = target.read_bytes()
        assert len(data) == size and data.count(data[:1]) == size  # one complete version, never a mix
    # kill -9 cannot run cleanup: the interrupted temporary files stay beside the target (hidden)
    assert all(p.name.startswith(".big.bin.") and p.name.endswith(".tmp")
               for p in tmp_path.iterdir() if p.name not in ("big.bin", "writer.py"))


def test_resume_drops_the_log_line_of_an_epoch_killed_before_its_checkpoint(tmp_path):
    """A kill between an epoch's log line and its checkpoint: resume reruns that epoch, logged once."""
    from mmrec.train.config import build_run_config
    from mmrec.train.run import train

    def cfg(out: Path, epochs: int, resume: bool = False):
        return build_run_config(None, {"model": "bprmf", "data": "synthetic:tiny", "out": str(out), "epochs": epochs,
                                       "device": "cpu", "resume": resume}, ["train.progress=false"])

    train(cfg(tmp_path / "whole", 3))
    train(cfg(tmp_path / "part", 2))
    with open(tmp_path / "part" / "log.jsonl", "a") as f:  # epoch 3 logged, then killed before its checkpoint
        f.write(json.dumps({"epoch": 3, "loss": 0.5}) + "\n")
    train(cfg(tmp_path / "part", 3, resume=True))
    logs = [[_without_timing(json.loads(x)) for x in (d / "log.jsonl").read_text().splitlines()]
            for d in (tmp_path / "whole", tmp_path / "part")]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3] and logs[0] == logs[1]


# -- the other long-running commands: pretrain, extract, train --head ---------------------------------
def _kill_when(cmd: list[str], ready, what: str) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds (polled), and check it died of the kill."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not ready():
            time.sleep(0.01)
        assert proc.poll() is None, f"the {what} finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _checkpoint_field(path: Path, key: str, default: Any = -1) -> Any:
    """A field of a checkpoint being polled; a file still being renamed into place reads as absent."""
    from mmrec.train.checkpoint import safe_torch_load
    try:
        return safe_torch_load(path).get(key, default)
    except Exception:  # noqa: BLE001 - missing, or replaced between exists() and the read
        return default


def _same_metrics(a: Path, b: Path) -> None:
    keep = lambda m: {k: v for k, v in _without_timing(m).items() if k not in ("out", "run_dir")}  # noqa: E731
    assert keep(json.loads((a / "metrics.json").read_text())) == keep(json.loads((b / "metrics.json").read_text()))


def _same_tensors(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


# tiny random-init text + audio encoders (tests/test_pretrain.py); 200 items / 40 = 5 steps per epoch
PRETRAIN_SETS = ["text={name: bert, pretrained: null, args: {tokenizer: all-MiniLM-L6-v2, max_length: 48, "
                 "config: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}}",
                 "audio.args={channels: [8, 16], n_mels: 16}", "modalities=[text,audio]", "loader.batch_size=40",
                 "train.warmup_steps=2", "train.lr=0.003", "train.checkpoint_every=5"]
PRETRAIN_EPOCHS, STEPS_PER_EPOCH = 3, 5


def _pretrain_cmd(out: Path, *extra: str) -> list[str]:
    sets = [x for s in PRETRAIN_SETS for x in ("--set", s)]
    return [sys.executable, "-m", "mmrec.cli", "pretrain", "--data", "synthetic:tiny", "--out", str(out),
            "--device", "cpu", "--epochs", str(PRETRAIN_EPOCHS), "--no-progress", *sets, *extra]


@pytest.mark.slow  # three pre-training processes
def test_sigkill_during_pretrain_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run(_pretrain_cmd(whole))
    ckpt = broken / "checkpoint.pt"
    _kill_when(_pretrain_cmd(broken), lambda: ckpt.exists() and _checkpoint_field(ckpt, "step") >= STEPS_PER_EPOCH,
               "pre-training")
    killed_at = _checkpoint_field(ckpt, "step")
    assert STEPS_PER_EPOCH <= killed_at < PRETRAIN_EPOCHS * STEPS_PER_EPOCH
    assert not (broken / "metrics.json").exists() and not (broken / "encoders.safetensors").exists()

    _run(_pretrain_cmd(broken, "--resume"))
    _same_tensors(whole / "encoders.safetensors", broken / "encoders.safetensors")  # bit for bit
    _same_metrics(whole, broken)
    logs = [[_without_timing(json.loads(x)) for x in (d / "log.jsonl").read_text().splitlines()]
            for d in (whole, broken)]
    assert logs[0] == logs[1] and len(logs[0]) == PRETRAIN_EPOCHS * STEPS_PER_EPOCH  # each step once


def _extract_cmd(run: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mmrec.cli", "extract", "--run", str(run), "--data", "synthetic:tiny",
            "--out", str(out), "--device", "cpu", "--modalities", "text,audio", "--batch-size", "8",
            "--chunk-size", "8", "--no-progress"]


@pytest.mark.slow  # three extraction processes
def test_sigkill_during_extract_then_rerun_equals_an_uninterrupted_extraction(tmp_path):
    from mmrec.pretrain.artifacts import save_encoders
    from mmrec.pretrain.extract import partial_dir
    from tests.test_extract import same_file, tiny_encoders

    run = tmp_path / "run"
    save_encoders(run, {m: e for m, e in tiny_encoders(embed_dim=8).items() if m != "image"})
    whole, broken = tmp_path / "whole.safetensors", tmp_path / "broken.safetensors"
    _run(_extract_cmd(run, whole))
    assert not partial_dir(whole).exists()

    partial = partial_dir(broken)
    _kill_when(_extract_cmd(run, broken), lambda: len(list(partial.glob("chunk-*.safetensors"))) >= 3, "extraction")
    done = sorted(partial.glob("chunk-*.safetensors"))
    assert 3 <= len(done) < 25  # 200 items / 8: mid-way
    assert not broken.exists()  # nothing under the real name until every chunk is done
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".safetensors" and p.name != whole.name]

    r = subprocess.run(_extract_cmd(run, broken), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(done)} of 25 chunks reused" in r.stdout, r.stdout  # the finished chunks are not redone
    assert same_file(whole, broken) and not partial.exists()


HEAD_EPOCHS, BACKBONE_EPOCHS = 6, 4


def _head_cmd(out: Path, *extra: str) -> list[str]:
    sets = ["train.progress=false", "train.lr=0.01", "train.eval_every=1", "train.patience=100",
            f"head_args.backbone_epochs={BACKBONE_EPOCHS}", "model.dim=32", "model.layers=2", "head_args.n_experts=3",
            "head_args.expert_dims=[32]", "head_args.tower_dims=[16]"]
    return [sys.executable, "-m", "mmrec.cli", "train", "--model", "lightgcn-mb", "--head", "mmoe",
            "--data", "synthetic:tiny", "--epochs", str(HEAD_EPOCHS), "--device", "cpu", "--out", str(out),
            *[x for s in sets for x in ("--set", s)], *extra]


@pytest.mark.slow  # three head-training processes per phase
@pytest.mark.parametrize("phase", ["backbone", "head"])
def test_sigkill_during_head_training_then_resume_equals_an_uninterrupted_run(tmp_path, phase):
    """Two-step ``--head mmoe``: killed while the backbone trains (RUN/backbone/) or while the head does."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run(_head_cmd(whole))
    where = broken / "backbone" if phase == "backbone" else broken
    _kill_when(_head_cmd(broken), lambda: (where / "checkpoint.pt").exists() and load_state(where)["epoch"] >= 1,
               f"{phase} training")
    killed_at = load_state(where)["epoch"]
    assert 1 <= killed_at < (BACKBONE_EPOCHS if phase == "backbone" else HEAD_EPOCHS)
    assert not (broken / "metrics.json").exists()
    if phase == "backbone":
        assert not (broken / "checkpoint.pt").exists()  # the head had not started

    _run(_head_cmd(broken, "--resume"))
    _same_metrics(whole, broken)
    for sub in ("", "backbone"):
        logs = [[_without_timing(json.loads(x)) for x in (d / sub / "log.jsonl").read_text().splitlines()]
                for d in (whole, broken)]
        assert logs[0] == logs[1] and len(logs[0]) == (BACKBONE_EPOCHS if sub else HEAD_EPOCHS)
    _same_tensors(whole / "best.safetensors", broken / "best.safetensors")
