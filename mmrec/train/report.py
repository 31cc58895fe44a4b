"""Plots people would rather look at than read: training curves and model comparisons."""

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


def plot_comparison(results: Mapping[str, Mapping[str, float]], metrics: Sequence[str], path: str | Path,
                    title: str = "") -> Path:
    """Grouped bars: one group per metric, one bar per model."""
    import numpy as np
    names = list(results)
    x = np.arange(len(metrics))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(metrics) + 2), 3.4))
    for i, name in enumerate(names):
        ax.bar(x + i * width, [results[name].get(m, 0.0) for m in metrics], width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, metrics)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
