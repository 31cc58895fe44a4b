"""``mmrec demo``: the whole path on the synthetic world, ending in a report with plots.

The world is ``synthetic:demo`` (see ``PRESETS`` in :mod:`mmrec.datasets.synthetic.config`):
purchases are not all viewed first, item attributes (shown by every modality) drive most
of the taste, and a quarter of the bought items are cold (the ``cold`` split: every row
held out). So the report can say something true about each stage: trained models pass
popularity, content models rank cold items that ID models cannot, and the "buy what you
viewed" prior is strong on repeat purchases and weak on discoveries. :data:`FACTS` states
those claims; ``report.json`` records whether this run bears them out (a test asserts it).

Each stage is a small function; stages whose models are not installed yet are
skipped with a line saying so, never faked.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmrec.io import write_json
from mmrec.models.base import import_all_models
from mmrec.registry import MODELS
from mmrec.train.config import RunConfig, TrainSection

# Models in the order the report shows them; references are not trained.
REFERENCE_MODELS = ("pop", "behavior-prior")
DEMO_MODELS = (*REFERENCE_MODELS, "bprmf", "lightgcn", "lightgcn-mb", "cigf", "mbgmn")
#: ``--quick``: the models that carry the three facts, content models on the world's stored features
QUICK_MODELS = (*REFERENCE_MODELS, "bprmf", "lightgcn-mb")
# Settings that fit a 500-user world in seconds on a CPU (the paper recipes in configs/
# are for real datasets and run for hundreds of epochs).
DEMO_TRAIN = {"epochs": 20, "batch_size": 256, "lr": 1e-2, "patience": 4, "eval_every": 2}
# MB-GMN generates prediction weights for every scored (user, item) pair: fewer evaluations.
DEMO_TRAIN_OVERRIDES: dict[str, dict[str, Any]] = {"mbgmn": {"epochs": 10, "eval_every": 5}}
DEMO_MODEL_ARGS: dict[str, dict[str, Any]] = {
    "cigf": {"samples_per_user": 10},
    "mbgmn": {"samples_per_user": 10},
}
#: the split of every demo run: warm items split per user at random, a share of the bought items cold
DEMO_SPLIT = "cold"
DEMO_SPLIT_ARGS: dict[str, Any] = {"share": 0.25}
#: metrics of the table: whole test set, its repeat / discovery parts, cold items ranked among cold items
TABLE = ["Recall@20", "NDCG@20", "repeat/Recall@20", "discovery/Recall@20", "cold/Recall@10", "cold/NDCG@10"]
PLOTTED = ["Recall@20", "repeat/Recall@20", "discovery/Recall@20", "cold/Recall@10"]


@dataclass(frozen=True)
class Fact:
    """A claim the demo's world is built to bear out, checked on the run's own numbers."""

    key: str
    claim: str
    metric: str


FACTS = (
    Fact("trained_beat_popularity", "the best trained model beats popularity on the whole test set", "Recall@20"),
    Fact("content_wins_cold", "content models beat ID-only models on cold items", "cold/Recall@10"),
    Fact("prior_not_first_on_discovery", "behavior-prior is not first on the discovery part",
         "discovery/Recall@20"),
)


def check_facts(results: dict[str, dict[str, float]], kinds: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each :data:`FACT` with the two sides compared and whether it holds (None: a side is missing)."""
    def best(names: list[str], metric: str) -> tuple[str | None, float | None]:
        scored = [(results[n][metric], n) for n in names if not math.isnan(results[n].get(metric, math.nan))]
        if not scored:
            return None, None
        value, name = max(scored)
        return name, value

    trained = [n for n, k in kinds.items() if k != "reference"]
    content = [n for n, k in kinds.items() if k == "content"]
    id_only = [n for n, k in kinds.items() if k != "content"]
    out = {}
    for fact in FACTS:
        m = fact.metric
        if fact.key == "trained_beat_popularity":
            (a, va), (b, vb) = best(trained, m), best(["pop"] if "pop" in results else [], m)
        elif fact.key == "content_wins_cold":
            (a, va), (b, vb) = best(content, m), best(id_only, m)
        else:
            others = [n for n in results if n != "behavior-prior"]
            (a, va), (b, vb) = best(others, m), best(["behavior-prior"] if "behavior-prior" in results else [], m)
        holds = None if va is None or vb is None else bool(va > vb)
        out[fact.key] = {"claim": fact.claim, "metric": m, "holds": holds, "best": a, "best_value": va,
                         "versus": b, "versus_value": vb}
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def run_demo(out: Path, preset: str = "demo", seed: int = 0, epochs: int | None = None,
             quick: bool = False) -> dict[str, Any]:
    """Run every stage into ``out``; returns what ``out/report.json`` holds.

    ``quick``: only the models the facts need, and content models on the world's stored
    features instead of pre-trained encoders (well under a minute on a CPU).
    """
    from mmrec.cli import print_metrics_table
    from mmrec.datasets.canonical import write_canonical
    from mmrec.datasets.synthetic import make_world
    from mmrec.train.run import train

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_stages = 5
    print(f"[1/{n_stages}] synthesising the world synthetic:{preset} (seed {seed})", flush=True)
    world = make_world(preset, seed=seed)
    data_dir = out / "data"
    write_canonical(world, data_dir)
    info = world.describe()
    print(f"      {info['n_users']:,} users x {info['n_items']:,} items; "
          + ", ".join(f"{b} {n:,}" for b, n in info["interactions"].items())
          + f"; modalities: {', '.join(info.get('modalities', {}))}", flush=True)

    import_all_models()
    wanted = QUICK_MODELS if quick else DEMO_MODELS
    models = [m for m in wanted if m in MODELS]
    missing = [m for m in wanted if m not in MODELS]
    print(f"[2/{n_stages}] training {', '.join(models)} (split '{DEMO_SPLIT}': random per user on warm items, "
          f"{DEMO_SPLIT_ARGS['share']:.0%} of bought items cold; full ranking; selection on valid)", flush=True)
    if missing:
        print(f"      not installed yet, skipped: {', '.join(missing)}")
    results: dict[str, dict[str, float]] = {}
    summaries: dict[str, Any] = {}
    kinds: dict[str, str] = {}

    def run(label: str, name: str, model_args: dict[str, Any], kind: str = "id", **kw: Any) -> None:
        train_kw = {**DEMO_TRAIN, **DEMO_TRAIN_OVERRIDES.get(name, {})}
        if epochs:
            train_kw["epochs"] = epochs
        cfg = RunConfig(model=name, data=str(data_dir), out=str(out / "runs" / label), seed=seed,
                        split=DEMO_SPLIT, split_args=dict(DEMO_SPLIT_ARGS), protocol="full",
                        model_args=model_args, train=TrainSection(progress=False, **train_kw), **kw)
        m = train(cfg)
        # pop and behavior-prior give every cold item the same score (it has no training row):
        # their cold "ranking" would be the evaluator's tie order, so it is not reported
        cold = {} if name in REFERENCE_MODELS else {
            f"cold/{k}": v for k, v in m.get("cold_start", {}).items() if k != "n_items"}
        results[label] = {**m["metrics"], **cold}
        summaries[label] = {k: m[k] for k in ("best_epoch", "epochs", "train_seconds")}
        summaries[label]["cold_items"] = m.get("cold_start", {}).get("n_items")
        kinds[label] = "reference" if name in REFERENCE_MODELS else kind
        r = results[label]
        print(f"      {label:<14} Recall@20 {r['Recall@20']:.4f}  discovery {_fmt(r.get('discovery/Recall@20'))}"
              f"  cold Recall@10 {_fmt(r.get('cold/Recall@10'))}"
              f"  ({m['train_seconds']:.1f}s, best epoch {m['best_epoch']})", flush=True)

    for name in models:
        run(name, name, DEMO_MODEL_ARGS.get(name, {}))

    pretrain_line = None
    if quick:
        _content_on_world_features(run, n_stages)
    elif "lightgcn" in results or "lightgcn-mb" in results:
        pretrain_line = _multimodal(out, data_dir, seed, run, n_stages)
    else:
        print(f"[3/{n_stages}]-[4/{n_stages}] skipped: the multimodal stages align to a LightGCN run, "
              "which is not installed")

    print(f"[5/{n_stages}] report (tables, curves, embedding map, modality weights)", flush=True)
    facts = check_facts(results, kinds)
    print_metrics_table({n: {k: r[k] for k in TABLE if k in r} for n, r in results.items()},
                        title="test, full ranking (cold/*: each user's cold test items among all cold test items)")
    for f in facts.values():
        if f["holds"] is None:
            print(f"      not checked (a side is missing): {f['claim']}")
        else:
            print(f"      {'holds' if f['holds'] else 'does NOT hold'}: {f['claim']} ({f['best']} "
                  f"{f['best_value']:.4f} vs {f['versus']} {f['versus_value']:.4f}, {f['metric']})")
    from mmrec.demo_report import write_reports
    report = {"data": info, "preset": preset, "seed": seed, "quick": quick, "split": DEMO_SPLIT,
              "split_args": DEMO_SPLIT_ARGS, "table": TABLE, "kinds": kinds, "results": results,
              "runs": summaries, "facts": facts, "pretrain": pretrain_line}
    figures = write_reports(out, world, report, seed, map_method="pca" if quick else "tsne")
    report["figures"] = figures
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "report.json", report)
    print(f"\nreport: {out / 'report.html'} (also report.md, report.json); took {report['seconds']}s")
    return json.loads((out / "report.json").read_text())  # what is on disk, JSON types throughout


