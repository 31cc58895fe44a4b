"""Pictures of `mmrec pretrain` (mmrec/pretrain/plots.py): the embedding map and the held-out curves
are written by a run, their numbers agree with metrics.json, and a failing plot never fails the run."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmrec.datasets.loading import load_dataset
from mmrec.errors import ConfigError
from mmrec.pretrain import plots
from mmrec.pretrain.config import build_pretrain_config
from mmrec.pretrain.heldout import ItemSplit
from mmrec.pretrain.run import pretrain
from mmrec.pretrain.retrieval import rank_metrics

from test_pretrain import tiny_config
from test_pretrain_heldout import FAST


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic:tiny")


def _png(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        im.load()
        return im.size


# -- a run writes both pictures ----------------------------------------------------------------------
def test_a_run_writes_the_map_and_the_heldout_curves_that_match_its_metrics(tmp_path, tiny):
    out = tmp_path / "run"
    m = pretrain(tiny_config(out, *FAST, "train.epochs=2", "heldout.share=0.3", "heldout.with_control=true"),
                 data=tiny)
    assert _png(out / plots.MAP_FILE) == (750, 600)
    assert _png(out / plots.CURVES_FILE) == (650, 450)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["plots"] == m["plots"]
    emap = m["plots"]["embedding_map"]
    # synthetic:tiny has no items table: auto colours by the world's ground-truth `category`
    assert emap["method"] == "tsne" and emap["color_by"] == "category" and emap["n_items"] == 200
    assert sorted(emap["classes"]) == sorted(tiny.ground_truth["attribute_values"]["category"])
    assert -1.0 <= emap["genre_silhouette"] <= 1.0
    curves = m["plots"]["heldout_curves"]
    assert curves["n_heldout"] == 60 and curves["k_max"] == 60
    assert curves["curves"] == ["model", "ridge", "permuted control", "chance"]
    # the saved ranks give back exactly the held-out numbers of metrics.json (model, ridge, control)
    ranks = plots.load_ranks(out / plots.RANKS_FILE)
    control = plots.load_ranks(out / "control" / plots.RANKS_FILE)
    assert int(ranks["n_heldout"]) == 60 and len(ranks["model"]) == 60
    met = m["metrics"]
    for prefix, r in (("heldout", ranks["model"]), ("heldout/ridge", ranks["ridge"]),
                      ("heldout/control", control["model"])):
        expect = rank_metrics(torch.as_tensor(r), [1, 10, 50], prefix)
        assert {k: met[k] for k in expect} == pytest.approx(expect), prefix
        assert plots.recall_curve(r, 60)[10 - 1] == pytest.approx(met[f"{prefix}/Recall@10"])
    # the control run drew its own pictures, without a control curve of its own
    cm = json.loads((out / "control" / "metrics.json").read_text())
    assert cm["plots"]["heldout_curves"]["curves"] == ["model", "ridge", "chance"]


def test_a_failing_plot_leaves_a_finished_run_with_the_error_recorded(tmp_path, tiny, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("no canvas today")

    monkeypatch.setattr(plots, "map_2d", broken)
    out = tmp_path / "run"
    said: list[str] = []
    m = pretrain(tiny_config(out, *FAST, "train.epochs=1", "heldout.share=0.2"), data=tiny, log=said.append)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["plots"]["embedding_map"] == {"error": "RuntimeError: no canvas today"}
    assert any("embedding_map failed" in s and "no canvas today" in s for s in said)
    assert not (out / plots.MAP_FILE).exists()
    assert _png(out / plots.CURVES_FILE)                      # the other picture is still drawn
    assert (out / "encoders.safetensors").is_file() and "heldout/MRR" in m["metrics"]


def test_map_none_draws_no_map_but_reports_the_silhouette(tmp_path, tiny):
    out = tmp_path / "run"
    m = pretrain(tiny_config(out, *FAST, "train.epochs=1", "plots.map=none"), data=tiny)
    assert not (out / plots.MAP_FILE).exists() and not (out / plots.CURVES_FILE).exists()
    assert set(m["plots"]) == {"embedding_map"}                # no held-out items: no curves
    assert m["plots"]["embedding_map"]["method"] == "none"
    assert m["plots"]["embedding_map"]["genre_silhouette"] is not None
    off = tmp_path / "off"
    assert "plots" not in pretrain(tiny_config(off, *FAST, "train.epochs=1", "plots.enabled=false"), data=tiny)
    assert not (off / plots.MAP_FILE).exists()
    with pytest.raises(ConfigError, match="plots.map"):
        build_pretrain_config(None, {}, ["plots.map=pca"])


# -- the helpers ----------------------------------------------------------------------------------------
def test_silhouette_is_higher_for_clustered_embeddings_than_for_shuffled_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    labels = np.repeat(["a", "b", "c", "d"], 50)
    x = centres[np.repeat(np.arange(4), 50)] + 0.5 * rng.normal(size=(200, 32))
    clustered = plots.genre_silhouette(x, labels.tolist(), seed=0)
    shuffled = plots.genre_silhouette(x, rng.permutation(labels).tolist(), seed=0)
    assert clustered > 0.3 and shuffled < 0.05 and clustered > shuffled + 0.3
    # "other" is a mix, not a class: leaving it out changes nothing here; one class: no number
    with_other = plots.genre_silhouette(np.vstack([x, rng.normal(size=(30, 32))]),
                                        labels.tolist() + [plots.OTHER] * 30, seed=0)
    assert with_other == pytest.approx(clustered)
    assert plots.genre_silhouette(x, ["a"] * 200) is None
    # sampled above max_items, seeded
    a = plots.genre_silhouette(x, labels.tolist(), seed=1, max_items=100)
    assert a == plots.genre_silhouette(x, labels.tolist(), seed=1, max_items=100) and a > 0.3


def test_colour_column_from_the_items_table_first_values_and_top_classes(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "interactions.tsv").write_text("user\titem\n" + "".join(f"u{u}\ti{i}\n" for u in range(3) for i in range(6)))
    genres = ["Action|Comedy", "Drama", "Comedy", "", "Drama|Action", "Horror"]
    (d / "items.tsv").write_text("item\ttitle\tgenres\n" + "".join(f"i{i}\tt{i}\t{g}\n" for i, g in enumerate(genres)))
    (d / "dataset.yaml").write_text("text_columns: [title]\n")
    data = load_dataset(str(d))
    assert "genres" not in data.items.text                     # read from items.tsv, not the loaded text
    column, values = plots.color_column(data, "auto")
    by_id = dict(zip([str(x) for x in data.item_ids], values))
    assert column == "genres"
    assert [by_id[f"i{i}"] for i in range(6)] == ["Action", "Drama", "Comedy", "", "Drama", "Horror"]
    assert plots.color_column(data, "title")[0] == "title"
    assert plots.color_column(data, "split") is None
    with pytest.raises(ConfigError, match="'year'.*genres"):
        plots.color_column(data, "year")
    classes, kept = plots.top_classes([f"v{i}" for i in range(12) for _ in range(12 - i)] + [""])
    assert kept == [f"v{i}" for i in range(10)]
    assert classes[-1] == plots.OTHER and classes.count(plots.OTHER) == 2 + 1 + 1


def test_map_by_split_without_a_column_and_recall_curve(tmp_path, tiny):
    from mmrec.pretrain.config import PretrainConfig
    g = torch.Generator().manual_seed(0)
    n = tiny.n_items
    embs = {"text": torch.randn(n, 8, generator=g), "behavior": torch.randn(n, 8, generator=g)}
    masks = {"text": torch.ones(n, dtype=torch.bool), "behavior": torch.ones(n, dtype=torch.bool)}
    masks["text"][:3] = False                                  # items without content are not drawn
    split = ItemSplit(fit=np.arange(3, 150), valid=np.arange(150, 170), heldout=np.concatenate([[0], np.arange(170, 200)]))
    cfg = PretrainConfig(out=str(tmp_path))
    cfg.plots.color_by = "split"
    cfg.plots.map_max_items = 50
    block = plots.embedding_map(cfg, tmp_path, tiny, ["text"], embs, masks, split)
    assert block["color_by"] == "split" and block["genre_silhouette"] is None and block["n_items"] == 50
    assert set(block["classes"]) <= {"fit", "valid", "held out"} and "fit" in block["classes"]
    assert _png(tmp_path / plots.MAP_FILE) == (750, 600)
    if importlib.util.find_spec("umap") is None:              # umap asked, not installed: t-SNE, said so
        cfg.plots.map = "umap"
        block = plots.embedding_map(cfg, tmp_path, tiny, ["text"], embs, masks, split)
        assert block["method"] == "tsne" and "umap-learn" in block["note"]
    r = np.array([1, 3, 3, 10])
    assert plots.recall_curve(r, 4).tolist() == [0.25, 0.25, 0.75, 0.75]
