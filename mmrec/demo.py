"""``mmrec demo``: the whole path on the synthetic world, ending in a report with plots.

Each stage is a small function; stages whose models are not installed yet are
skipped with a line saying so, never faked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from mmrec.models.base import import_all_models
from mmrec.registry import MODELS
from mmrec.train.config import RunConfig, TrainSection

# Models in the order the report shows them.
DEMO_MODELS = ("pop", "behavior-prior", "bprmf", "lightgcn", "lightgcn-mb", "cigf", "mbgmn")
# Settings that fit a 300-user world in seconds on a CPU (the paper recipes in configs/
# are for real datasets and run for hundreds of epochs).
DEMO_TRAIN = {"epochs": 20, "batch_size": 256, "lr": 1e-2, "patience": 4, "eval_every": 2}
# MB-GMN generates prediction weights for every scored (user, item) pair: fewer evaluations.
DEMO_TRAIN_OVERRIDES: dict[str, dict[str, Any]] = {"mbgmn": {"epochs": 10, "eval_every": 5}}
DEMO_MODEL_ARGS: dict[str, dict[str, Any]] = {
    "cigf": {"samples_per_user": 10},
    "mbgmn": {"samples_per_user": 10},
}


def run_demo(out: Path, preset: str = "tiny", seed: int = 0, epochs: int | None = None) -> dict[str, Any]:
    from mmrec.cli import print_metrics_table
    from mmrec.datasets.canonical import write_canonical
    from mmrec.datasets.synthetic import make_world
    from mmrec.train.report import plot_comparison
    from mmrec.train.run import train

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/5] synthesising the world synthetic:{preset} (seed {seed})")
    world = make_world(preset, seed=seed)
    data_dir = out / "data"
    write_canonical(world, data_dir)
    info = world.describe()
    print(f"      {info['n_users']:,} users x {info['n_items']:,} items; "
          + ", ".join(f"{b} {n:,}" for b, n in info["interactions"].items())
          + f"; modalities: {', '.join(info.get('modalities', {}))}")

    import_all_models()
    models = [m for m in DEMO_MODELS if m in MODELS]
    missing = [m for m in DEMO_MODELS if m not in MODELS]
    print(f"[2/5] training {', '.join(models)} (leave-one-out on buy, full ranking, selection on valid)")
    if missing:
        print(f"      not installed yet, skipped: {', '.join(missing)}")
    results: dict[str, dict[str, float]] = {}
    summaries: dict[str, Any] = {}
    def run(label: str, name: str, model_args: dict[str, Any], **kw: Any) -> None:
        train_kw = {**DEMO_TRAIN, **DEMO_TRAIN_OVERRIDES.get(name, {})}
        if epochs:
            train_kw["epochs"] = epochs
        cfg = RunConfig(model=name, data=str(data_dir), out=str(out / "runs" / label), seed=seed,
                        protocol="full", model_args=model_args, train=TrainSection(progress=False, **train_kw), **kw)
        m = train(cfg)
        results[label] = m["metrics"]
        summaries[label] = {k: m[k] for k in ("best_epoch", "epochs", "train_seconds")}
        print(f"      {label:<14} Recall@20 {m['metrics']['Recall@20']:.4f}  NDCG@20 {m['metrics']['NDCG@20']:.4f}"
              f"  ({m['train_seconds']:.1f}s, best epoch {m['best_epoch']})")

    for name in models:
        run(name, name, DEMO_MODEL_ARGS.get(name, {}))

    if "lightgcn" in results:
        _multimodal(out, data_dir, seed, run)
    else:
        print("[3/5]-[4/5] skipped: the multimodal stages align to a LightGCN run, which is not installed")

    print("[5/5] report")
    shown = ["Recall@10", "NDCG@10", "Recall@20", "NDCG@20"]
    print_metrics_table({n: {k: r[k] for k in shown} for n, r in results.items()}, title="test, full ranking")
    plot = plot_comparison(results, shown, out / "comparison.png", title=f"synthetic:{preset}, test split")
    report = {"data": info, "results": results, "runs": summaries, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _write_markdown(out / "report.md", preset, info, results, shown, plot.name)
    print(f"\nreport: {out / 'report.md'} (plot {plot}); took {report['seconds']}s")
    return report


def _multimodal(out: Path, data_dir: Path, seed: int, run: Callable[..., None]) -> None:
    """Stages 3-4: pre-train encoders against LightGCN, extract features, train content models."""
    from mmrec.demo_multimodal import DEMO_CONTENT_MODELS, extract_stage, pretrain_stage, retrieval_line

    print("[3/5] pre-training small image / text / audio encoders, aligned to LightGCN's item embeddings")
    t0 = time.perf_counter()
    metrics = pretrain_stage(data_dir, out / "runs" / "lightgcn", out / "pretrain", seed)
    print(f"      {retrieval_line(metrics)}  ({time.perf_counter() - t0:.1f}s, {metrics['steps']} steps)")
    features = extract_stage(data_dir, out / "pretrain", out / "features.safetensors")
    print(f"      extracted frozen item features -> {features}")
    print("[4/5] training content models on those features (two-step)")
    for label, name, model_args in DEMO_CONTENT_MODELS:
        if name in MODELS:
            run(label, name, model_args, features=[str(features)])


def _write_markdown(path: Path, preset: str, info: dict[str, Any], results: dict[str, dict[str, float]],
                    shown: list[str], plot: str) -> None:
    lines = [f"# mmrec demo: synthetic:{preset}", "",
             f"{info['n_users']:,} users, {info['n_items']:,} items; "
             + ", ".join(f"{b}: {n:,}" for b, n in info["interactions"].items()), "",
             "| model | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in shown) + " |")
    lines += ["", f"![comparison]({plot})", ""]
    path.write_text("\n".join(lines))
