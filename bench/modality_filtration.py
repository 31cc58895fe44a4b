"""Issue 18: does ``modality-gate`` keep VBPR from losing cold Recall@20 when modalities are added?

VBPR on ml100k-mm's cold split (docs/results.md, "Item attributes": same protocol and
15-epoch budget) with the year + genre attributes alone and with text + image +
attributes, each without a filtration and with ``--filtration modality-gate``
(optionally also with ``model.gate_holdout`` / ``model.modality_dropout``). Every run is
an ordinary ``mmrec train`` through ``bench/results.py`` (selection on validation only;
finished runs are skipped on rerun); the table adds the learned modality weights from
each run's ``metrics.json``.

    mmrec data attributes ../shared/data/ml100k-mm --columns year genres \\
        --out runs/ml100k-attr/attributes.safetensors
    python bench/modality_filtration.py --data ../shared/data/ml100k-mm \\
        --features runs/ml100k-attr/attributes.safetensors --runs runs/modality-filtration --seeds 0 --threads 1 \\
        --holdout 0.1
    python bench/modality_filtration.py --runs runs/modality-filtration --table   # the table only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results  # noqa: E402  (bench/results.py: run_one, collect, metric_value)

FEATURES = {"attributes": "[attributes]", "text+image+attributes": "[text,image,attributes]"}


def variants(dropout: float | None = None, holdout: float | None = None) -> dict[str, str]:
    """label -> ``--variant`` spec (bench/results.py syntax)."""
    out = {}
    for name, feats in FEATURES.items():
        base = f"model.features={feats}"
        gate = f"{base};model.filtration=modality-gate"
        out[f"vbpr[{name}]"] = f"vbpr:{base}"
        out[f"vbpr[{name}]+gate"] = f"vbpr:{gate}"
        if holdout:
            out[f"vbpr[{name}]+gate+holdout{holdout:g}"] = f"vbpr:{gate};model.gate_holdout={holdout}"
        if dropout:
            out[f"vbpr[{name}]+gate+drop{dropout:g}"] = f"vbpr:{gate};model.modality_dropout={dropout}"
    return out


def weights_of(run_dir: Path) -> dict[str, float] | None:
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    w = json.loads(path.read_text()).get("modality_weights")
    return {m: v["mean"] for m, v in w.items()} if w else None


def table(runs: Path, labels: list[str]) -> str:
    rows = [json.loads(line) for line in (runs / "results.jsonl").read_text().splitlines() if line.strip()]
    by = defaultdict(list)
    for r in rows:
        by[r["model"]].append(r)
    cols = ["full:Recall@20", "cold:Recall@20", "cold:NDCG@20", "cold:Recall@20/random"]
    out = ["| variant | seeds | " + " | ".join(cols)
           + " | modality weights (mean over items) | epochs (best/run) | s/run |",
           "|---|---|" + "---|" * len(cols) + "---|---|---|"]
    for label in labels:
        rs = by.get(label)
        if not rs:
            continue
        cells = []
        for c in cols:
            vals = [v for v in (results.metric_value(r, c) for r in rs) if v is not None]
            cells.append("–" if not vals else f"{vals[0]:.4f}" if len(vals) == 1
                         else f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}")
        ws = [weights_of(runs / r["data"] / label / f"seed{r['seed']}") for r in rs]
        ws = [w for w in ws if w]
        wcell = "–" if not ws else ", ".join(f"{m} {statistics.mean(w[m] for w in ws):.2f}" for m in ws[0])
        epochs = "; ".join(f"{r['best_epoch']}/{r['epochs']}" for r in rs)
        secs = statistics.mean(r["train_seconds"] for r in rs)
        out.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + f" | {wcell} | {epochs} | {secs:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/ml100k-mm")
    ap.add_argument("--features", nargs="+", help="the attributes feature file (mmrec data attributes)")
    ap.add_argument("--runs", type=Path, default=Path("runs/modality-filtration"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=None, help="also run the gate with this modality_dropout")
    ap.add_argument("--holdout", type=float, default=None, help="also run the gate with this model.gate_holdout")
    ap.add_argument("--only", nargs="+", help="run only these variant labels")
    ap.add_argument("--table", action="store_true", help="print the table of --runs and exit")
    args = ap.parse_args()
    specs = variants(args.dropout, args.holdout)
    labels = args.only or list(specs)
    if not args.table:
        if not args.features:
            sys.exit("--features FILE (the attributes table) is required to train")
        unknown = sorted(set(labels) - set(specs))
        if unknown:
            sys.exit(f"unknown variant(s) {unknown}; known: {list(specs)}")
        ns = argparse.Namespace(data=[args.data], models=labels, seeds=args.seeds, protocol="full", also=[],
                                split="cold", epochs=args.epochs, set=["train.eval_every=3"], model_set=None,
                                variant=[f"{k}={v}" for k, v in specs.items()], threads=args.threads,
                                features=args.features, runs=str(args.runs))
        results.collect(ns)
    print(table(args.runs, labels if args.only else list(specs) + _extra(args.runs, specs)))


def _extra(runs: Path, specs: dict[str, str]) -> list[str]:
    """Labels present in the results file beyond the default set (e.g. dropout runs), in file order."""
    path = runs / "results.jsonl"
    seen: list[str] = []
    if path.exists():
        for line in path.read_text().splitlines():
            label = json.loads(line)["model"]
            if label not in specs and label not in seen:
                seen.append(label)
    return seen


if __name__ == "__main__":
    main()
