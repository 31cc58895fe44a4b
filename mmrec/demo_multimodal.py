"""The demo's multimodal half: pre-train, extract, fine-tune with content.

The three stages of the platform on the synthetic world, sized for a CPU in about a
minute: small random-init encoders (a 1-layer BERT on MiniLM's tokenizer, a ViT on
32 px images, a small log-mel CNN) are aligned to a trained LightGCN's item embeddings
(a frozen target), their features are extracted into a feature file, and recommenders
are trained on that file with a fusion module. ``mmrec demo --quick`` skips the encoders and
trains :data:`QUICK_CONTENT_MODELS` on the world's stored features instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: small encoders that train in seconds on a CPU (same as the tests' tiny recipe)
DEMO_ENCODERS = [
    "text={name: bert, pretrained: null, args: {tokenizer: all-MiniLM-L6-v2, max_length: 48, "
    "config: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}}",
    "image.args={img_size: 32, data_config: {input_size: [3, 32, 32], crop_pct: 1.0}}",
    "audio.args={channels: [8, 16], n_mels: 16}",
]
DEMO_PRETRAIN = ["train.epochs=10", "loader.batch_size=40", "train.lr=0.01", "train.warmup_steps=3",
                 "train.checkpoint_every=0", "eval.every=0"]
#: content models of the report: (label, model, model args) trained on the extracted features
_TABLES = {"features": ["image", "text", "audio"]}  # the per-modality tables, not the pre-fused one
DEMO_CONTENT_MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("vbpr", "vbpr", {**_TABLES}),
    ("lightgcn+attn", "lightgcn", {**_TABLES, "use_features": True, "fusion": "attention"}),
    ("freedom", "freedom", {**_TABLES, "modality_weights": None}),
    ("cigf+attn", "cigf", {**_TABLES, "use_features": True, "fusion": "attention", "samples_per_user": 10}),
]

#: ``mmrec demo --quick``: content models on the synthetic world's stored features (a noisy random
#: projection of the factors each modality shows), so no encoder is pre-trained
QUICK_CONTENT_MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("vbpr", "vbpr", {**_TABLES}),
    ("lightgcn+attn", "lightgcn", {**_TABLES, "use_features": True, "fusion": "attention"}),
]


def pretrain_stage(data_dir: Path, target_run: Path, out: Path, seed: int) -> dict[str, Any]:
    """Align content encoders to the target run's item embeddings; returns pretrain's metrics."""
    from mmrec.pretrain.config import build_pretrain_config
    from mmrec.pretrain.run import pretrain

    cfg = build_pretrain_config(None, {"out": str(out), "data": str(data_dir), "seed": seed,
                                       "train.progress": False},
                                [*DEMO_ENCODERS, f"behavior.run={target_run}", *DEMO_PRETRAIN])
    return pretrain(cfg, log=lambda *a, **k: None)


def extract_stage(data_dir: Path, run: Path, out: Path) -> Path:
    """Frozen features of every item from the pre-trained encoders, into one feature file."""
    from mmrec.pretrain.extract import ExtractConfig, run_extract

    run_extract(ExtractConfig(data=str(data_dir), out=str(out), run=str(run), progress=False), log=lambda _: None)
    return out


def retrieval_line(metrics: dict[str, Any]) -> str:
    key = "content_to_behavior/Recall@10"
    return (f"content->behavior Recall@10 {metrics['baseline'][key]:.3f} -> {metrics['metrics'][key]:.3f} "
            f"(chance {metrics['chance']['Recall@10']:.3f})")
