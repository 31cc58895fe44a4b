"""Cold items that rank (issue 13, item 3): aligned content vectors stand in for missing ID rows.

A BPR-MF run on synthetic:tiny's cold split is the alignment target; pre-training with an
identity behavior head and the regression term writes RUN/aligned_items.safetensors; the
``--cold-items aligned:RUN`` option gives each cold item exactly its aligned vector, leaves
warm items alone, and refuses other runs, other data and models it cannot serve.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.cli import main
from mmrec.cold_items import STANDIN_FILE, attach_cold_items, cold_rows
from mmrec.datasets.features import read_feature_tables
from mmrec.errors import ConfigError, DataError, MMRecError
from mmrec.pretrain.retrieval import content_mean, regression_loss
from mmrec.pretrain.run import pretrain
from mmrec.recommend import Recommender
from mmrec.train.config import RunConfig, TrainSection
from mmrec.train.run import evaluate, train

from test_pretrain import tiny_config

DIM = 16
FAST = ["modalities=[text]", "loader.batch_size=40", "train.lr=0.01", "train.warmup_steps=3",
        "train.checkpoint_every=0", f"embed_dim={DIM}", "behavior.head=identity", "loss.regression_weight=1.0",
        "split=cold"]


def _train(out: Path, seed: int = 0, model: str = "bprmf") -> Path:
    train(RunConfig(model=model, data="synthetic:tiny", out=str(out), protocol="full", split="cold", seed=seed,
                    model_args={"dim": DIM}, train=TrainSection(epochs=3, batch_size=256, lr=0.05, progress=False)))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cold")
    behavior = _train(root / "bprmf")
    pre = root / "pre"
    pretrain(tiny_config(pre, *FAST, "train.epochs=3", f"behavior.run={behavior}", "heldout.items=cold"))
    return {"behavior": behavior, "pretrain": pre, "root": root}


# -- the loss ---------------------------------------------------------------------------------
def test_content_mean_keeps_size_and_skips_missing_views():
    embs = {"a": torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), "b": torch.tensor([[4.0, 0.0], [3.0, 3.0], [9.0, 9.0]])}
    masks = {"a": torch.tensor([True, False, False]), "b": torch.tensor([True, True, False])}
    mean, has = content_mean(embs, masks, ["a", "b"])
    assert torch.equal(mean[:2], torch.tensor([[3.0, 0.0], [3.0, 3.0]])) and has.tolist() == [True, True, False]


def test_regression_loss_is_relative_and_zero_only_at_the_target():
    b = torch.randn(6, 4)
    feats = {"behavior": b, "text": b.clone()}
    masks = {"text": torch.ones(6, dtype=torch.bool)}
    assert float(regression_loss(feats, masks, ["text"])) == pytest.approx(0.0, abs=1e-7)
    feats["text"] = torch.zeros(6, 4)
    assert float(regression_loss(feats, masks, ["text"])) == pytest.approx(1.0)
    feats = {"behavior": 10 * b, "text": torch.zeros(6, 4)}  # scale-free
    assert float(regression_loss(feats, masks, ["text"])) == pytest.approx(1.0)


def test_regression_needs_the_identity_head_and_selection_reads_validation_only():
    from mmrec.pretrain.config import build_pretrain_config
    with pytest.raises(ConfigError, match="behavior.head=identity"):
        build_pretrain_config(None, {}, ["loss.regression_weight=1.0"])
    with pytest.raises(ConfigError, match="valid"):
        build_pretrain_config(None, {}, ["train.stop_metric=heldout/MRR"])
    with pytest.raises(ConfigError, match="regression_weight"):
        build_pretrain_config(None, {}, ["train.stop_metric=valid/R2"])


def test_unit_length_heads_ignore_the_backbones_scale():
    from mmrec.encoders.base import HEADS
    torch.manual_seed(0)
    x = torch.rand(5, 12)
    for name in ("l2-linear", "l2-mlp"):
        head = HEADS[name](12, 4)
        assert torch.allclose(head(x), head(30.0 * x), atol=1e-6)
    plain = HEADS["linear"](12, 4)
    assert not torch.allclose(plain(x), plain(30.0 * x))


# -- the stand-ins ----------------------------------------------------------------------------------
def test_pretraining_writes_aligned_vectors_in_the_behavior_space(runs):
    pre = runs["pretrain"]
    met = json.loads((pre / "metrics.json").read_text())
    assert met["aligned_items"]["file"] == STANDIN_FILE and met["aligned_items"]["dim"] == DIM
    tables, ids = read_feature_tables(pre / STANDIN_FILE)
    assert set(tables) == {"aligned", "behavior"} and len(ids) == 200
    behavior, ids_b = read_feature_tables(runs["behavior"] / "item_embeddings.safetensors")
    stored = next(iter(behavior.values())).features
    assert ids_b == ids and torch.allclose(tables["behavior"].features, stored)  # the rows it was aligned to


def test_a_cold_item_gets_exactly_its_aligned_vector_and_warm_items_keep_theirs(runs):
    plain = Recommender.load(runs["behavior"])
    rec = Recommender.load(runs["behavior"], cold_items=f"aligned:{runs['pretrain']}")
    tables, _ = read_feature_tables(runs["pretrain"] / STANDIN_FILE)
    cold = cold_rows(rec.data)
    assert len(cold) > 0 and np.isin(rec.data.cold_items, cold).all()
    with torch.no_grad():
        before = plain.model.item_embeddings()
        after = rec.model.item_embeddings()
        users = torch.arange(5)
        scores = rec.model.score_all(users)
    warm = np.setdiff1d(np.arange(rec.data.n_items), cold)
    assert torch.equal(after[warm], before[warm])
    assert torch.equal(after[cold], tables["aligned"].features[cold])
    u = rec.model.representations()[0][users]
    assert torch.allclose(scores[:, cold], u @ tables["aligned"].features[cold].T, atol=1e-6)


def test_evaluate_with_cold_items_reports_them_and_changes_only_the_cold_ranking(runs, tmp_path):
    base = json.loads((runs["behavior"] / "metrics.json").read_text())
    out = tmp_path / "m.json"
    code = main(["evaluate", "--run", str(runs["behavior"]), "--cold-items", f"aligned:{runs['pretrain']}",
                 "--metrics-out", str(out)])
    assert code == 0
    got = json.loads(out.read_text())
    assert got["cold_items"]["with_aligned_vector"] == got["cold_items"]["cold_items"] > 0
    assert got["cold_start"]["n_items"] == base["cold_start"]["n_items"]
    assert got["cold_start"]["NDCG@10"] != base["cold_start"]["NDCG@10"]
    assert json.loads((runs["behavior"] / "metrics.json").read_text()) == base  # the run's own file untouched


def test_a_run_that_was_not_the_alignment_target_is_refused(runs):
    other = _train(runs["root"] / "other", seed=1)
    rec = Recommender.load(other)
    with pytest.raises(MMRecError, match="aligned to the item embeddings of") as e:
        attach_cold_items(rec.model, rec.data, f"aligned:{runs['pretrain']}")
    assert str(runs["behavior"]) in str(e.value)


def test_other_data_and_non_inner_product_models_are_refused(runs, tmp_path):
    from mmrec.datasets.features import write_feature_tables
    from mmrec.datasets.schema import FeatureTable
    bad = tmp_path / "other.safetensors"
    tables = {k: FeatureTable(torch.zeros(3, DIM), torch.ones(3, dtype=torch.bool), {}) for k in ("aligned", "behavior")}
    write_feature_tables(bad, tables, ["x1", "x2", "x3"])
    rec = Recommender.load(runs["behavior"])
    with pytest.raises(DataError, match="synthetic") as e:
        attach_cold_items(rec.model, rec.data, f"aligned:{bad}")
    assert str(bad) in str(e.value)
    with pytest.raises(ConfigError, match="aligned:PRETRAIN_RUN"):
        attach_cold_items(rec.model, rec.data, f"ridge:{runs['pretrain']}")
    with pytest.raises(MMRecError, match="does not exist"):
        attach_cold_items(rec.model, rec.data, f"aligned:{tmp_path / 'nowhere'}")
    pop = tmp_path / "pop"
    train(RunConfig(model="pop", data="synthetic:tiny", out=str(pop), protocol="full", split="cold",
                    train=TrainSection(epochs=1, progress=False)))
    rec = Recommender.load(pop)
    with pytest.raises(ConfigError, match="inner product"):
        attach_cold_items(rec.model, rec.data, f"aligned:{runs['pretrain']}")


# -- frozen features: no media decoding once cached, and a disk cache shared by runs ---------------------
FROZEN = ["modalities=[text, audio]", "audio.freeze_backbone=true", "loader.batch_size=40", "train.epochs=2",
          "train.checkpoint_every=0", "train.warmup_steps=2", "plots.enabled=false"]


def test_training_batches_of_a_cached_modality_skip_its_media(tmp_path, monkeypatch):
    """After the fill pass, batches carry the cache's presence mask, not decoded audio."""
    from mmrec.encoders.audio import LogMelCNNEncoder as LogMelCNN
    calls = {"n": 0}
    real = LogMelCNN.preprocess

    def counting(self, raw):
        calls["n"] += len(raw)
        return real(self, raw)
    monkeypatch.setattr(LogMelCNN, "preprocess", counting)
    m = pretrain(tiny_config(tmp_path / "run", *FROZEN))
    # the fill pass (200 items) and the final evaluation that counts bad media (200); none per training batch
    assert calls["n"] == 400, calls
    assert m["metrics"]["audio_to_behavior/MRR"] > 0


