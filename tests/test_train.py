"""The train / evaluate skeleton: selection on valid, checkpoints, resume, metrics.json."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.cli import main
from mmrec.train.config import RunConfig, TrainSection
from mmrec.train.run import evaluate, train

CONTRACT_KEYS = {"model", "data", "protocol", "split", "metrics", "valid", "best_epoch", "epochs",
                 "train_seconds", "seed"}


def _cfg(data: Path, out: Path, model: str = "bprmf", **kw) -> RunConfig:
    train_kw = dict(epochs=6, batch_size=128, lr=0.05, progress=False, patience=10)
    train_kw.update(kw.pop("train", {}))
    return RunConfig(model=model, data=str(data), out=str(out), train=TrainSection(**train_kw), **kw)


def test_metrics_json_contract_and_bprmf_beats_pop(planted_dir: Path, tmp_path: Path):
    pop = train(_cfg(planted_dir, tmp_path / "pop", model="pop"))
    mf = train(_cfg(planted_dir, tmp_path / "mf", model_args={"dim": 16}))
    saved = json.loads((tmp_path / "mf" / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(saved)
    assert saved["metrics"] == mf["metrics"]
    assert {"Recall@20", "NDCG@20", "Precision@20", "MAP@20"} <= set(saved["metrics"])
    assert 1 <= saved["best_epoch"] <= saved["epochs"] == 6
    # planted clusters: an ID model must learn them, popularity cannot
    assert mf["metrics"]["Recall@20"] > pop["metrics"]["Recall@20"] + 0.1
    assert (tmp_path / "mf" / "best.safetensors").exists() and (tmp_path / "mf" / "curves.png").exists()


def test_selection_uses_only_validation(planted_dir: Path, tmp_path: Path, monkeypatch):
    import mmrec.train.run as run_mod
    seen: list[str] = []
    real = run_mod.run_protocol

    def spy(model, data, protocol, split, **kw):
        seen.append(split)
        return real(model, data, protocol=protocol, split=split, **kw)

    monkeypatch.setattr(run_mod, "run_protocol", spy)
    train(_cfg(planted_dir, tmp_path / "r", train={"epochs": 3}))
    assert seen[:-1] == ["valid"] * 3 and seen[-1] == "test"


def test_same_seed_same_numbers(planted_dir: Path, tmp_path: Path):
    a = train(_cfg(planted_dir, tmp_path / "a", seed=3))
    b = train(_cfg(planted_dir, tmp_path / "b", seed=3))
    assert a["metrics"] == b["metrics"] and a["valid"] == b["valid"]


@pytest.mark.parametrize("lr_decay,steps", [(1.0, None), (0.5, None), (0.5, 3)])
def test_resume_reaches_the_same_weights(planted_dir: Path, tmp_path: Path, lr_decay: float, steps: int | None):
    from safetensors.torch import load_file
    sched = {"lr_decay": lr_decay, "lr_decay_steps": steps}
    full = _cfg(planted_dir, tmp_path / "full", train={"epochs": 4, **sched})
    train(full)
    part = _cfg(planted_dir, tmp_path / "part", train={"epochs": 2, **sched})
    train(part)
    resumed = _cfg(planted_dir, tmp_path / "part", resume=True, train={"epochs": 4, **sched})
    m = train(resumed)
    assert m["epochs"] == 4
    state_full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    state_res = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["model"]
    for k in state_full:
        assert torch.equal(state_full[k], state_res[k]), k
    assert load_file(tmp_path / "full" / "best.safetensors").keys() == load_file(tmp_path / "part" / "best.safetensors").keys()


def test_lr_decay_per_steps_is_a_staircase_over_optimiser_steps(planted_dir: Path, tmp_path: Path):
    # the CIGF/MB-GMN code decays every decay_step optimiser steps, whatever an epoch's length
    train(_cfg(planted_dir, tmp_path / "r", train={"epochs": 2, "lr_decay": 0.5, "lr_decay_steps": 3}))
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    steps = state["scheduler"]["last_epoch"]
    assert steps > 2 * 3  # stepped once per batch (several per epoch), not once per epoch
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.5 ** (steps // 3))
    with pytest.raises(Exception, match="lr_decay_steps"):
        train(_cfg(planted_dir, tmp_path / "bad", train={"lr_decay_steps": 0}))


def test_early_stopping_stops(planted_dir: Path, tmp_path: Path):
    # lr 0 never improves after the first evaluation: patience 2 -> stops after epoch 3
    m = train(_cfg(planted_dir, tmp_path / "r", train={"epochs": 20, "lr": 0.0, "patience": 2}))
    assert m["epochs"] == 3 and m["best_epoch"] == 1


def test_evaluate_reproduces_and_switches_protocol(planted_dir: Path, tmp_path: Path):
    m = train(_cfg(planted_dir, tmp_path / "r"))
    again = evaluate(tmp_path / "r")
    assert again["metrics"] == pytest.approx(m["metrics"])
    sampled = evaluate(tmp_path / "r", protocol="sampled")
    assert sampled["protocol"] == "sampled" and "HR@10" in sampled["metrics"]
    assert sampled["best_epoch"] == m["best_epoch"]  # training facts kept


def test_cli_train_and_describe(planted_dir: Path, tmp_path: Path, capsys):
    rc = main(["train", "--data", str(planted_dir), "--model", "bprmf", "--out", str(tmp_path / "r"),
               "--epochs", "2", "--set", "model.dim=8", "--set", "train.progress=false", "--protocol", "sampled"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "HR@10" in out and "bprmf" in out
    rc = main(["data", "describe", str(planted_dir), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and info["n_users"] == 80 and info["interactions"]["buy"] > 0
    assert isinstance(info["n_items"], int)


def test_cli_reports_errors_without_traceback(tmp_path: Path, capsys):
    rc = main(["train", "--data", str(tmp_path / "nope"), "--model", "bprmf", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_unknown_model_is_clear(planted_dir: Path, tmp_path: Path, capsys):
    rc = main(["train", "--data", str(planted_dir), "--model", "nosuch", "--out", str(tmp_path / "r")])
    assert rc == 2 and "unknown model 'nosuch'" in capsys.readouterr().err


def test_cli_describe_json_on_synthetic_and_pickles(tmp_path: Path, capsys):
    import pickle

    import scipy.sparse as sp
    assert main(["data", "describe", "synthetic:tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["n_users"], int) and set(info["interactions"]) == {"view", "cart", "buy"}
    for name, rows in {"train_mat_view.pkl": [(0, 0), (1, 1), (1, 2)], "train_mat_buy.pkl": [(0, 0)],
                       "test_mat.pkl": [(1, 0)]}.items():
        m = sp.csr_matrix((np.ones(len(rows)), tuple(zip(*rows))), shape=(2, 3))
        (tmp_path / name).write_bytes(pickle.dumps(m))
    assert main(["data", "describe", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_users"] == 2 and info["n_items"] == 3
    assert info["interactions"] == {"view": 3, "buy": 1}
    assert info["held_out"] == {"test": {"buy": 1}}


def test_items_without_interactions_and_no_cold_test_rows(planted_dir: Path, tmp_path: Path):
    # items.tsv lists items nobody touched: they are cold, but none is held out -> no cold block, no crash
    (planted_dir / "items.tsv").write_text("item\ttitle\n" + "".join(f"x{i}\tnew thing {i}\n" for i in range(3)))
    m = train(_cfg(planted_dir, tmp_path / "r", train={"epochs": 1}))
    assert "cold_start" not in m and m["n_items"] == 48 + 3
