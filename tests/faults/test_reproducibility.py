"""Same seed and config -> the same metrics.json on CPU, to the last bit (timing keys aside).

And a different seed gives different numbers, so the comparison can fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmrec.train.config import build_run_config
from mmrec.train.run import train


def _without_timing(obj: Any) -> Any:
    """Drop wall-clock keys (``train_seconds``, ``seconds``, ...) at any depth."""
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _run(out: Path, model: str, seed: int) -> dict[str, Any]:
    cfg = build_run_config(None, {"model": model, "data": "synthetic:tiny", "out": str(out), "epochs": 3,
                                  "seed": seed, "device": "cpu"}, [])
    train(cfg)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("model", ["bprmf", "lightgcn"])
def test_same_seed_same_metrics_json(tmp_path, model):
    a = _run(tmp_path / "a", model, seed=0)
    b = _run(tmp_path / "b", model, seed=0)
    assert "train_seconds" in a and a["epochs"] == 3
    assert _without_timing(a) == _without_timing(b)  # exact: floats compared bit for bit
    logs = [[_without_timing(json.loads(line)) for line in (d / "log.jsonl").read_text().splitlines()]
            for d in (tmp_path / "a", tmp_path / "b")]
    assert logs[0] == logs[1] and len(logs[0]) >= 3  # every epoch's loss and validation, too
    c = _run(tmp_path / "c", model, seed=1)
    assert _without_timing(c)["metrics"] != _without_timing(a)["metrics"]