def test_disk_feature_cache_is_reused_and_gives_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path / "cache"))
    a = pretrain(tiny_config(tmp_path / "a", *FROZEN, "train.feature_cache=true"))
    files = list((tmp_path / "cache").rglob("audio-*.safetensors"))
    assert len(files) == 1
    from mmrec.encoders.audio import LogMelCNNEncoder as LogMelCNN

    def no_encode(self, batch):
        raise AssertionError("the backbone ran although its features are on disk")
    monkeypatch.setattr(LogMelCNN, "encode", no_encode)
    b = pretrain(tiny_config(tmp_path / "b", *FROZEN, "train.feature_cache=true"))
    assert a["metrics"] == b["metrics"]


def test_item_features_file_equals_an_extraction_of_the_run(runs, tmp_path):
    from mmrec.datasets.loading import load_dataset
    from mmrec.pretrain.artifacts import load_encoders
    from mmrec.pretrain.extract import extract_features
    ours, ids = read_feature_tables(runs["pretrain"] / "item_features.safetensors")
    extract_features(load_dataset("synthetic:tiny"), load_encoders(runs["pretrain"]), tmp_path / "x.safetensors",
                     project=True, progress=False, log=lambda *_: None)
    theirs, ids_x = read_feature_tables(tmp_path / "x.safetensors")
    assert ids == ids_x and set(ours) == set(theirs) == {"text"}
    assert torch.equal(ours["text"].mask, theirs["text"].mask)
    assert torch.allclose(ours["text"].features, theirs["text"].features, atol=1e-5)


