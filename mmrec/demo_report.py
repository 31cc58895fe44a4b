"""The demo's report: ``report.html`` (one self-contained page), ``report.md`` and the PNGs.

Figures: the comparison bars (a distinct colour per model), every run's training curves
(from its ``log.jsonl``), the learned modality weights of the attention-fusion runs, and a
2-D map of item embeddings coloured by the synthetic world's true category, so one can see
an ID model scatter the cold items and a content model place them with their kind.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mmrec.datasets.schema import Dataset
from mmrec.io import atomic_path
from mmrec.train.report import (html_table, model_colors, plot_comparison, plot_curves, plot_embedding_map,
                                plot_modality_weights, png_data_uri, write_html_report)

#: which runs the embedding map shows: the first present of each tuple (an ID model, a content model)
MAP_RUNS = (("lightgcn-mb", "lightgcn", "bprmf"), ("lightgcn+attn", "vbpr", "freedom"))
LABEL_ATTRIBUTE = "category"

_COLUMN_NOTES = {
    "Recall@20": "whole test set", "NDCG@20": "whole test set",
    "repeat/Recall@20": "test items the user had in training (viewed / carted)",
    "discovery/Recall@20": "test items new to the user (incl. cold items)",
    "cold/Recall@10": "each user's cold test items ranked among all cold test items",
    "cold/NDCG@10": "as cold/Recall@10",
}


def write_reports(out: Path, world: Dataset, report: dict[str, Any], seed: int,
                  map_method: str = "tsne") -> dict[str, str | None]:
    """Write the figures, ``report.md`` and ``report.html`` into ``out``; returns the figure files.

    ``map_method``: ``tsne`` (clusters read better) or ``pca`` (faster) for the embedding map.
    """
    from mmrec.demo import PLOTTED

    results, kinds = report["results"], report["kinds"]
    runs = out / "runs"
    colors = model_colors(list(results))
    figures: dict[str, Path | None] = {}
    figures["comparison"] = plot_comparison(results, PLOTTED, out / "comparison.png", colors=colors,
                                            title=f"synthetic:{report['preset']}, test split")
    logs = {n: _read_log(runs / n / "log.jsonl") for n in results}
    select = _select_metric(runs, results)
    figures["curves"] = plot_curves(logs, select, out / "curves.png", colors=colors)
    weights, map_tables, cold, ids = _inspect_runs(runs, kinds)
    figures["modality_weights"] = plot_modality_weights(weights, out / "modality_weights.png")
    figures["embedding_map"] = None
    if map_tables and ids is not None:
        labels, names = _true_labels(world, ids)
        if labels is not None:
            figures["embedding_map"] = plot_embedding_map(
                map_tables, labels, names, out / "embedding_map.png", highlight=cold,
                highlight_name="cold test item", method=map_method, seed=seed)
    report["modality_weights"] = weights
    files = {k: (p.name if p is not None else None) for k, p in figures.items()}
    _write_markdown(out / "report.md", report, files)
    _write_html(out / "report.html", report, figures, select, map_method)
    return files


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _select_metric(runs: Path, results: dict[str, Any]) -> str:
    for name in results:
        path = runs / name / "metrics.json"
        if path.exists():
            return json.loads(path.read_text()).get("select") or "Recall@20"
    return "Recall@20"


def _inspect_runs(runs: Path, kinds: dict[str, str]) -> tuple[dict[str, dict[str, float]], dict[str, Any],
                                                               np.ndarray | None, list[str] | None]:
    """Modality weights of the runs with a weighting fusion, and the embedding tables for the map.

    Runs are rebuilt with :meth:`mmrec.Recommender.load` (same data, split and weights); the
    fusion keeps the weights of its last call (:mod:`mmrec.fusion.attention`), so one scoring
    pass over the catalogue fills them.
    """
    import torch

    from mmrec.datasets.features import load_feature_file
    from mmrec.recommend import Recommender

    weights: dict[str, dict[str, float]] = {}
    ds: Dataset | None = None
    for name, kind in kinds.items():
        if kind != "content" or not (runs / name / "best.safetensors").exists():
            continue
        saved = json.loads((runs / name / "metrics.json").read_text()).get("modality_weights")
        if saved:  # a modality-gate filtration reports its own weights
            weights[name] = {m: float(v["mean"]) if isinstance(v, dict) else float(v) for m, v in saved.items()}
            continue
        rec = Recommender.load(runs / name)
        ds = rec.data
        fusion = getattr(getattr(rec.model, "content", None), "fusion", None)
        if not hasattr(fusion, "mean_weights"):
            continue
        with torch.no_grad():
            rec.model.prepare_eval()
            rec.model.score_all(torch.arange(min(ds.n_users, 8)))
        weights[name] = {m: v for m, v in fusion.mean_weights().items() if not math.isnan(v)}
    tables: dict[str, Any] = {}
    for choices in MAP_RUNS:
        for name in choices:
            path = runs / name / "item_embeddings.safetensors"
            if name in kinds and path.exists():
                if ds is None:
                    ds = Recommender.load(runs / name).data
                table = load_feature_file(path, list(ds.item_ids))
                tables[f"{name} ({kinds[name]})"] = next(iter(table.values())).features.numpy()
                break
    if ds is None:
        return weights, tables, None, None
    cold = np.zeros(ds.n_items, bool)
    if ds.cold_items is not None:
        cold[np.asarray(ds.cold_items)] = True
    return weights, tables, cold, [str(i) for i in ds.item_ids]


def _true_labels(world: Dataset, ids: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """The world's true ``category`` of each item of ``ids`` (None if the world has no such truth)."""
    truth = world.ground_truth or {}
    attrs = truth.get("attributes", {})
    if LABEL_ATTRIBUTE not in attrs:
        return None, []
    index = {str(i): k for k, i in enumerate(world.item_ids)}
    labels = np.asarray(attrs[LABEL_ATTRIBUTE])[[index[i] for i in ids]]
    return labels, list(truth["attribute_values"][LABEL_ATTRIBUTE])


