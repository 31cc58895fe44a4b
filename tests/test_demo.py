"""`make demo`'s job end to end (slow: it pre-trains encoders; run in benchmarks, not the suite)."""

import pytest


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_every_model(tmp_path):
    from mmrec.demo import run_demo
    from mmrec.demo_multimodal import DEMO_CONTENT_MODELS

    report = run_demo(tmp_path, epochs=2)
    expected = {"pop", "behavior-prior", "lightgcn", "cigf"} | {label for label, _, _ in DEMO_CONTENT_MODELS}
    assert expected <= set(report["results"])
    assert (tmp_path / "features.safetensors").exists() and (tmp_path / "pretrain" / "metrics.json").exists()
    assert (tmp_path / "report.md").read_text().count("|") > 10 and (tmp_path / "comparison.png").exists()
