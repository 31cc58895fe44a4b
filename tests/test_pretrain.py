"""Contrastive alignment pre-training: retrieval improves, resume is exact, bad media is counted."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmrec.cli import main
from mmrec.datasets.loading import load_dataset
from mmrec.errors import ConfigError
from mmrec.pretrain.artifacts import load_encoders
from mmrec.pretrain.config import PretrainConfig, build_pretrain_config, config_to_dict
from mmrec.pretrain.data import CooccurrenceSampler, ItemCollator, MemorySource, hash_uniform
from mmrec.pretrain.retrieval import rank_metrics, ranks_of_self, retrieval_metrics
from mmrec.pretrain.run import pretrain
from mmrec.pretrain.trainer import cosine_with_warmup

REPO = Path(__file__).resolve().parents[1]

#: small random-init encoders: a 1-layer BERT on MiniLM's tokenizer, a ViT on 32 px, a small log-mel CNN
TINY_TEXT = ("text={name: bert, pretrained: null, args: {tokenizer: all-MiniLM-L6-v2, max_length: 48, "
             "config: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}}")
TINY_IMAGE = "image.args={img_size: 32, data_config: {input_size: [3, 32, 32], crop_pct: 1.0}}"
TINY_AUDIO = "audio.args={channels: [8, 16], n_mels: 16}"


def assert_same_run(a: Path, b: Path) -> None:
    """Two pre-training runs ended with bit-identical encoder weights and identical logs."""
    wa, wb = load_file(a / "encoders.safetensors"), load_file(b / "encoders.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "log.jsonl").read_text().splitlines() == (b / "log.jsonl").read_text().splitlines()


def tiny_config(out: Path, *sets: str) -> PretrainConfig:
    return build_pretrain_config(None, {"out": str(out), "data": "synthetic:tiny", "train.progress": False},
                                 [TINY_TEXT, TINY_IMAGE, TINY_AUDIO, *sets])


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic:tiny")


# -- config ----------------------------------------------------------------------------------
def test_recipe_matches_the_defaults_and_overrides_keep_the_model():
    assert config_to_dict(build_pretrain_config(REPO / "configs" / "pretrain.yaml")) == config_to_dict(PretrainConfig())
    build_pretrain_config(REPO / "configs" / "pretrain-gpu.yaml")
    for recipe in ("pretrain-ml100k.yaml", "pretrain-ml100k-gpu.yaml"):  # the real-content recipes load and validate
        cfg = build_pretrain_config(REPO / "configs" / recipe, {}, ["behavior.run=/x"])
        assert cfg.behavior.head == "identity" and cfg.loss.regression_weight > 0 and cfg.heldout.items == "cold"
    cfg = build_pretrain_config(None, {}, ["image.freeze_backbone=true", "behavior.run=/x"])
    assert cfg.image.name == "test_vit" and cfg.image.args["img_size"] == 64 and cfg.image.freeze_backbone
    assert cfg.behavior_kind() == "run"
    other = build_pretrain_config(None, {}, ["image.name=resnet18"])
    assert other.image.args == {}  # the tiny ViT's img_size would not fit another model
    with pytest.raises(ConfigError, match="train.lrr"):
        build_pretrain_config(None, {}, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="modalities"):
        build_pretrain_config(None, {}, ["modalities=[video]"])
    with pytest.raises(ConfigError, match="amp"):
        build_pretrain_config(None, {}, ["train.amp=fp8"])


def test_cosine_schedule_warms_up_then_decays():
    f = cosine_with_warmup(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0) and f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5) and f(10) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(2, 12))


# -- retrieval ---------------------------------------------------------------------------------
def test_ranks_by_hand_ties_count_against_the_model():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    # query 0 -> own key 0 is best; query 1 -> key 1 ([0,1]) has cos 0, keys 0 and 2 beat it: rank 3;
    # query 2 -> key 2 exact
    assert ranks_of_self(queries, keys, torch.tensor([0, 1, 2])).tolist() == [1, 3, 1]
    collapsed = torch.ones(3, 2)
    assert ranks_of_self(collapsed, collapsed, torch.arange(3)).tolist() == [3, 3, 3]  # not 1
    m = rank_metrics(torch.tensor([1, 3, 1]), [1, 2], "x")
    assert m == pytest.approx({"x/Recall@1": 2 / 3, "x/Recall@2": 2 / 3, "x/MRR": (1 + 1 / 3 + 1) / 3})


def test_blockwise_ranks_equal_one_block_and_fused_content_uses_masks():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    rows = torch.arange(50)
    assert torch.equal(ranks_of_self(q, k, rows, block_size=7), ranks_of_self(q, k, rows, block_size=1000))
    embs = {"behavior": k, "image": k.clone(), "text": torch.randn(50, 8, generator=g)}
    masks = {"image": torch.ones(50, dtype=torch.bool), "text": torch.zeros(50, dtype=torch.bool)}
    masks["text"][:10] = True
    out = retrieval_metrics(embs, masks, ["image", "text"], ks=[1])
    assert out["image_to_behavior/Recall@1"] == 1.0
    # items without text are fused from their image alone: exact for 40 of 50
    assert out["content_to_behavior/Recall@1"] >= 0.8
    assert "text_to_behavior/Recall@1" in out


# -- data --------------------------------------------------------------------------------------
def test_memory_source_splits_global_batches_over_ranks(tiny):
    collate = ItemCollator({}, [])
    one = MemorySource(tiny, collate, 48, seed=3)
    parts = [MemorySource(tiny, collate, 48, seed=3, world=2, rank=r) for r in range(2)]
    assert one.batches_per_epoch() == 4  # 200 // 48, last one dropped
    for b, (g, r0, r1) in enumerate(zip(one.epoch(1), parts[0].epoch(1), parts[1].epoch(1))):
        assert torch.equal(torch.cat([r0["index"], r1["index"]]), g["index"])
    assert [x["index"].tolist() for x in one.epoch(1, start=2)] == [x["index"].tolist() for x in one.epoch(1)][2:]
    assert not torch.equal(next(one.epoch(0))["index"], next(one.epoch(1))["index"])


def test_cooccurrence_positives_are_co_interacted_items(tiny):
    x = tiny.merged_matrix("train")
    sampler = CooccurrenceSampler(x)
    items = np.arange(tiny.n_items)
    pos, ok = sampler.sample(items, seed=0, epoch=0)
    assert ok.mean() > 0.9
    users_of = x.T.tocsr()
    for i in np.flatnonzero(ok)[:50]:
        assert pos[i] != i
        assert set(users_of[i].indices) & set(users_of[pos[i]].indices)  # some user had both
    again, _ = sampler.sample(items[::-1], seed=0, epoch=0)
    assert np.array_equal(again[::-1], pos)  # a function of (seed, epoch, item), not of batch position
    assert not np.array_equal(sampler.sample(items, seed=0, epoch=1)[0], pos)
    u = hash_uniform(1, 2, np.arange(10000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    from mmrec.pretrain.trainer import build_model
    sets = ["modalities=[image,text]", "text.args.config.hidden_dropout_prob=0.0",
            "text.args.config.attention_probs_dropout_prob=0.0"]
    grads = []
    for ckpt in (False, True):
        cfg = tiny_config(Path("unused"), *sets, f"train.grad_checkpointing={str(ckpt).lower()}")
        model = build_model(cfg, tiny, ["image", "text"]).set_train(True)
        if ckpt:
            assert model.grad_checkpointing == {"image": True, "text": True}
        collate = ItemCollator({m: model.encoders[m] for m in ("image", "text")}, ["image", "text"])
        batch = next(MemorySource(tiny, collate, 16).epoch(0))
        pos, ok = CooccurrenceSampler(tiny.merged_matrix("train")).sample(batch["index"].numpy(), 0, 0)
        batch["cf_pos"], batch["cf_ok"] = torch.from_numpy(pos), torch.from_numpy(ok)
        loss, _ = model(batch)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_behavior_target_from_a_recommender_run(tmp_path, tiny):
    from safetensors.torch import save_file
    run = tmp_path / "rec"
    run.mkdir()
    emb = torch.randn(tiny.n_items, 16, generator=torch.Generator().manual_seed(0))
    order = list(range(tiny.n_items))[::-1]  # stored in another item order: rows must be matched by id
    save_file({"features": emb[order].contiguous()}, str(run / "item_embeddings.safetensors"),
              metadata={"item_ids": json.dumps([str(tiny.item_ids[i]) for i in order])})
    out = tmp_path / "pre"
    m = pretrain(tiny_config(out, "modalities=[text]", f"behavior.run={run}", "train.epochs=2",
                             "loader.batch_size=50", "train.checkpoint_every=0"), data=tiny)
    assert m["behavior"] == "run"
    beh = load_encoders(out)["behavior"]
    assert torch.equal(beh.table.weight, emb)  # frozen, in dataset order
    assert m["metrics"]["content_to_behavior/MRR"] > m["baseline"]["content_to_behavior/MRR"]


# -- quality -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lightgcn_run(tmp_path_factory) -> Path:
    """A quick LightGCN run of `mmrec train` on synthetic:tiny: a FROZEN alignment target.

    A jointly trained ID table can move towards the content and make retrieval easy; the
    item embeddings of a trained recommender cannot (``behavior.run``: frozen, only a head).
    """
    run = tmp_path_factory.mktemp("lightgcn") / "run"
    rc = main(["train", "--data", "synthetic:tiny", "--model", "lightgcn", "--out", str(run), "--epochs", "20",
               "--lr", "0.01", "--set", "train.progress=false", "--set", "train.eval_every=20"])
    assert rc == 0 and (run / "item_embeddings.safetensors").exists()
    return run


def _check_improvement(metrics: dict, n_items: int) -> None:
    key = "content_to_behavior/Recall@10"
    after, before = metrics["metrics"][key], metrics["baseline"][key]
    chance = 10 / n_items
    assert metrics["chance"]["Recall@10"] == pytest.approx(chance)
    assert after >= 3 * max(before, chance), (before, after)
    assert after >= 10 * chance, (before, after)


def test_pretraining_aligns_text_with_a_frozen_recommender_target(tmp_path, tiny, lightgcn_run):
    """The issue's quality bar against LightGCN's item embeddings (frozen): text -> behavior
    Recall@10 >= 3x the untrained baseline and >= 10x chance (measured: 0.065 -> 0.675)."""
    out = tmp_path / "run"
    cfg = tiny_config(out, "modalities=[text]", f"behavior.run={lightgcn_run}", "train.epochs=10",
                      "loader.batch_size=40", "train.lr=0.01", "train.warmup_steps=3", "train.checkpoint_every=0",
                      "eval.every=4")
    m = pretrain(cfg, data=tiny)
    assert m["behavior"] == "run"
    _check_improvement(m, tiny.n_items)
    assert [(e["epoch"], e["step"]) for e in m["evals"]] == [(4, 20), (8, 40)]  # for curves.png
    key = "content_to_behavior/Recall@10"
    assert m["baseline"][key] < m["evals"][0]["metrics"][key] <= m["metrics"][key] + 0.05
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 51))
    assert np.mean([r["loss"] for r in log[-5:]]) < 0.7 * np.mean([r["loss"] for r in log[:5]])
    assert {"text-behavior", "lr", "temperature", "bad_media"} <= set(log[0]) and "behavior-cooc" not in log[0]
    # the target stayed frozen: the run's table is LightGCN's embeddings, bit for bit
    from mmrec.encoders.behavior import read_item_embeddings
    encs = load_encoders(out)
    assert set(encs) == {"text", "behavior"}
    emb, ids = read_item_embeddings(lightgcn_run)
    pos = {x: i for i, x in enumerate(ids)}
    target = emb[torch.tensor([pos[str(x)] for x in tiny.item_ids])]
    assert torch.equal(encs["behavior"].table.weight, target)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["model"] == "pretrain" and saved["steps"] == 50 and saved["bad_media"]["items"] == {}
    assert (out / "curves.png").stat().st_size > 1000


def test_jointly_trained_id_target_with_cooccurrence_term(tmp_path, tiny):
    """The default target (ID table, SVD start, co-occurrence term) trains and logs its terms."""
    out = tmp_path / "run"
    cfg = tiny_config(out, "modalities=[text]", "train.epochs=2", "loader.batch_size=40", "train.lr=0.01",
                      "train.warmup_steps=3", "train.checkpoint_every=0")
    m = pretrain(cfg, data=tiny)
    key = "content_to_behavior/Recall@10"
    assert m["behavior"] == "id" and m["metrics"][key] > m["baseline"][key]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"text-behavior", "behavior-cooc"} <= set(log[0]) and len(log) == 10


@pytest.mark.slow
def test_default_recipe_aligns_every_modality(tmp_path, lightgcn_run):
    """The CPU recipe (tiny ViT, frozen MiniLM, log-mel CNN) through the CLI, frozen LightGCN target."""
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", "synthetic:tiny", "--out", str(out), "--config",
               str(REPO / "configs" / "pretrain.yaml"), "--epochs", "10", "--no-progress",
               "--set", "train.lr=0.003", "--set", "train.warmup_steps=5", "--set", f"behavior.run={lightgcn_run}"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    _check_improvement(m, 200)
    for mod in ("image", "text", "audio"):
        key = f"{mod}_to_behavior/Recall@10"
        assert m["metrics"][key] >= 2 * max(m["baseline"][key], 0.05), mod
    assert set(load_encoders(out)) == {"image", "text", "audio", "behavior"}


# -- exact resume ----------------------------------------------------------------------------------
class Killed(RuntimeError):
    pass


def test_resume_after_a_kill_is_bit_identical(tmp_path, tiny, monkeypatch):
    # dropout in the BERT (RNG), a frozen + cached log-mel CNN with BatchNorm (buffers, cache
    # refill), gradient accumulation with a short last group, the co-occurrence term: everything
    # resume must restore
    sets = ["modalities=[text,audio]", "train.epochs=2", "loader.batch_size=40", "train.grad_accum=2",
            "train.checkpoint_every=2", "train.warmup_steps=2", "audio.freeze_backbone=true", "train.lr=0.003"]
    ref = pretrain(tiny_config(tmp_path / "a", *sets), data=tiny)
    assert ref["steps"] == 6  # 2 epochs x ceil(5 batches / 2)

    b = tmp_path / "b"
    first = pretrain(tiny_config(b, *sets, "train.stop_after=2"), data=tiny)
    assert first == {"interrupted": True, "step": 2, "epoch": 0}
    assert not (b / "metrics.json").exists()

    from mmrec.pretrain import trainer as trainer_mod
    real = trainer_mod.PretrainTrainer._append_log

    def dying(self, record):  # a kill after step 5: the checkpoint of step 4 (epoch 1, batch 2) survives
        real(self, record)
        if record["step"] == 5:
            raise Killed("SIGKILL")

    monkeypatch.setattr(trainer_mod.PretrainTrainer, "_append_log", dying)
    with pytest.raises(Killed):
        pretrain(tiny_config(b, *sets, "train.resume=true"), data=tiny)
    monkeypatch.setattr(trainer_mod.PretrainTrainer, "_append_log", real)
    state = torch.load(b / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and state["position"] == {"epoch": 1, "batch": 2}  # mid-epoch

    done = pretrain(tiny_config(b, *sets, "train.resume=true"), data=tiny)
    assert_same_run(tmp_path / "a", b)  # the redone steps replace the killed run's log lines
    assert done["metrics"] == ref["metrics"] and done["baseline"] == ref["baseline"]


# -- bad media ----------------------------------------------------------------------------------------
def _with_bad_media(tiny):
    image = list(tiny.items.image)
    audio = list(tiny.items.audio)
    text = {k: list(v) for k, v in tiny.items.text.items()}
    image[3] = b"\x89PNG\r\n\x1a\n this is not an image"   # corrupt bytes
    image[4] = None                                            # no image
    audio[7] = audio[7][:30]                                   # WAV cut inside its header
    for col in text:
        text[col][9] = ""                                      # empty text
    items = dataclasses.replace(tiny.items, image=image, audio=audio, text=text)
    return dataclasses.replace(tiny, items=items)


def test_bad_media_is_skipped_and_counted(tmp_path, tiny):
    data = _with_bad_media(tiny)
    out = tmp_path / "run"
    m = pretrain(tiny_config(out, "train.epochs=2", "loader.batch_size=50", "train.checkpoint_every=0"), data=data)
    assert m["bad_media"]["items"] == {"audio/corrupt": 1, "image/corrupt": 1, "image/missing": 1,
                                       "text/missing": 1}
    assert "i3" in m["bad_media"]["examples"]["image/corrupt"]
    # during training every epoch meets them again (2 epochs, each item once per epoch, batches
    # of 50 of 200 items: nothing dropped)
    assert m["bad_media"]["train"] == {k: 2 for k in m["bad_media"]["items"]}
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["bad_media"] == m["bad_media"]["train"]
    assert all(math.isfinite(json.loads(line)["loss"]) for line in (out / "log.jsonl").read_text().splitlines())
    assert (out / "encoders.safetensors").exists()


def test_truncated_wav_bytes_are_counted_as_corrupt(tiny):
    from mmrec.encoders import create_encoder
    from mmrec.encoders.robust import BadMedia, preprocess_robust
    enc = create_encoder("audio", "logmel-cnn", pretrained=None, embed_dim=8, channels=[4], n_mels=8)
    good = tiny.items.audio[0]
    bad = BadMedia()
    collate = ItemCollator({"audio": enc}, ["audio"])
    batch = collate([{"index": 0, "item": "i0", "wav": good}, {"index": 1, "item": "i1", "wav": good[:30]},
                     {"index": 2, "item": "i2", "wav": None}])
    assert batch["masks"]["audio"].tolist() == [True, False, False]
    assert batch["bad"] == {"audio/corrupt": 1, "audio/missing": 1}
    assert batch["views"]["audio"]["input_features"].shape[0] == 1
    _, ok = preprocess_robust(enc, [good, good[:30]], "audio", bad)
    assert ok.tolist() == [True, False] and bad.as_dict() == {"audio/corrupt": 1}


def test_cli_help_and_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0
    assert "torchrun" in capsys.readouterr().out
    rc = main(["pretrain", "--data", "synthetic:tiny", "--out", str(tmp_path / "r"), "--set", "train.amp=fp8"])
    assert rc == 2
    assert "train.amp" in capsys.readouterr().err
