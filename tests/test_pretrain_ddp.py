"""Two gloo processes == one process with the same global batch (loss, gradients, trained weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mmrec.pretrain.config import PretrainConfig, build_pretrain_config
from mmrec.pretrain.run import pretrain
from tests.conftest import free_port

#: no dropout anywhere (two ranks cannot draw one process's masks); the audio CNN is frozen, so
#: its BatchNorm runs in eval mode and its features come from the cache (filled by both ranks)
SETS = [
    "modalities=[image,text,audio]", "device=cpu", "loader.batch_size=32", "train.max_steps=3",
    "train.warmup_steps=1", "train.lr=0.003", "train.checkpoint_every=0", "train.progress=false",
    "text={name: bert, pretrained: null, args: {tokenizer: all-MiniLM-L6-v2, max_length: 48, config: "
    "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, "
    "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}}",
    "image.args={img_size: 32, data_config: {input_size: [3, 32, 32], crop_pct: 1.0}}",
    "audio.args={channels: [8, 16], n_mels: 16}", "audio.freeze_backbone=true",
]


def _config(out: Path) -> PretrainConfig:
    return build_pretrain_config(None, {"out": str(out), "data": "synthetic:tiny"}, SETS)


def first_step(cfg: PretrainConfig, info) -> dict:
    """Loss and (DDP-averaged) gradients of global batch 0 of epoch 0, through the trainer's own wrapping."""
    from mmrec.pretrain.data import CooccurrenceSampler, ItemCollator, MemorySource
    from mmrec.pretrain.run import available_modalities, load_pretrain_data
    from mmrec.pretrain.trainer import PretrainTrainer, build_model

    data = load_pretrain_data(cfg)
    modalities, _ = available_modalities(cfg, data)
    model = build_model(cfg, data, modalities)
    collate = ItemCollator({m: model.encoders[m] for m in modalities}, modalities)
    source = MemorySource(data, collate, cfg.loader.batch_size, seed=cfg.seed, world=info.world, rank=info.rank)
    trainer = PretrainTrainer(cfg, model, source, cfg.out, info, cooc=CooccurrenceSampler(data.merged_matrix("train")))
    model.set_train(True)
    batch = next(source.epoch(0))
    trainer._add_cf(batch, 0)
    loss, terms = trainer.net(batch)  # DDP(model) on two ranks
    loss.backward()
    return {"loss": loss.detach(), "terms": terms, "rows": batch["index"].shape[0], "unused": trainer.unused,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from mmrec.pretrain.trainer import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a deprecated collective in mmrec's own code (e.g. torch.distributed.nn.functional.all_gather,
    # which warns on every step) fails the rank
    warnings.filterwarnings("error", category=FutureWarning, module=r"mmrec\.")
    info = init_distributed("cpu")  # env:// as under torchrun
    try:
        torch.save(first_step(_config(Path(out_dir) / "ddp"), info), Path(out_dir) / f"step{rank}.pt")
        pretrain(_config(Path(out_dir) / "ddp"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    from mmrec.pretrain.trainer import DistInfo

    single = first_step(_config(tmp_path / "single"), DistInfo())
    pretrain(_config(tmp_path / "single"))
    # fork: the ranks inherit the libraries the single-process run imported (spawn would
    # re-import torch, timm and transformers in each: most of this test's time on a small machine)
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"step{r}.pt", weights_only=False) for r in range(2)]
    assert single["rows"] == 32 and [r["rows"] for r in ranks] == [16, 16]
    for r in ranks:  # every rank computes the loss of the global batch
        assert r["loss"].item() == pytest.approx(single["loss"].item(), rel=1e-5)
        for k, v in single["terms"].items():
            assert r["terms"][k].item() == pytest.approx(v.item(), rel=1e-5), k
        assert r["grads"].keys() == single["grads"].keys()
        for name, g in single["grads"].items():  # DDP's average over ranks == the single-process gradient
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # BERT is built without its pooler (unused under mean pooling): every trainable parameter
    # gets a gradient, nothing for the trainer's probe to freeze
    assert ranks[0]["unused"] == [] and ranks[1]["unused"] == []
    assert not any("pooler" in n for n in single["grads"])
    assert any(n.startswith("encoders.image.backbone") for n in single["grads"])
    assert not any(n.startswith("encoders.audio.backbone") for n in single["grads"])  # frozen

    # the whole trainer: same per-step losses and (nearly) the same weights after 3 AdamW steps
    logs = {k: [json.loads(x) for x in (tmp_path / k / "log.jsonl").read_text().splitlines()]
            for k in ("single", "ddp")}
    assert [r["step"] for r in logs["ddp"]] == [1, 2, 3]
    for a, b in zip(logs["single"], logs["ddp"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["items"] == a["items"] == 32
    wa = load_file(tmp_path / "single" / "encoders.safetensors")
    wb = load_file(tmp_path / "ddp" / "encoders.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        # Adam turns float-level gradient noise on near-zero gradients (e.g. attention key biases)
        # into update noise; 17 of 1.3M values differ by 1e-5..2e-5 after 3 steps at lr 3e-3
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4, msg=k)
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 3


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    """``torchrun --nproc_per_node 2 -m mmrec.cli pretrain`` end to end (gloo on CPU)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "mmrec.cli", "pretrain", "--data", "synthetic:tiny", "--out", str(out),
           "--no-progress"] + [a for s in SETS for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 3
    assert "item retrieval" in proc.stdout