# -- bad input: another dataset's behavior run or features are errors naming both ----------------------------
def test_a_behavior_run_of_other_data_is_an_error_naming_both(tmp_path):
    from mmrec.datasets.features import write_features
    from mmrec.datasets.schema import FeatureTable
    from mmrec.encoders.weights import WeightsError
    other = tmp_path / "other"
    other.mkdir()
    write_features(other / "item_embeddings.safetensors",
                   FeatureTable(torch.zeros(3, DIM), torch.ones(3, dtype=torch.bool), {}), ["x1", "x2", "x3"])
    with pytest.raises(WeightsError) as e:
        pretrain(tiny_config(tmp_path / "run", *FAST, "train.epochs=1", f"behavior.run={other}"))
    assert "synthetic:tiny" in str(e.value) and str(other) in str(e.value) and "x1" in str(e.value)


def test_a_features_file_of_other_data_is_an_error_naming_both(tmp_path):
    from mmrec.datasets.features import load_feature_file, write_features
    from mmrec.datasets.schema import FeatureTable
    f = tmp_path / "f.safetensors"
    write_features(f, FeatureTable(torch.zeros(3, 4), torch.ones(3, dtype=torch.bool), {}), ["x1", "x2", "x3"])
    with pytest.raises(DataError, match="synthetic:tiny") as e:
        load_feature_file(f, ["i0", "i1"], dataset="synthetic:tiny")
    assert str(f) in str(e.value) and "x1" in str(e.value)
    with pytest.warns(UserWarning, match="not in the dataset"):  # a partial overlap is counted, not refused
        got = load_feature_file(f, ["x1", "i1"], dataset="synthetic:tiny")
    assert next(iter(got.values())).mask.tolist() == [True, False]


def test_the_patched_item_table_is_reused_until_the_weights_change(runs):
    rec = Recommender.load(runs["behavior"], cold_items=f"aligned:{runs['pretrain']}")
    model = rec.model
    cold = torch.as_tensor(cold_rows(rec.data))
    with torch.no_grad():
        first = model.scoring_tables()[1]
        assert model.scoring_tables()[1] is first            # one copy of the catalogue for every user batch
        model.item_emb.weight.add_(1.0)                     # an in-place update (an optimizer step)
        second = model.scoring_tables()[1]
    assert second is not first
    warm = torch.ones(len(second), dtype=torch.bool)
    warm[cold] = False
    assert torch.allclose(second[warm], first[warm] + 1.0) and torch.equal(second[cold], first[cold])