def _content_on_world_features(run: Callable[..., None], n_stages: int) -> None:
    """``--quick`` stages 3-4: content models on the synthetic world's stored features (no pre-training)."""
    from mmrec.demo_multimodal import QUICK_CONTENT_MODELS
    print(f"[3/{n_stages}] quick: no pre-training; content models read the world's stored item features")
    print(f"[4/{n_stages}] training content models on those features (two-step)", flush=True)
    for label, name, model_args in QUICK_CONTENT_MODELS:
        if name in MODELS:
            run(label, name, model_args, kind="content")


def _multimodal(out: Path, data_dir: Path, seed: int, run: Callable[..., None], n_stages: int) -> str:
    """Stages 3-4: pre-train encoders against a LightGCN run, extract features, train content models."""
    from mmrec.demo_multimodal import DEMO_CONTENT_MODELS, extract_stage, pretrain_stage, retrieval_line

    target = "lightgcn-mb" if (out / "runs" / "lightgcn-mb").exists() else "lightgcn"
    print(f"[3/{n_stages}] pre-training small image / text / audio encoders, aligned to {target}'s item embeddings",
          flush=True)
    t0 = time.perf_counter()
    metrics = pretrain_stage(data_dir, out / "runs" / target, out / "pretrain", seed)
    line = retrieval_line(metrics)
    print(f"      {line}  ({time.perf_counter() - t0:.1f}s, {metrics['steps']} steps)")
    features = extract_stage(data_dir, out / "pretrain", out / "features.safetensors")
    print(f"      extracted frozen item features -> {features}")
    print(f"[4/{n_stages}] training content models on those features (two-step)", flush=True)
    for label, name, model_args in DEMO_CONTENT_MODELS:
        if name in MODELS:
            run(label, name, model_args, kind="content", features=[str(features)])
    return f"aligned to {target}: {line}"
