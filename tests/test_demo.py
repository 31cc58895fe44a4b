"""`make demo`: the synthetic world's demo preset, the facts its report claims, and the report files.

The full demo pre-trains encoders (minutes: slow); ``run_demo(quick=True)`` trains only the models
the three facts need, with content models on the world's stored features, and runs in the fast suite.
"""

import json
import math
import re

import numpy as np
import pytest


def _facts_from_table(report):
    """The three claims, recomputed from report.json's table (not from its own verdicts)."""
    results, kinds = report["results"], report["kinds"]
    trained = [n for n, k in kinds.items() if k != "reference"]
    content = [n for n, k in kinds.items() if k == "content"]
    id_only = [n for n, k in kinds.items() if k != "content"]

    def best(names, metric):
        values = [results[n][metric] for n in names if metric in results[n] and not math.isnan(results[n][metric])]
        assert values, f"no model of {names} reports {metric}"
        return max(values)

    return {
        "trained_beat_popularity": best(trained, "Recall@20") > results["pop"]["Recall@20"],
        "content_wins_cold": best(content, "cold/Recall@10") > best(id_only, "cold/Recall@10"),
        "prior_not_first_on_discovery": (best([n for n in results if n != "behavior-prior"], "discovery/Recall@20")
                                         > results["behavior-prior"]["discovery/Recall@20"]),
    }


def _check_report_files(out, report):
    html = (out / "report.html").read_text()
    # self-contained: every image inlined, nothing fetched from beside the page
    assert html.count("data:image/png;base64,") >= 4
    assert not re.search(r"src=['\"](?!data:)", html)
    for name in report["results"]:
        assert f"<td>{name} (" in html  # a table row per model, with its kind
    md = (out / "report.md").read_text()
    assert md.count("\n| ") >= len(report["results"]) + 1 and "discovery/Recall@20" in md
    for key in ("comparison", "curves", "modality_weights", "embedding_map"):
        assert report["figures"][key] and (out / report["figures"][key]).exists(), key
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["results"].keys() == report["results"].keys()
    assert on_disk["results"]["pop"]["Recall@20"] == report["results"]["pop"]["Recall@20"]
    assert {"repeat/Recall@20", "discovery/Recall@20", "Recall@20"} <= set(on_disk["results"]["bprmf"])
    assert "cold/Recall@10" in on_disk["results"]["bprmf"]
    assert "cold/Recall@10" not in on_disk["results"]["pop"]  # constant scores on cold items: not a ranking


# -- the world's knob and preset ---------------------------------------------------------------

def test_direct_buys_have_no_logged_view_or_cart():
    from mmrec.datasets.synthetic import PRESETS, make_world

    assert PRESETS["tiny"].direct_buy_share == 0.0  # defaults unchanged: the cascade holds
    for share in (0.0, 0.4):
        d = make_world("tiny", seed=3, direct_buy_share=share)
        t = d.train
        keys = {b: set((t.user[t.behavior == k] * d.n_items + t.item[t.behavior == k]).tolist())
                for k, b in enumerate(d.behaviors)}
        unviewed = keys["buy"] - keys["view"]
        assert keys["buy"] - keys["cart"] == unviewed  # a direct buy lacks both rows, others have both
        frac = len(unviewed) / len(keys["buy"])
        if share == 0:
            assert frac == 0
        else:
            assert 0.3 < frac < 0.5, frac  # binomial around 0.4 over ~1,000 buys
    # the knob touches only the rows it drops: buys (and the views of the other items) are the same
    base, direct = make_world("tiny", seed=3), make_world("tiny", seed=3, direct_buy_share=0.4)
    buys = [np.sort(w.train.user[w.train.behavior == 2] * 200 + w.train.item[w.train.behavior == 2])
            for w in (base, direct)]
    np.testing.assert_array_equal(buys[0], buys[1])


def test_direct_buy_share_is_checked():
    from mmrec.datasets.synthetic import make_world
    from mmrec.errors import ConfigError

    with pytest.raises(ConfigError, match="direct_buy_share"):
        make_world("tiny", direct_buy_share=1.5)


# -- the facts and the report's pieces -------------------------------------------------------

