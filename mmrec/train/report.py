"""Plots people would rather look at than read (training curves, model comparisons, embedding
maps, modality weights) and a self-contained HTML page to put them in."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mmrec.io import atomic_path  # noqa: E402


def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path, select: str) -> Path | None:
    """Loss per epoch and the selection metric on valid, side by side."""
    epochs = [h["epoch"] for h in history if "loss" in h]
    if not epochs:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(epochs, [h["loss"] for h in history if "loss" in h], marker="o", ms=3)
    a.set(xlabel="epoch", ylabel="training loss", title="loss")
    ev = [(h["epoch"], h["valid"][select]) for h in history if "valid" in h and select in h["valid"]]
    if ev:
        b.plot(*zip(*ev), marker="o", ms=3, color="tab:green")
    b.set(xlabel="epoch", ylabel=f"valid {select}", title="selection metric (valid)")
    fig.tight_layout()
    return _save(fig, path)


def model_colors(names: Sequence[str]) -> dict[str, Any]:
    """One distinct colour per name from a qualitative colormap (tab10, or tab20 past 10 names).

    The same mapping is used by every figure of a report, so a model keeps its colour.
    Past 20 names colours repeat (matplotlib has no larger qualitative map).
    """
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def plot_comparison(results: Mapping[str, Mapping[str, float]], metrics: Sequence[str], path: str | Path,
                    title: str = "", colors: Mapping[str, Any] | None = None) -> Path:
    """Grouped bars: one group per metric, one bar per model (a distinct colour each)."""
    import numpy as np
    names = list(results)
    colors = colors or model_colors(names)
    x = np.arange(len(metrics))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(metrics) + 2.5), 3.6))
    for i, name in enumerate(names):
        values = [results[name].get(m, float("nan")) for m in metrics]  # a missing part is no bar, not a 0
        ax.bar(x + i * width, values, width, label=name, color=colors[name])
    ax.set_xticks(x + width * (len(names) - 1) / 2, metrics)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], select: str, path: str | Path,
                colors: Mapping[str, Any] | None = None) -> Path | None:
    """Every run's training loss (log scale: models' losses differ in size) and valid ``select``
    per epoch, read from the runs' ``log.jsonl`` records; runs with no loss (closed form) are left out."""
    logs = {n: h for n, h in logs.items() if any("loss" in r for r in h)}
    if not logs:
        return None
    colors = colors or model_colors(list(logs))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, history in logs.items():
        loss = [(r["epoch"], r["loss"]) for r in history if "loss" in r]
        a.plot(*zip(*loss), color=colors[name], label=name, lw=1.2)
        ev = [(r["epoch"], r["valid"][select]) for r in history if select in r.get("valid", {})]
        if ev:
            b.plot(*zip(*ev), color=colors[name], marker="o", ms=2.5, lw=1.2, label=name)
    a.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    b.set(xlabel="epoch", ylabel=f"valid {select}", title="selection metric on valid")
    b.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def plot_modality_weights(weights: Mapping[str, Mapping[str, float]], path: str | Path) -> Path | None:
    """Mean learned weight of each modality (e.g. attention fusion), one group of bars per model."""
    import numpy as np
    weights = {n: w for n, w in weights.items() if w}
    if not weights:
        return None
    modalities = sorted({m for w in weights.values() for m in w})
    x = np.arange(len(weights))
    width = 0.8 / len(modalities)
    colors = model_colors(modalities)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(weights) + 2), 3.0))
    for j, m in enumerate(modalities):
        ax.bar(x + j * width, [w.get(m, float("nan")) for w in weights.values()], width, label=m, color=colors[m])
    ax.set_xticks(x + width * (len(modalities) - 1) / 2, list(weights))
    ax.set(ylabel="mean weight over items", title="learned modality weights")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def plot_embedding_map(tables: Mapping[str, Any], labels: Any, label_names: Sequence[str], path: str | Path,
                       highlight: Any = None, highlight_name: str = "cold", method: str = "tsne",
                       seed: int = 0) -> Path:
    """A 2-D map (t-SNE or PCA, scikit-learn) of each item-embedding table, points coloured by
    ``labels`` (e.g. the synthetic world's true category); ``highlight`` (bool [n]) items are
    drawn as crosses. Same seed -> same map."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method not in ("tsne", "pca"):
        raise ValueError(f"embedding map method must be tsne or pca, not '{method}'")
    labels = np.asarray(labels)
    mark = np.zeros(len(labels), bool) if highlight is None else np.asarray(highlight, bool)
    colors = model_colors(list(label_names))
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables) + 1.2, 4.0), squeeze=False)
    for ax, (title, emb) in zip(axes[0], tables.items()):
        emb = np.asarray(emb, dtype=np.float64)
        if len(emb) != len(labels):
            raise ValueError(f"embedding table '{title}' has {len(emb)} rows, the labels {len(labels)}")
        if method == "pca":
            xy = PCA(n_components=2, random_state=seed).fit_transform(emb)
        else:
            xy = TSNE(n_components=2, init="pca", random_state=seed,
                      perplexity=min(30.0, max(2.0, (len(emb) - 1) / 3))).fit_transform(emb)
        for k, name in enumerate(label_names):
            for sel, marker, size in ((~mark, "o", 10), (mark, "x", 22)):
                pts = xy[(labels == k) & sel]
                if len(pts):
                    ax.scatter(pts[:, 0], pts[:, 1], s=size, marker=marker, color=colors[name],
                               label=name if marker == "o" else None, linewidths=0.9)
        ax.set(title=title, xticks=[], yticks=[])
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
                       title="x = " + highlight_name if mark.any() else None, title_fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def png_data_uri(path: str | Path) -> str:
    """A PNG file as a ``data:`` URI, so an HTML report needs no files beside it."""
    import base64
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], best: bool = True,
               notes: Mapping[str, str] | None = None, fmt: str = "{:.4f}") -> str:
    """An HTML table, one row per name; the best value of each column in bold; missing cells '–'."""
    import html
    import math

    notes = notes or {}
    top = {}
    for c in columns:
        vals = [r[c] for r in rows.values() if isinstance(r.get(c), (int, float)) and not math.isnan(r[c])]
        top[c] = max(vals) if vals and best else None
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", *columns])
    body = []
    for name, r in rows.items():
        cells = [f"<td>{html.escape(name)}{html.escape(notes.get(name, ''))}</td>"]
        for c in columns:
            v = r.get(c)
            if not isinstance(v, (int, float)) or math.isnan(v):
                cells.append("<td>–</td>")
            else:
                text = fmt.format(v)
                cells.append(f"<td><b>{text}</b></td>" if v == top[c] else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
.ok{color:#1a7f37}.bad{color:#b42318}code{background:#f3f3f3;padding:0 3px}"""


def write_html_report(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """One self-contained HTML page (write images into it with :func:`png_data_uri`), written atomically.

    ``sections``: (heading, HTML body) pairs, in order.
    """
    import html
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_HTML_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{body}")
    parts.append("</body></html>\n")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
