"""Result tables for docs/results.md: train every (dataset, model, seed), then tabulate mean ± std.

Each run is an ordinary ``mmrec train`` (selection and early stopping on the
validation split only; the test split is scored once, with the selected weights).
With ``--also`` the same selected weights are re-scored under a second protocol
(``mmrec evaluate --protocol``), so sampled HR/NDCG and full-ranking Recall/NDCG come
from one training run. Finished runs are skipped on rerun (``RUNS/<data>/<model>/seed<k>``),
so the script can be stopped and resumed.

    python bench/results.py --data ../shared/data/tmall ../shared/data/beibei-mini \\
        --models pop lightgcn lightgcn-mb cigf mbgmn --seeds 0 1 2 --protocol sampled --also full \\
        --runs runs/results --epochs 60
    python bench/results.py --table runs/results/results.jsonl --metrics sampled:HR@10 sampled:NDCG@10 \\
        full:Recall@20 full:NDCG@20

Variants: ``--variant LABEL=MODEL[:KEY=VALUE[;KEY=VALUE...]]`` trains MODEL with those
``--set`` overrides and stores the row under ``"model": LABEL`` (plus ``"base_model"`` and
``"overrides"``), so one results.jsonl holds e.g. ``vbpr[text]``, ``vbpr[image]`` and
``vbpr[text+image]``; a label is run wherever ``--models`` names it. ``--model-set``
lines apply by label or by base model name::

    python bench/results.py --data ../shared/data/ml100k-mm --split random --runs runs/ml100k \\
        --variant 'vbpr[text]=vbpr:model.features=[text]' --variant 'vbpr[text+image]=vbpr' \\
        --models lightgcn 'vbpr[text]' 'vbpr[text+image]'

Cold-start columns (``--split cold`` runs; read from the row's ``cold_start`` block):
``cold:Recall@20`` (measured), ``cold:random:Recall@20`` (the expectation of a uniformly
random scorer, ``min(K, n) / n`` with ``n = cold_start["n_items"]``: each user's held-out
cold items are ranked among all n cold items, none of them masked, and Recall divides by
the user's held-out count, so a random top-K holds K/n of them in expectation) and
``cold:Recall@20/random`` (their ratio, per run, then mean ± std).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path


def parse_variants(specs: list[str] | None) -> dict[str, tuple[str, list[str]]]:
    """``LABEL=MODEL[:KEY=VALUE[;KEY=VALUE...]]`` -> {label: (model, [overrides])}."""
    out: dict[str, tuple[str, list[str]]] = {}
    for spec in specs or []:
        label, eq, rest = spec.partition("=")
        model, _, sets = rest.partition(":")
        if not eq or not label or not model:
            sys.exit(f"--variant expects LABEL=MODEL[:KEY=VALUE[;KEY=VALUE...]], got '{spec}'")
        overrides = [x.strip() for x in sets.split(";") if x.strip()]
        bad = [x for x in overrides if "=" not in x]
        if bad:
            sys.exit(f"--variant {label}: overrides must be KEY=VALUE, got {bad}")
        if label in out:
            sys.exit(f"--variant {label} given twice")
        out[label] = (model, overrides)
    return out


def run_one(data: str, model: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """Train ``model`` (a registry name or a ``--variant`` label) once and return its results row."""
    from mmrec.train.config import build_run_config
    from mmrec.train.run import evaluate, train

    base, variant_sets = parse_variants(args.variant).get(model, (model, []))
    sets = list(args.set or [])
    sets.append("train.progress=false")
    sets += variant_sets
    cli = {"model": base, "data": data, "seed": seed, "out": str(out), "protocol": args.protocol,
           "split": args.split, "epochs": args.epochs, "features": list(args.features or [])}
    names = {model, base}
    extra = [s for s in (args.model_set or []) if s.split(":", 1)[0] in names]
    sets += [s.split(":", 1)[1] for s in extra]
    cfg = build_run_config(None, cli, sets)
    t0 = time.perf_counter()
    metrics = train(cfg)
    row = {"data": Path(data).name if not data.startswith("synthetic:") else data, "model": model, "seed": seed,
           args.protocol: metrics["metrics"], "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs"],
           "train_seconds": metrics["train_seconds"], "select": metrics["select"],
           "split_kind": metrics["split_kind"], "epoch_budget": cfg.train.epochs}
    if base != model:
        row["base_model"] = base
        row["overrides"] = variant_sets
    if "cold_start" in metrics:
        row["cold_start"] = metrics["cold_start"]
    for protocol in args.also or []:
        if protocol != args.protocol:
            row[protocol] = evaluate(out, protocol=protocol)["metrics"]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def collect(args: argparse.Namespace) -> None:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    results = runs / "results.jsonl"
    done = set()
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["data"], r["model"], r["seed"]))
    for data in args.data:
        name = Path(data).name if not data.startswith("synthetic:") else data
        for model in args.models:
            for seed in args.seeds:
                if (name, model, seed) in done:
                    continue
                out = runs / name.replace(":", "-") / model / f"seed{seed}"
                print(f"[{time.strftime('%H:%M:%S')}] {name} {model} seed {seed} ...", flush=True)
                row = run_one(data, model, seed, args, out)
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"    {json.dumps({k: row[k] for k in row if k not in ('data', 'model', 'seed')})}", flush=True)


def metric_value(row: dict, spec: str) -> float | None:
    """One number of a results row: ``PROTOCOL:METRIC`` or a ``cold:...`` column (see module doc)."""
    proto, _, key = spec.partition(":")
    if proto != "cold":
        return row[proto][key] if proto in row and key in row[proto] else None
    block = row.get("cold_start")
    if not block:
        return None
    name = key.removeprefix("random:").removesuffix("/random")
    measured = block.get(name)
    random = None
    if "@" in name and block.get("n_items"):
        n, k = int(block["n_items"]), int(name.rsplit("@", 1)[1])
        if name.startswith("Recall@"):
            random = min(k, n) / n
    if key.startswith("random:"):
        return random
    if key.endswith("/random"):
        return measured / random if measured is not None and random else None
    return measured


def table(path: Path, metrics: list[str], models: list[str] | None) -> str:
    """Markdown: one block per dataset, rows = models, cells = mean ± std over seeds."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["data"]][r["model"]].append(r)
    out = []
    for data, per_model in by.items():
        out.append(f"\n**{data}**\n")
        out.append("| model | seeds | " + " | ".join(metrics) + " | epochs (best/run) |")
        out.append("|---|---|" + "---|" * len(metrics) + "---|")
        order = models or list(per_model)
        for model in order:
            rs = per_model.get(model)
            if not rs:
                continue
            cells = []
            for m in metrics:
                vals = [v for v in (metric_value(r, m) for r in rs) if v is not None]
                if not vals:
                    cells.append("–")
                    continue
                if len(vals) == 1:  # one seed: no spread to report (a "± 0.0000" would claim one)
                    cells.append(f"{vals[0]:.4f}")
                    continue
                cells.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}")
            epochs = "; ".join(f"{r['best_epoch']}/{r['epochs']}" for r in rs)
            out.append(f"| {model} | {len(rs)} | " + " | ".join(cells) + f" | {epochs} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--protocol", default="full", choices=("full", "sampled"))
    ap.add_argument("--also", nargs="*", default=[], help="re-score the selected weights under these protocols too")
    ap.add_argument("--split", default=None)
    ap.add_argument("--epochs", type=int, default=None, help="epoch budget (early stopping may end sooner)")
    ap.add_argument("--set", action="append", help="override for every run, e.g. train.eval_every=2")
    ap.add_argument("--model-set", action="append",
                    help="override for one model: MODEL:key=value (MODEL: a registry name or a --variant label)")
    ap.add_argument("--variant", action="append",
                    help="LABEL=MODEL[:KEY=VALUE[;KEY=VALUE...]]: run MODEL with these overrides, row stored as LABEL")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the runs")
    ap.add_argument("--features", nargs="+", help="feature-store files attached to every run (as --features)")
    ap.add_argument("--runs", default="runs/results")
    ap.add_argument("--table", type=Path, help="print the markdown table of a results.jsonl and exit")
    ap.add_argument("--metrics", nargs="+", default=["full:Recall@20", "full:NDCG@20"],
                    help="PROTOCOL:METRIC, or cold:METRIC, cold:random:Recall@K, cold:Recall@K/random")
    args = ap.parse_args()
    if args.table:
        print(table(args.table, args.metrics, args.models))
        return
    if not args.data or not args.models:
        sys.exit("--data and --models are required (or --table FILE)")
    parse_variants(args.variant)  # fail on a malformed --variant before the first run
    collect(args)


if __name__ == "__main__":
    main()