def _fact_lines(report: dict[str, Any]) -> list[tuple[bool | None, str]]:
    lines = []
    for f in report["facts"].values():
        if f["holds"] is None:
            lines.append((None, f"{f['claim']}: not checked (a side is missing)"))
            continue
        lines.append((f["holds"], f"{f['claim']}: {f['best']} {f['best_value']:.4f} vs {f['versus']} "
                                  f"{f['versus_value']:.4f} ({f['metric']})"))
    return lines


def _intro(report: dict[str, Any]) -> str:
    info = report["data"]
    counts = ", ".join(f"{b} {n:,}" for b, n in info["interactions"].items())
    return (f"synthetic:{report['preset']} (seed {report['seed']}): {info['n_users']:,} users, "
            f"{info['n_items']:,} items; {counts}. Split '{report['split']}': per user a random 10% of warm "
            f"purchases are test; {report['split_args']['share']:.0%} of the bought items are cold (every row "
            f"held out; half for valid, half for test). Full ranking; models selected on valid."
            + (" Quick mode: content models read the world's stored features (no pre-training)."
               if report["quick"] else ""))


def _write_markdown(path: Path, report: dict[str, Any], files: dict[str, str | None]) -> None:
    cols = report["table"]
    lines = [f"# mmrec demo: synthetic:{report['preset']}", "", _intro(report), "", "## What it shows", ""]
    for holds, text in _fact_lines(report):
        lines.append(f"- {'holds' if holds else 'NOT checked' if holds is None else 'does NOT hold'}: {text}")
    lines += ["", "## Results (test)", "", "| model | kind | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for name, r in report["results"].items():
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), float) and not math.isnan(r[c]) else "–" for c in cols]
        lines.append(f"| {name} | {report['kinds'][name]} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- `{c}`: {_COLUMN_NOTES[c]}" for c in cols if c in _COLUMN_NOTES]
    if report.get("pretrain"):
        lines += ["", f"Pre-training: {report['pretrain']}"]
    lines.append("")
    for key, title in (("comparison", "comparison"), ("curves", "training curves"),
                       ("modality_weights", "modality weights"), ("embedding_map", "item embeddings")):
        if files.get(key):
            lines.append(f"![{title}]({files[key]})")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _write_html(path: Path, report: dict[str, Any], figures: dict[str, Path | None], select: str,
                map_method: str) -> None:
    esc = html.escape

    def img(key: str, alt: str) -> str:
        p = figures.get(key)
        return f"<img alt='{esc(alt)}' src='{png_data_uri(p)}'>" if p is not None else ""

    facts = "".join(
        f"<li class='{'ok' if h else 'bad'}'>{'✓' if h else '✗' if h is False else '?'} {esc(t)}</li>"
        for h, t in _fact_lines(report))
    notes = {n: f" ({k})" for n, k in report["kinds"].items()}
    columns = "".join(f"<li><code>{esc(c)}</code>: {esc(_COLUMN_NOTES[c])}</li>"
                      for c in report["table"] if c in _COLUMN_NOTES)
    sections = [
        ("What it shows", f"<p>{esc(_intro(report))}</p><ul>{facts}</ul>"),
        ("Results (test, full ranking)",
         html_table(report["results"], report["table"], notes=notes) + f"<ul>{columns}</ul>"
         "<p>Best value of each column in bold. <i>reference</i> models are not trained: popularity and "
         "behavior-prior (\"buy what you carted or viewed\").</p>"),
        ("Comparison", img("comparison", "comparison")),
        ("Training curves", img("curves", "training curves")
         + f"<p>Loss per epoch (log scale) and {esc(select)} on valid, which selects each model's epoch.</p>"),
    ]
    if report.get("pretrain"):
        sections.append(("Pre-training", f"<p>{esc(report['pretrain'])}</p>"))
    if figures.get("modality_weights") is not None:
        sections.append(("Modality weights", img("modality_weights", "modality weights")
                         + "<p>Mean attention weight per modality over the items (MICRO attention fusion).</p>"))
    if figures.get("embedding_map") is not None:
        sections.append(("Item embeddings", img("embedding_map", "embedding map")
                         + f"<p>{'t-SNE' if map_method == 'tsne' else 'PCA'} of the runs' item embeddings, "
                         f"coloured by the world's true {LABEL_ATTRIBUTE}; crosses are cold test items.</p>"))
    runs = {n: {"best epoch": float(s["best_epoch"]), "epochs": float(s["epochs"]),
                "train seconds": float(s["train_seconds"])} for n, s in report["runs"].items()}
    sections.append(("Runs", html_table(runs, ["best epoch", "epochs", "train seconds"], best=False, fmt="{:g}")))
    write_html_report(path, f"mmrec demo: synthetic:{report['preset']}", sections)
