"""``bench/heads.py``: one row per requested head in both tables, shared-bottom as the 1.0 baseline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmrec.errors import ConfigError

BENCH = Path(__file__).resolve().parents[1] / "bench" / "heads.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_heads", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--reps", "1", "--steps", "1", "--batch-size", "64", "--data", "synthetic:tiny", "--dim", "8",
        "--layers", "1", "--threads", "1"]


def test_main_reports_every_requested_head_against_shared_bottom(bench, tmp_path, capsys):
    out = tmp_path / "heads.json"
    result = bench.main(["--heads", "mmoe", "star", *TINY, "--json", str(out)])
    # shared-bottom is added as the baseline, first, with ratio exactly 1
    assert [r["head"] for r in result["heads"]] == ["shared-bottom", "mmoe", "star"]
    base = result["heads"][0]
    assert base["train_x_baseline"] == 1.0 and base["infer_x_baseline"] == 1.0
    for r in result["heads"]:
        assert "error" not in r, r
        assert r["params"] > 0 and r["memory_bytes"] > 0
        assert r["train_samples_per_s"] > 0 and r["infer_samples_per_s"] > 0
        assert r["train_x_baseline"] > 0 and r["infer_x_baseline"] > 0
    assert [r["multi_scenario"] for r in result["heads"]] == [False, False, True]
    bb = result["backbone"]
    assert bb["backbone"] == "lightgcn" and bb["tasks"] == ["click", "convert"] and len(bb["scenarios"]) == 3
    assert [r["head"] for r in bb["rows"]] == ["shared-bottom", "mmoe", "star"]
    for r in bb["rows"]:
        assert r["two-step_x_backbone"] > 0 and r["end2end_x_backbone"] > 0
        # end2end trains the backbone too, two-step only the head: the same head either way
        assert r["two-step_head_params"] == r["end2end_head_params"] > 0
    # the markdown table: a row per head in each table, the baseline's ratios 1.00
    table = capsys.readouterr().out
    assert table.startswith("machine: ")
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert sum(ln.startswith("| shared-bottom | joint-task |") and "| 1.00 |" in ln for ln in lines) == 1
    for head in ("shared-bottom", "mmoe", "star"):
        assert sum(ln.startswith(f"| {head} |") for ln in lines) == 2, (head, table)
    saved = json.loads(out.read_text())
    assert saved["table"] == result["table"] and saved["args"]["heads"] == ["mmoe", "star"]


def test_paired_ratio_is_the_median_of_pairs(bench):
    # pairs (2/1, 3/1, 10/5) -> median 2, whereas the ratio of medians would be 3/1
    assert bench.median_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 5.0]) == pytest.approx(2.0)


def test_unknown_head_is_a_clear_error(bench):
    with pytest.raises(ConfigError, match="unknown head 'mmeo'.*mmoe"):
        bench.main(["--heads", "mmeo", *TINY, "--no-backbone"])
