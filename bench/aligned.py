"""Does alignment pre-training pay downstream? (issue 13, docs/results.md "Aligned features").

Per seed and split, everything at its recipe with early stopping on validation:

1. ``lightgcn`` trained on the split's training rows (the alignment target);
2. ``mmrec pretrain --config configs/pretrain-ml100k.yaml`` aligned to that run (frozen
   EfficientNet-Lite0 + MiniLM, MLP heads; on the cold split the cold items are held out);
3. ``lightgcn+aligned``: the same LightGCN weights, cold items scored by their aligned vectors
   (``mmrec evaluate --cold-items aligned:PRETRAIN``; cold split only);
4. the pre-training run's ``item_features.safetensors`` (= ``mmrec extract --run PRETRAIN``):
   aligned per-modality features;
5. content models (``--models``, default VBPR and FREEDOM) on the dataset's raw frozen
   features (``MODEL[raw]``) and on the aligned ones (``MODEL[aligned]``), plus any
   ``--variant LABEL=MODEL:KEY=VALUE;...`` on the aligned features (e.g. an enhancement), and
   ``--pair LABEL=MODEL:...`` on both (e.g. LightGCN + attention over the features).

Rows go to ``RUNS/results.jsonl`` in ``bench/results.py``'s format (finished ones are skipped
on rerun); tabulate with ``python bench/results.py --table RUNS/results.jsonl ...``.

    OMP_NUM_THREADS=1 python bench/aligned.py --data ../shared/data/ml100k-mm --split cold \\
        --seeds 0 1 2 --runs runs/aligned/cold
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from results import parse_variants  # noqa: E402


def _done(results: Path) -> set[tuple[str, int]]:
    if not results.exists():
        return set()
    return {(r["model"], r["seed"]) for r in map(json.loads, results.read_text().splitlines()) if r}


def _append(results: Path, row: dict) -> None:
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"    {row['model']} seed {row['seed']}: " + json.dumps(
        {k: row[k] for k in ("best_epoch", "epochs", "seconds") if k in row}), flush=True)


def _row(label: str, seed: int, metrics: dict, data: str, seconds: float, **extra) -> dict:
    row = {"data": Path(data).name, "model": label, "seed": seed, "full": metrics["metrics"],
           "best_epoch": metrics.get("best_epoch"), "epochs": metrics.get("epochs"),
           "split_kind": metrics.get("split_kind"), "seconds": round(seconds, 1), **extra}
    if "cold_start" in metrics:
        row["cold_start"] = metrics["cold_start"]
    return row


def train_one(label: str, model: str, seed: int, args: argparse.Namespace, out: Path, features: list[str],
              sets: list[str]) -> dict:
    from mmrec.train.config import build_run_config
    from mmrec.train.run import train

    cli = {"model": model, "data": args.data, "seed": seed, "out": str(out), "protocol": "full",
           "split": args.split, "features": features}
    t0 = time.perf_counter()
    metrics = train(build_run_config(None, cli, ["train.progress=false", *sets]))
    return _row(label, seed, metrics, args.data, time.perf_counter() - t0, overrides=sets, base_model=model)


def run_seed(seed: int, args: argparse.Namespace, results: Path) -> None:
    from mmrec.pretrain.config import build_pretrain_config
    from mmrec.pretrain.run import pretrain
    from mmrec.train.run import evaluate

    done = _done(results)
    root = Path(args.runs) / f"seed{seed}"
    lgcn, pre = root / "lightgcn", root / "pretrain"
    stamp = lambda what: print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: {what}", flush=True)  # noqa: E731
    if ("lightgcn", seed) not in done:
        stamp("lightgcn")
        _append(results, train_one("lightgcn", "lightgcn", seed, args, lgcn, [], []))
    if not (pre / "metrics.json").exists():
        stamp("pretrain")
        sets = [f"behavior.run={lgcn}", "train.progress=false", *args.pretrain_set]
        if args.split != "cold":
            sets += ["heldout.items=null"]
        t0 = time.perf_counter()
        pretrain(build_pretrain_config(REPO / "configs" / "pretrain-ml100k.yaml",
                                       {"data": args.data, "out": str(pre), "seed": seed, "split": args.split}, sets))
        print(f"    pretrain {time.perf_counter() - t0:.0f} s", flush=True)
    if args.split == "cold" and ("lightgcn+aligned", seed) not in done:
        stamp("lightgcn + aligned cold items")
        t0 = time.perf_counter()
        m = evaluate(lgcn, cold_items=f"aligned:{pre}", metrics_out=root / "lightgcn-aligned.json")
        _append(results, _row("lightgcn+aligned", seed, m, args.data, time.perf_counter() - t0,
                              cold_items=m.get("cold_items")))
    aligned = pre / "item_features.safetensors"  # = `mmrec extract --run PRETRAIN` (tests/test_cold_items.py)
    variants = parse_variants(args.variant)
    pairs = {m: (m, []) for m in args.models} | parse_variants(args.pair)
    for name, (model, sets) in pairs.items():
        for label, features in ((f"{name}[raw]", []), (f"{name}[aligned]", [str(aligned)])):
            if (label, seed) not in done:
                stamp(label)
                _append(results, train_one(label, model, seed, args, root / label, features + args.extra_features,
                                           sets))
    for label, (model, sets) in variants.items():
        if (label, seed) not in done:
            stamp(label)
            _append(results, train_one(label, model, seed, args, root / label, [str(aligned), *args.extra_features],
                                       sets))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="cold", choices=("cold", "random"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", required=True)
    p.add_argument("--models", nargs="*", default=["vbpr", "freedom"])
    p.add_argument("--variant", action="append", help="LABEL=MODEL[:KEY=VALUE;...] on the aligned features")
    p.add_argument("--pair", action="append", help="LABEL=MODEL[:KEY=VALUE;...] on raw and on aligned features "
                                                   "(rows LABEL[raw], LABEL[aligned])")
    p.add_argument("--pretrain-set", action="append", default=[], help="extra --set for mmrec pretrain")
    p.add_argument("--extra-features", action="append", default=[],
                   help="another feature file for the --pair / --variant runs (e.g. item attributes)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        run_seed(seed, args, runs / "results.jsonl")


if __name__ == "__main__":
    main()
