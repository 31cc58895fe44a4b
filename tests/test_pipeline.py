"""``mmrec pipeline``: every stage computed once, then reused; a changed key recomputes from its stage on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mmrec.cli import main
from mmrec.config import load_yaml
from mmrec.errors import ConfigError
from mmrec.pipeline import (STAGE_ORDER, data_fingerprint, load_pipeline_config, plan_pipeline, run_pipeline)
from tests.conftest import REPO, shared_data_dir

TINY = REPO / "configs" / "pipelines" / "synthetic-tiny.yaml"
ALL = {s: "computed" for s in STAGE_ORDER}


def tiny_config(out: Path, **changes: Any) -> dict[str, Any]:
    raw = load_yaml(TINY)
    raw["out"] = str(out)
    raw.update(changes)
    return raw


def mtimes(out: Path) -> dict[str, int]:
    """mtime of every file under ``out`` except the summary and fingerprint records and the locks
    (``out/.lock`` records each call's pid: not an output)."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "pipeline.json" and "fingerprints" not in p.parts
            and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """One pipeline directory taken through a sequence of runs; each test checks one step."""
    out = tmp_path_factory.mktemp("pipe") / "out"
    raw = tiny_config(out)
    steps: dict[str, Any] = {"out": out, "raw": raw}

    def step(name: str, cfg: dict[str, Any], overrides: tuple[str, ...] = (), **kw: Any) -> None:
        before = mtimes(out) if out.exists() else {}
        lines: list[str] = []
        result = run_pipeline(cfg, overrides=overrides, log=lines.append, **kw)
        records = {s: json.loads((out / "fingerprints" / f"{s}.json").read_text()) for s in STAGE_ORDER}
        steps[name] = {"result": result, "log": lines, "before": before, "after": mtimes(out), "records": records,
                       "train_config": load_yaml(out / "train" / "config.yaml"),
                       "trained": json.loads((out / "train" / "metrics.json").read_text()),
                       "recs": pd.read_csv(out / "recs.tsv", sep="\t", dtype={"user": str, "item": str})}

    step("first", raw)
    step("second", raw)
    steps["dry"] = {"result": run_pipeline(raw, overrides=["train.train.lr=0.01"], dry_run=True, log=lambda m: None)}
    step("changed", raw, ("train.train.lr=0.01",))
    (out / "evaluate" / "sampled" / "metrics.json").unlink()
    step("missing", raw, ("train.train.lr=0.01",))
    return steps


def test_first_run_computes_every_stage(runs):
    out, first = runs["out"], runs["first"]
    assert first["result"].status() == ALL
    for stage in STAGE_ORDER:
        assert first["records"][stage]["fingerprint"] == first["result"].stage(stage).fingerprint
    assert first["records"]["extract"]["inputs"] == {"pretrain": first["result"].stage("pretrain").fingerprint}
    # the extract stage read the pretrain run; train read the extracted file
    train_cfg = first["train_config"]
    assert train_cfg["features"] == [str(out / "features.safetensors")]
    assert train_cfg["model"] == "vbpr" and train_cfg["fusion"] == "attention"
    assert train_cfg["train"]["epochs"] == 2 and train_cfg["train"]["lr"] == 1e-3  # section over configs/vbpr.yaml
    # evaluate re-scored a copy: the train run keeps its own protocol's numbers
    trained = first["trained"]
    sampled = json.loads((out / "evaluate" / "sampled" / "metrics.json").read_text())
    assert trained["protocol"] == "full" and "Recall@20" in trained["metrics"]
    assert sampled["protocol"] == "sampled" and 0.0 <= sampled["metrics"]["HR@10"] <= 1.0
    assert first["result"].stage("evaluate").summary["metrics"]["sampled"]["HR@10"] >= 0.0
    recs = first["recs"]
    assert recs.groupby("user").size().max() == 10
    assert recs["user"].nunique() == trained["n_users"]


def test_second_run_reuses_every_stage(runs):
    second, first = runs["second"], runs["first"]
    assert second["result"].status() == {s: "reused" for s in STAGE_ORDER}
    fp = first["result"].stage("train").fingerprint
    assert f"stage train: reused (fingerprint {fp[:12]})" in second["log"]
    assert second["after"] == second["before"]  # nothing rewritten


def test_changed_train_key_recomputes_train_and_later_stages(runs):
    changed = runs["changed"]
    assert changed["result"].status() == {"pretrain": "reused", "extract": "reused", "train": "computed",
                                          "evaluate": "computed", "recommend": "computed"}
    assert changed["result"].stage("train").reason == "config, data or inputs changed"
    before, after = changed["before"], changed["after"]
    for name in ("pretrain/encoders.safetensors", "pretrain/metrics.json", "features.safetensors"):
        assert after[name] == before[name]
    for name in ("train/best.safetensors", "evaluate/sampled/metrics.json", "recs.tsv"):
        assert after[name] != before[name]
    assert changed["train_config"]["train"]["lr"] == 0.01
    assert changed["records"]["pretrain"] == runs["first"]["records"]["pretrain"]


def test_dry_run_says_what_would_run_and_runs_nothing(runs):
    dry = runs["dry"]["result"]
    assert dry.status() == {"pretrain": "reused", "extract": "reused", "train": "would compute",
                            "evaluate": "would compute", "recommend": "would compute"}
    # the dry run left the first run's records: the real run after it still recomputed train
    assert runs["changed"]["result"].stage("train").status == "computed"


def test_missing_output_recomputes_that_stage_and_every_later_one(runs):
    missing = runs["missing"]["result"]
    assert missing.status() == {"pretrain": "reused", "extract": "reused", "train": "reused",
                                "evaluate": "computed", "recommend": "computed"}
    assert missing.stage("evaluate").reason.startswith("outputs missing")
    assert missing.stage("recommend").reason == "stage evaluate was recomputed"
    assert (runs["out"] / "evaluate" / "sampled" / "metrics.json").is_file()
    # same run, same seed: the recomputed stages give the same numbers and the same lists
    changed = runs["changed"]
    assert missing.stage("evaluate").summary == changed["result"].stage("evaluate").summary
    pd.testing.assert_frame_equal(runs["missing"]["recs"], changed["recs"])
    summary = json.loads((runs["out"] / "pipeline.json").read_text())  # written by this last run
    assert {s["name"]: s["status"] for s in summary["stages"]} == missing.status()


@pytest.mark.parametrize("change, match", [
    ({"pretrian": {}}, r"unknown key\(s\) 'pretrian'; stages: pretrain, extract, train"),
    ({"train": {"model": "vbpr", "train": {"epoch": 2}}}, r"stage 'train'.*train\.train\.epoch"),
    ({"train": {"model": "vbpr", "dimm": 3}}, r"stage 'train'.*train\.dimm"),
    ({"train": {"model": {"name": "vbpr", "dimm": 3}}}, r"stage 'train'.*model\.dimm"),
    ({"train": {"model": "vbpr", "out": "x"}}, r"'train\.out' is set by the pipeline"),
    ({"pretrain": {"loader": {"batchsize": 3}}}, r"stage 'pretrain'.*pretrain\.loader\.batchsize"),
    ({"extract": {"run": "somewhere"}}, r"'extract\.run' is set by the pipeline"),
    ({"evaluate": ["sampeld"]}, r"'evaluate\.protocols'.*sampeld"),
    ({"recommend": {"kk": 3}}, r"stage 'recommend'.*recommend\.kk"),
    ({"train": {"model": "vbrp"}}, r"stage 'train': unknown model 'vbrp'"),
    ({"train": {"model": "vbpr", "features": ["nope.safetensors"]}}, r"stage 'train' reads nope\.safetensors"),
    ({"train": None}, r"the 'train' stage is required"),
    ({"out": None}, r"'out' is required"),
])
def test_bad_keys_are_errors_naming_the_yaml_key(tmp_path, change, match):
    raw = {**tiny_config(tmp_path / "out"), **change}
    with pytest.raises(ConfigError, match=match):
        run_pipeline(raw, log=lambda m: None)
    assert not (tmp_path / "out").exists()  # refused before any stage ran


def test_overrides_reach_every_stage(tmp_path):
    cfg = load_pipeline_config(tiny_config(tmp_path / "out"), ["train.model.dim=8", "pretrain.train.max_steps=3",
                                                               "recommend.k=4", "evaluate=[full,sampled]"])
    plans = {p.name: p.config for p in plan_pipeline(cfg)}
    assert plans["train"].model == "vbpr" and plans["train"].model_args["dim"] == 8
    assert plans["train"].model_args["content_dim"] == 64  # the rest of configs/vbpr.yaml stays
    assert plans["pretrain"].train.max_steps == 3 and plans["pretrain"].embed_dim == 32
    assert plans["recommend"].k == 4 and plans["evaluate"].protocols == ["full", "sampled"]
    assert plans["extract"].run == plans["pretrain"].out


def test_cli_reports_a_bad_key_with_the_file_name(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(f"data: synthetic:tiny\nout: {tmp_path / 'out'}\ntrain: {{model: bprmf}}\nevaluat: [full]\n")
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'evaluat'" in err


def test_changed_data_file_recomputes_every_stage(planted_dir, tmp_path):
    raw = {"data": str(planted_dir), "out": str(tmp_path / "out"), "device": "cpu",
           "train": {"model": "bprmf", "train": {"epochs": 1, "progress": False}}, "recommend": {"k": 2}}
    quiet = {"log": lambda m: None}
    assert run_pipeline(raw, **quiet).status() == {"train": "computed", "recommend": "computed"}
    assert (tmp_path / "out" / "fingerprints" / "file-hashes.json").is_file()
    assert run_pipeline(raw, **quiet).status() == {"train": "reused", "recommend": "reused"}
    with open(planted_dir / "interactions.tsv", "a") as f:
        f.write("u0\ti47\tview\t99999\n")
    again = run_pipeline(raw, **quiet)
    assert again.status() == {"train": "computed", "recommend": "computed"}
    assert again.stage("train").reason == "config, data or inputs changed"


def test_data_fingerprint_follows_file_content(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "interactions.tsv").write_text("user\titem\nu1\ti1\n")
    (data / ".mmrec-cache").mkdir()
    first = data_fingerprint(str(data))
    (data / ".mmrec-cache" / "x.safetensors").write_text("cache")  # caches are not data
    assert data_fingerprint(str(data)) == first
    cache: dict = {}
    assert data_fingerprint(str(data), cache=cache) == first and len(cache) == 1
    (data / "interactions.tsv").write_text("user\titem\nu1\ti2\n")  # same size, other content
    st = (data / "interactions.tsv").stat()  # a later mtime even where the clock is coarse
    os.utime(data / "interactions.tsv", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert data_fingerprint(str(data)) != first
    assert data_fingerprint(str(data), cache=cache) == data_fingerprint(str(data))  # new mtime: re-read
    stale = {k: {**v, "sha256": "0" * 64} for k, v in cache.items()}
    assert data_fingerprint(str(data), cache=stale)["files"]["interactions.tsv"]["sha256"] == "0" * 64  # trusted
    assert data_fingerprint("synthetic:tiny") == {"spec": "synthetic:tiny"}


@pytest.mark.shared
def test_ml100k_example_plans(monkeypatch):
    """The CPU example's keys resolve (its data exists, its stages are valid); nothing runs."""
    data = shared_data_dir("ml100k-mm")
    cfg = load_pipeline_config(REPO / "configs" / "pipelines" / "ml100k-cpu.yaml", [f"data={data}"])
    plans = plan_pipeline(cfg)
    assert [p.name for p in plans][-3:] == ["train", "evaluate", "recommend"]
