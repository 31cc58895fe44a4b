"""Pictures of a pre-training run: where items' aligned embeddings lie, and how held-out items rank.

Written by :func:`write_plots` at the end of ``mmrec pretrain`` (rank 0), after the
permuted-pair control when there is one, beside ``curves.png``:

* ``embedding_map.png``: a 2-D map (sklearn t-SNE, PCA init, seeded with the run seed; UMAP
  when ``umap-learn`` is installed and ``plots.map: umap``) of every item's fused aligned
  content embedding (:func:`mmrec.pretrain.retrieval.fuse`), coloured by a categorical item
  column (``plots.color_by``; ``auto``: the first of :data:`COLOR_COLUMNS` the items have),
  its 10 most frequent values in colour, the rest grey ``other``; held-out items have a
  black edge, so one sees whether items alignment never saw land among their genre. A map
  can draw clusters that are not there, so the number to compare is ``genre_silhouette``:
  sklearn's silhouette of the colour classes on the embeddings themselves (cosine), not
  on the 2-D points.
* ``heldout_curves.png``: held-out content -> behavior Recall@K for K = 1..min(200, n)
  (log K) of the model, the ridge reference, the permuted control (when run) and chance,
  from each held-out item's rank (:func:`mmrec.pretrain.heldout.content_ranks`,
  :func:`~mmrec.pretrain.heldout.ridge_ranks`); the ranks are kept in
  ``heldout_ranks.npz`` (the main run reads its control's from ``RUN/control``).

A plot never fails a finished run: each picture's error is recorded in ``metrics.json``
under ``plots.<picture>.error`` and printed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.io import atomic_path
from mmrec.pretrain.config import PretrainConfig
from mmrec.pretrain.heldout import ItemSplit, content_ranks
from mmrec.pretrain.retrieval import fuse

MAP_FILE = "embedding_map.png"
CURVES_FILE = "heldout_curves.png"
RANKS_FILE = "heldout_ranks.npz"
#: ``plots.color_by: auto`` takes the first of these item columns that the items have
COLOR_COLUMNS = ("genres", "genre", "category", "categories")
SPLIT = "split"            # colour by fit / valid / held-out instead of a column
N_COLOURS = 10             # the most frequent values in colour, the rest grey
OTHER = "other"
MAX_K = 200                # held-out curves: K = 1..min(MAX_K, n_heldout)
SILHOUETTE_MAX_ITEMS = 5000  # silhouette is O(n^2): a seeded sample above this
Log = Callable[[str], None]


# -- item columns --------------------------------------------------------------------------------
class ItemColumns:
    """Raw item columns of a dataset as strings, one per item of ``data.item_ids``.

    Looked up in the loaded text columns, then the items table (``items.tsv`` / ``items.csv``
    of ``data.root``, read by :func:`mmrec.datasets.canonical.read_item_rows`, the reader of
    ``mmrec data attributes``), then a synthetic world's ground-truth item attributes.
    """

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self._rows: Any = None
        self._read = False

    def _items_table(self) -> Any:
        if not self._read:
            self._read = True
            if self.data.root is not None:
                from mmrec.datasets.canonical import read_item_rows
                for name in ("items.tsv", "items.csv"):
                    path = Path(self.data.root) / name
                    if path.is_file():
                        self._rows = read_item_rows(path)
                        break
        return self._rows

    def names(self) -> list[str]:
        """Every column this lookup can find (for error messages)."""
        out = list(self.data.items.text)
        rows = self._items_table()
        if rows is not None:
            out += [c for c in rows.columns if c not in out]
        out += [c for c in (self.data.ground_truth or {}).get("attributes", {}) if c not in out]
        return out

    def get(self, column: str) -> list[str] | None:
        """The column's value for each item ('' where an item has none), or None if no source has it."""
        text = self.data.items.text.get(column)
        if text is not None:
            return [str(v) for v in text]
        rows = self._items_table()
        if rows is not None and column in rows.columns:
            where = {x: r for r, x in enumerate(rows.ids)}
            values = rows.columns[column]
            return [values[where[str(i)]] if str(i) in where else "" for i in self.data.item_ids]
        truth = self.data.ground_truth or {}
        attrs = truth.get("attributes", {})
        if column in attrs:
            names = truth.get("attribute_values", {}).get(column)
            return [str(names[int(v)]) if names is not None else str(v) for v in np.asarray(attrs[column])]
        return None


