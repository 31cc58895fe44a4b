"""Held-out item evaluation of `mmrec pretrain`: held-out items never reach the loss, the
permuted-pair control stays near chance while the real pairing does not, keys, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmrec.datasets.loading import load_dataset
from mmrec.errors import ConfigError, DataError
from mmrec.pretrain.config import HeldoutSection, build_pretrain_config
from mmrec.pretrain.heldout import (chance_metrics, permuted_targets, resolve_heldout, restrict_columns,
                                    ridge_baseline, split_items, ItemSplit)
from mmrec.pretrain.data import CooccurrenceSampler
from mmrec.pretrain.run import pretrain
from mmrec.pretrain.trainer import AlignmentModel

from test_pretrain import assert_same_run, tiny_config

#: text only (a 1-layer random-init BERT), the jointly trained ID target: ~1.5 s a run on one core
FAST = ["modalities=[text]", "loader.batch_size=40", "train.lr=0.01", "train.warmup_steps=3",
        "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic:tiny")


# -- the split ------------------------------------------------------------------------------------
def test_split_is_seeded_disjoint_and_complete(tiny):
    sec = HeldoutSection(share=0.25, valid_share=0.2)
    a, b = split_items(tiny, sec, seed=3), split_items(tiny, sec, seed=3)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("fit", "valid", "heldout"))
    assert not np.array_equal(a.heldout, split_items(tiny, sec, seed=4).heldout)
    assert (len(a.heldout), len(a.valid), len(a.fit)) == (50, 30, 120)
    parts = np.concatenate([a.fit, a.valid, a.heldout])
    assert np.array_equal(np.sort(parts), np.arange(tiny.n_items))  # disjoint and complete
    assert split_items(tiny, HeldoutSection(), seed=0) is None       # off: every item trains, as before


def test_heldout_items_by_id_file_and_cold_split(tmp_path, tiny):
    ids = [str(tiny.item_ids[i]) for i in (5, 17, 3)]
    idx, _ = resolve_heldout(ids, tiny, seed=0)
    assert idx.tolist() == [3, 5, 17]
    f = tmp_path / "held.txt"
    f.write_text("# cold items\n" + "\n".join(ids) + "\n")
    split = split_items(tiny, HeldoutSection(items=str(f)), seed=0)
    assert split.heldout.tolist() == [3, 5, 17] and split.source == str(f)
    f.write_text("i5\nnot-an-item\n")
    with pytest.raises(DataError, match="not-an-item") as e:
        resolve_heldout(str(f), tiny, seed=0)
    assert str(f) in str(e.value)
    from mmrec.datasets.splits import apply_split
    cold = apply_split(tiny, "cold", seed=2)
    expect = np.union1d(cold.cold_items, cold.report["cold_valid_items"])
    assert np.array_equal(resolve_heldout("cold", tiny, seed=2)[0], expect) and len(expect) >= 2
    with pytest.raises(ConfigError, match="heldout.items"):
        build_pretrain_config(None, {}, ["heldout.items=[a]", "heldout.share=0.1"])
    with pytest.raises(ConfigError, match="eval.every"):
        build_pretrain_config(None, {}, ["train.patience=2"])
    with pytest.raises(ConfigError, match="control"):
        build_pretrain_config(None, {}, ["control=shuffled"])


def test_permuted_targets_and_restricted_cooccurrence_leave_heldout_rows_alone(tiny):
    split = split_items(tiny, HeldoutSection(share=0.3), seed=0)
    t = permuted_targets(tiny.n_items, split.fit, seed=0)
    assert np.array_equal(np.sort(t[split.fit]), split.fit)          # a permutation among fit items
    assert (t[split.fit] != split.fit).mean() > 0.9
    rest = np.setdiff1d(np.arange(tiny.n_items), split.fit)
    assert np.array_equal(t[rest], rest)
    sampler = CooccurrenceSampler(restrict_columns(tiny.merged_matrix("train"), split.fit))
    pos, ok = sampler.sample(split.fit, seed=0, epoch=0)
    assert ok.mean() > 0.8 and np.isin(pos[ok], split.fit).all()


def test_chance_and_a_ridge_that_recovers_a_linear_map():
    c = chance_metrics(4, [1, 10])
    assert c == pytest.approx({"Recall@1": 0.25, "Recall@10": 1.0, "MRR": (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = x @ torch.randn(6, 5, generator=g)
    split = ItemSplit(fit=np.arange(80), valid=np.arange(80, 100), heldout=np.arange(100, 120))
    m, alpha = ridge_baseline(x, torch.ones(120, dtype=torch.bool), y, split, [0.01, 1e4], [1])
    assert alpha == 0.01 and m["heldout/ridge/Recall@1"] == 1.0      # the exact map, chosen on valid
    noise, _ = ridge_baseline(torch.randn(120, 6, generator=g), torch.ones(120, dtype=torch.bool), y, split,
                              [1.0], [1])
    assert noise["heldout/ridge/MRR"] < 0.5


# -- training ---------------------------------------------------------------------------------------
def test_heldout_and_validation_items_never_reach_the_loss(tmp_path, tiny, monkeypatch):
    """Every batch the loss sees (content rows, the behavior rows they are paired with under the
    permuted control, co-occurrence positives) is recorded: no held-out or validation item may be
    among them. Fails if any one is (e.g. co-occurrence positives drawn from all items)."""
    seen: dict[str, set[int]] = {"content": set(), "behavior": set(), "cooc": set()}
    real = AlignmentModel.forward

    def spy(self, batch):
        seen["content"].update(batch["index"].tolist())
        seen["behavior"].update(batch.get("target", batch["index"]).tolist())
        seen["cooc"].update(batch["cf_pos"][batch["cf_ok"]].tolist())
        return real(self, batch)

    monkeypatch.setattr(AlignmentModel, "forward", spy)
    sets = [*FAST, "heldout.share=0.3", "heldout.valid_share=0.2", "control=permuted", "train.epochs=3",
            "eval.every=1", "train.patience=5"]
    cfg = tiny_config(tmp_path / "run", *sets)
    m = pretrain(cfg, data=tiny)
    split = split_items(tiny, cfg.heldout, cfg.seed, need_valid=True)
    outside = set(split.heldout.tolist()) | set(split.valid.tolist())
    assert len(split.heldout) == 60 and len(split.valid) == 28
    for what, items in seen.items():
        assert not items & outside, (what, sorted(items & outside)[:5])
    fit = set(split.fit.tolist())  # the spy saw training: fit items only, nearly all of them (drop_last)
    assert seen["content"] <= fit and len(seen["content"]) >= 0.9 * len(fit)
    assert seen["cooc"]
    # early stopping watched the validation slice; no evaluation during training ranked held-out items
    assert m["early_stopping"]["metric"] == "valid/MRR"
    assert all(not any(k.startswith("heldout/") for k in e["metrics"]) for e in m["evals"])
    assert all("valid/MRR" in e["metrics"] for e in m["evals"])


def test_permuted_control_is_near_chance_and_the_real_pairing_is_not(tmp_path, tiny):
    """One run with heldout.with_control: the run itself and its permuted-pair control (RUN/control)."""
    out = tmp_path / "run"
    m = pretrain(tiny_config(out, *FAST, "train.epochs=10", "heldout.share=0.5", "heldout.with_control=true"),
                 data=tiny)
    met = m["metrics"]
    for prefix in ("heldout", "heldout/ridge", "heldout/chance", "heldout/control"):
        for k in ("Recall@10", "Recall@50", "MRR"):
            assert f"{prefix}/{k}" in met, (prefix, k)
    assert "heldout/MRR" in m["baseline"]
    assert m["heldout"]["heldout"] == 100 and m["heldout"]["control"] == "none" and m["heldout"]["ridge_alpha"] > 0
    chance = met["heldout/chance/Recall@10"]
    assert chance == pytest.approx(0.1) and met["heldout/chance/MRR"] == pytest.approx(
        sum(1 / r for r in range(1, 101)) / 100)
    # the control: content says nothing about the (permuted) behavior rows it was trained on
    assert met["heldout/control/Recall@10"] <= chance + 0.1, met
    assert met["heldout/control/MRR"] <= met["heldout/chance/MRR"] + 0.05, met
    # the real pairing carries over to items alignment never saw (measured 0.27 vs control 0.10)
    assert met["heldout/Recall@10"] >= chance + 0.1, met
    assert met["heldout/Recall@10"] >= met["heldout/control/Recall@10"] + 0.08, met
    control = json.loads((out / "control" / "metrics.json").read_text())
    assert control["control"] == "permuted"
    assert control["metrics"]["heldout/MRR"] == met["heldout/control/MRR"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == met


def test_heldout_runs_are_deterministic(tmp_path, tiny):
    sets = [*FAST, "train.epochs=2", "heldout.share=0.2", "control=permuted"]
    a = pretrain(tiny_config(tmp_path / "a", *sets), data=tiny)
    b = pretrain(tiny_config(tmp_path / "b", *sets), data=tiny)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert a["metrics"] == b["metrics"] and a["heldout"] == b["heldout"]


def test_early_stopping_stops_and_keeps_the_best_weights(tmp_path, tiny, monkeypatch):
    """Validation MRR scripted to peak at the 2nd evaluation: patience 2 stops after the 4th,
    and the weights saved are those of the 2nd."""
    from mmrec.pretrain import run as run_mod
    real = run_mod.evaluate_retrieval
    script = iter([0.1, 0.3, 0.2, 0.25, 0.9, 0.9])
    snapshots = []

    def scripted(model, *args, heldout=True, **kw):
        out = real(model, *args, heldout=heldout, **kw)
        if not heldout:  # an evaluation during training
            out["valid/MRR"] = next(script)
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return out

    monkeypatch.setattr(run_mod, "evaluate_retrieval", scripted)
    out = tmp_path / "run"
    m = pretrain(tiny_config(out, *FAST, "train.epochs=6", "eval.every=1", "train.patience=2",
                             "heldout.valid_share=0.2"), data=tiny)
    es = m["early_stopping"]
    assert es["stopped"] and es["best_epoch"] == 2 and m["epochs"] == 4 and len(m["evals"]) == 4
    assert m["steps"] == 4 * 4  # 160 fit items / 40 per batch, 4 epochs of 6
    from safetensors.torch import load_file
    saved = load_file(out / "encoders.safetensors")
    best = snapshots[1]
    w = "text.head.proj.weight" if "text.head.proj.weight" in saved else next(k for k in saved if k.startswith("text."))
    key = w[len("text."):]
    assert torch.equal(saved[w], best[f"encoders.text.{key}"])
    assert not torch.equal(saved[w], snapshots[3][f"encoders.text.{key}"])
