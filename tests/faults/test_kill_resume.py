"""kill -9 in the middle of `mmrec train`, then `--resume`: the same best weights and metrics.json.

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
        return {k: _without_timing(v) for k, v in obj.items() if "seconds" not in k}
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