def first_value(cell: str, sep: str = "|") -> str:
    """``Action|Comedy`` -> ``Action``: a multi-valued cell is coloured by its first entry."""
    return cell.split(sep)[0].strip()


def color_column(data: Dataset, color_by: str) -> tuple[str, list[str]] | None:
    """``(column, first value per item)`` for ``plots.color_by``, or None (``split``, or ``auto`` and
    none of :data:`COLOR_COLUMNS` has a value). A named column no source has is an error naming it."""
    if color_by == SPLIT:
        return None
    cols = ItemColumns(data)
    wanted = COLOR_COLUMNS if color_by == "auto" else (color_by,)
    for c in wanted:
        values = cols.get(c)
        if values is not None and any(v.strip() for v in values):
            return c, [first_value(v) for v in values]
    if color_by != "auto":
        raise ConfigError(f"plots.color_by: {data.name} has no item column '{color_by}' with values "
                          f"(columns: {', '.join(cols.names()) or 'none'}); use auto or split")
    return None


def top_classes(labels: Sequence[str], n: int = N_COLOURS) -> tuple[list[str], list[str]]:
    """``(class per item, kept values)``: the ``n`` most frequent values (ties by name) keep their
    name, every other value and empty cells become :data:`OTHER`."""
    counts = Counter(v for v in labels if v)
    kept = [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
    keep = set(kept)
    return [v if v in keep else OTHER for v in labels], kept


def split_classes(n_items: int, split: ItemSplit | None) -> list[str]:
    """Colour classes without a column: ``fit`` / ``valid`` / ``held out`` (all ``items`` without a split)."""
    if split is None:
        return ["items"] * n_items
    out = np.array(["fit"] * n_items, dtype=object)
    out[split.valid] = "valid"
    out[split.heldout] = "held out"
    return out.tolist()


# -- numbers -------------------------------------------------------------------------------------
def genre_silhouette(x: np.ndarray, classes: Sequence[str], seed: int = 0,
                     max_items: int = SILHOUETTE_MAX_ITEMS) -> float | None:
    """sklearn's silhouette score (cosine) of ``x``'s rows grouped by ``classes``, :data:`OTHER` left
    out (a mix of classes, not one); None with fewer than 2 classes. Near 1: items sit with their
    class; near 0: the embedding ignores it. A seeded sample of ``max_items`` above that size."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(classes, dtype=object)
    keep = labels != OTHER
    x, labels = np.asarray(x)[keep], labels[keep]
    n_classes = len(set(labels.tolist()))
    if n_classes < 2 or n_classes > len(labels) - 1:
        return None
    size = max_items if len(labels) > max_items else None
    return float(silhouette_score(x, labels, metric="cosine", sample_size=size, random_state=seed))


def map_2d(x: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str, str | None]:
    """``(points [n, 2], method used, note)``: t-SNE (PCA init, seeded; perplexity 30 or less on few
    items), or UMAP when asked and installed (else t-SNE, said in the note)."""
    note = None
    if method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
            return np.asarray(umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x)), \
                "umap", None
        except ImportError:
            method, note = "tsne", "umap-learn is not installed: t-SNE instead"
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
    tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity, metric="cosine")
    return np.asarray(tsne.fit_transform(x)), "tsne", note


def recall_curve(ranks: np.ndarray | Tensor, k_max: int) -> np.ndarray:
    """``Recall@K`` for K = 1..k_max: the share of ranks <= K (what ``rank_metrics`` reports at eval.ks)."""
    r = np.sort(np.asarray(ranks.cpu() if isinstance(ranks, Tensor) else ranks, dtype=np.int64))
    if not len(r):
        return np.zeros(k_max)
    return np.searchsorted(r, np.arange(1, k_max + 1), side="right") / len(r)


# -- pictures ------------------------------------------------------------------------------------
def _figure(size: tuple[float, float]) -> Any:
    # a bare Figure (Agg canvas): no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_embedding_map(path: Path, points: np.ndarray, classes: Sequence[str], order: Sequence[str],
                       heldout: np.ndarray, title: str, column: str = "") -> None:
    """Scatter of ``points`` coloured by class (``order`` first, :data:`OTHER` grey); held-out items
    (bool mask ``heldout``) drawn last with a black edge."""
    import matplotlib

    fig = _figure((7.5, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    labels = np.asarray(classes, dtype=object)
    palette = matplotlib.colormaps["tab10"]
    colours = {c: palette(i % 10) for i, c in enumerate(order)}
    colours[OTHER] = (0.72, 0.72, 0.72, 1.0)
    for c in [*order, OTHER]:
        sel = (labels == c) & ~heldout
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=12, color=colours[c], label=c, linewidths=0, alpha=0.8)
    for c in [*order, OTHER]:
        sel = (labels == c) & heldout
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=22, color=colours[c], edgecolors="black", linewidths=0.8,
                       label=None if ((labels == c) & ~heldout).any() else c)
    if heldout.any():
        ax.scatter([], [], s=22, facecolors="white", edgecolors="black", linewidths=0.8,
                   label=f"held out ({int(heldout.sum())})")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, title=column)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_heldout_curves(path: Path, curves: dict[str, np.ndarray], n_heldout: int) -> None:
    """Recall@K against K (log axis) for each named curve; ``chance`` dashed."""
    fig = _figure((6.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for name, y in curves.items():
        k = np.arange(1, len(y) + 1)
        style = dict(ls="--", color="grey") if name == "chance" else {}
        ax.plot(k, y, label=name, lw=1.5, drawstyle="steps-post", **style)
    ax.set_xscale("log")
    ax.set_xlim(1, max(2, max(len(y) for y in curves.values())))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(f"held-out items: content -> behavior among {n_heldout}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


# -- held-out ranks ------------------------------------------------------------------------------
def save_ranks(path: Path, n_heldout: int, **ranks: Tensor | np.ndarray | None) -> None:
    """``heldout_ranks.npz``: each named rank array (one per held-out item with content) and ``n_heldout``."""
    arrays = {k: np.asarray(v.cpu() if isinstance(v, Tensor) else v, dtype=np.int64)
              for k, v in ranks.items() if v is not None}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, n_heldout=np.int64(n_heldout), **arrays)


def load_ranks(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# -- the run's pictures --------------------------------------------------------------------------
def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def embedding_map(cfg: PretrainConfig, run_dir: Path, data: Dataset, modalities: list[str],
                  embs: dict[str, Tensor], masks: dict[str, Tensor], split: ItemSplit | None) -> dict[str, Any]:
    """Draw ``embedding_map.png`` (unless ``plots.map: none``); the ``plots.embedding_map`` block."""
    pc = cfg.plots
    fused, has = fuse(embs, masks, modalities)
    rows = torch.nonzero(has).flatten().cpu().numpy()
    if len(rows) > pc.map_max_items:
        rows = np.sort(np.random.default_rng([cfg.seed, 0x9107]).choice(rows, pc.map_max_items, replace=False))
    x = fused[torch.as_tensor(rows, device=fused.device)].float().cpu().numpy()
    found = color_column(data, pc.color_by)
    if found is not None:
        column, values = found
        classes_all, order = top_classes([values[i] for i in rows])
        silhouette = genre_silhouette(x, classes_all, cfg.seed)
    else:
        column, silhouette = SPLIT, None
        by_split = split_classes(data.n_items, split)
        classes_all = [by_split[i] for i in rows]
        order = [c for c in ("fit", "valid", "held out", "items") if c in set(classes_all)]
    heldout = np.isin(rows, split.heldout) if split is not None else np.zeros(len(rows), dtype=bool)
    out: dict[str, Any] = {"method": pc.map, "color_by": column, "n_items": int(len(rows)),
                           "classes": order, "genre_silhouette": silhouette}
    if pc.map == "none":
        return out
    if len(rows) < 5:
        out["skipped"] = f"{len(rows)} item(s) with content: a map needs at least 5"
        return out
    points, method, note = map_2d(x, pc.map, cfg.seed)
    out["method"] = method
    if note:
        out["note"] = note
    sil = "" if silhouette is None else f"\n{column} silhouette of the embeddings (cosine): {silhouette:.3f}"
    title = f"{'t-SNE' if method == 'tsne' else 'UMAP'} of {len(rows):,} items' aligned content embeddings{sil}"
    plot_embedding_map(run_dir / MAP_FILE, points, classes_all, order, heldout, title, column)
    out["file"] = MAP_FILE
    return out


def heldout_curves(cfg: PretrainConfig, run_dir: Path, modalities: list[str], embs: dict[str, Tensor],
                   masks: dict[str, Tensor], split: ItemSplit, ridge_ranks: Tensor | None) -> dict[str, Any]:
    """Save ``heldout_ranks.npz`` and draw ``heldout_curves.png``; the ``plots.heldout_curves`` block."""
    n = len(split.heldout)
    model = content_ranks(embs, masks, modalities, split.heldout, cfg.eval.block_size)
    save_ranks(run_dir / RANKS_FILE, n, model=model, ridge=ridge_ranks)
    k_max = min(MAX_K, n)
    curves = {"model": recall_curve(model, k_max)}
    if ridge_ranks is not None:
        curves["ridge"] = recall_curve(ridge_ranks, k_max)
    control = run_dir / "control" / RANKS_FILE
    if cfg.heldout.with_control and cfg.control == "none" and control.is_file():
        curves["permuted control"] = recall_curve(load_ranks(control)["model"], k_max)
    curves["chance"] = np.arange(1, k_max + 1) / n
    plot_heldout_curves(run_dir / CURVES_FILE, curves, n)
    return {"file": CURVES_FILE, "ranks": RANKS_FILE, "n_heldout": n, "k_max": k_max, "curves": list(curves)}


def write_plots(cfg: PretrainConfig, run_dir: Path, data: Dataset, modalities: list[str], embs: dict[str, Tensor],
                masks: dict[str, Tensor], split: ItemSplit | None, ridge_ranks: Tensor | None = None,
                log: Log | None = None) -> dict[str, Any]:
    """Every picture of the run; returns the ``plots`` block of ``metrics.json``. Never raises:
    a picture that fails is ``{"error": "..."}`` in the block (and logged), the others still drawn."""
    log = log or (lambda msg: None)
    out: dict[str, Any] = {}
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("embedding_map", lambda: embedding_map(cfg, run_dir, data, modalities, embs, masks, split))]
    if split is not None and len(split.heldout) >= 2:
        jobs.append(("heldout_curves",
                     lambda: heldout_curves(cfg, run_dir, modalities, embs, masks, split, ridge_ranks)))
    for name, job in jobs:
        try:
            out[name] = job()
        except Exception as e:  # noqa: BLE001 - a picture must not fail a finished run
            out[name] = {"error": _error(e)}
            log(f"plots: {name} failed ({_error(e)}); the run is complete without it")
    return out


__all__ = ["COLOR_COLUMNS", "CURVES_FILE", "ItemColumns", "MAP_FILE", "OTHER", "RANKS_FILE", "color_column",
           "embedding_map", "first_value", "genre_silhouette", "heldout_curves", "load_ranks", "map_2d",
           "plot_embedding_map", "plot_heldout_curves", "recall_curve", "save_ranks", "split_classes",
           "top_classes", "write_plots"]