def test_check_facts_compares_the_right_sides():
    from mmrec.demo import check_facts

    kinds = {"pop": "reference", "behavior-prior": "reference", "bprmf": "id", "vbpr": "content"}
    results = {
        "pop": {"Recall@20": 0.3, "discovery/Recall@20": 0.2},
        "behavior-prior": {"Recall@20": 0.6, "discovery/Recall@20": 0.25},
        "bprmf": {"Recall@20": 0.2, "discovery/Recall@20": 0.1, "cold/Recall@10": 0.3},
        "vbpr": {"Recall@20": 0.35, "discovery/Recall@20": 0.15, "cold/Recall@10": 0.2},
    }
    facts = check_facts(results, kinds)
    # behavior-prior is a reference, not a trained model: vbpr 0.35 > pop 0.3
    assert facts["trained_beat_popularity"]["holds"] and facts["trained_beat_popularity"]["best"] == "vbpr"
    assert facts["content_wins_cold"]["holds"] is False  # vbpr 0.2 < bprmf 0.3
    assert facts["prior_not_first_on_discovery"]["holds"] is False  # 0.25 is first
    del results["vbpr"], kinds["vbpr"]
    assert check_facts(results, kinds)["content_wins_cold"]["holds"] is None  # no content model: not checked


def test_model_colors_are_distinct_past_ten_models():
    from mmrec.train.report import model_colors

    names = [f"m{i}" for i in range(14)]
    colors = model_colors(names)
    assert len(set(colors.values())) == 14
    assert model_colors(names[:3]) == model_colors(names[:3])


def test_html_report_is_one_file_with_inlined_images(tmp_path):
    from mmrec.train.report import html_table, plot_comparison, png_data_uri, write_html_report

    rows = {"a": {"Recall@20": 0.5, "x": float("nan")}, "b<c": {"Recall@20": 0.25}}
    png = plot_comparison(rows, ["Recall@20"], tmp_path / "c.png")
    out = write_html_report(tmp_path / "r.html", "t", [("table", html_table(rows, ["Recall@20", "x"])),
                                                      ("plot", f"<img src='{png_data_uri(png)}'>")])
    text = out.read_text()
    assert "<b>0.5000</b>" in text and "0.2500" in text and "b&lt;c" in text and "<td>–</td>" in text
    assert png_data_uri(png)[:40] in text and not list(tmp_path.glob(".r.html*"))  # no temp file left


def test_embedding_map_checks_rows(tmp_path):
    from mmrec.train.report import plot_embedding_map

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, 8))
    labels = np.repeat(np.arange(4), 10)
    path = plot_embedding_map({"a": emb, "b": emb[:, ::-1]}, labels, ["w", "x", "y", "z"], tmp_path / "m.png",
                              highlight=labels == 0, method="pca")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="'a' has 39 rows"):
        plot_embedding_map({"a": emb[:39]}, labels, ["w", "x", "y", "z"], tmp_path / "m2.png")


# -- the demo itself -------------------------------------------------------------------------

def test_quick_demo_shows_the_three_facts(tmp_path):
    """The reduced demo (no pre-training) already tells the truth the full one tells."""
    from mmrec.demo import run_demo

    report = run_demo(tmp_path, quick=True)
    assert {"pop", "behavior-prior", "lightgcn-mb", "vbpr"} <= set(report["results"])
    facts = _facts_from_table(report)
    assert all(facts.values()), facts
    assert all(f["holds"] for f in report["facts"].values()), report["facts"]
    _check_report_files(tmp_path, report)
    assert set(report["modality_weights"]["lightgcn+attn"]) == {"image", "text", "audio"}


@pytest.mark.slow
def test_demo_runs_every_stage_and_shows_the_three_facts(tmp_path):
    from mmrec.demo import run_demo
    from mmrec.demo_multimodal import DEMO_CONTENT_MODELS

    report = run_demo(tmp_path)
    expected = {"pop", "behavior-prior", "lightgcn", "cigf"} | {label for label, _, _ in DEMO_CONTENT_MODELS}
    assert expected <= set(report["results"])
    assert (tmp_path / "features.safetensors").exists() and (tmp_path / "pretrain" / "metrics.json").exists()
    facts = _facts_from_table(report)
    assert all(facts.values()), facts
    _check_report_files(tmp_path, report)
