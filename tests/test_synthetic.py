"""The synthetic world: determinism, cascade, rendered content, noise, cold items, and that a signal exists."""

from __future__ import annotations

import io
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import wavfile

from mmrec.datasets.synthetic import PRESETS, LazyContent, WorldConfig, make_world
from mmrec.datasets.synthetic.factors import ATTRIBUTES, VOCAB
from mmrec.datasets.synthetic.render_image import PALETTE
from mmrec.errors import ConfigError


@pytest.fixture(scope="module")
def tiny():
    return make_world("tiny", seed=0)


def _pairs(rows, behavior: int, n_items: int) -> set[int]:
    sel = rows.behavior == behavior
    return set((rows.user[sel] * n_items + rows.item[sel]).tolist())


def _colour_guess(png: bytes) -> int:
    """Nearest palette colour of the saturated pixels, brightness removed (stripes are darker shades)."""
    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64).reshape(-1, 3)
    sat = px[(px.max(1) - px.min(1)) > 60]
    if len(sat) == 0:
        return -1
    mean = (sat / sat.max(1, keepdims=True)).mean(0)
    pal = np.array(PALETTE, dtype=np.float64)
    pal = pal / pal.max(1, keepdims=True)
    return int(np.argmin(((pal - mean) ** 2).sum(1)))


def _dominant_hz(wav: bytes) -> tuple[int, np.ndarray, float]:
    sr, pcm = wavfile.read(io.BytesIO(wav))
    x = pcm.astype(np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return sr, pcm, float(np.fft.rfftfreq(len(x), 1.0 / sr)[np.argmax(spec)])


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z\-]+", text.lower()))


ALL_ATTRIBUTE_WORDS = {w for a in ATTRIBUTES for vals in VOCAB[a] for w in vals}


# -- config ---------------------------------------------------------------------------------------

def test_preset_sizes_and_overrides():
    assert (PRESETS["tiny"].n_users, PRESETS["tiny"].n_items) == (300, 200)
    assert (PRESETS["small"].n_users, PRESETS["small"].n_items) == (2000, 1000)
    assert (PRESETS["medium"].n_users, PRESETS["medium"].n_items) == (20_000, 10_000)
    d = make_world("tiny", n_users=50, n_items=40, exposures_per_user=3)
    assert (d.n_users, d.n_items, len(d.exposures)) == (50, 40, 150)
    with pytest.raises(ConfigError, match="no_such_knob"):
        make_world("tiny", no_such_knob=1)
    with pytest.raises(ConfigError, match="huge"):
        make_world("huge")
    with pytest.raises(ConfigError, match="noisy_modality"):
        make_world("tiny", noisy_modality="smell")
    with pytest.raises(ConfigError, match="n_colors"):
        make_world("tiny", n_colors=99)
    with pytest.raises(ConfigError, match="cold_share"):
        WorldConfig(cold_share=1.5)
    with pytest.raises(ConfigError, match="noisy_modality"):
        make_world("tiny", noisy_share=0.2)  # a share without a modality would be silently ignored


# -- determinism and schema -------------------------------------------------------------------------

def test_same_seed_same_world_different_seed_different_world(tiny):
    again = make_world("tiny", seed=0)
    for col in ("user", "item", "behavior", "timestamp", "scenario"):
        np.testing.assert_array_equal(getattr(tiny.train, col), getattr(again.train, col))
    for k in ("click", "convert"):
        np.testing.assert_array_equal(tiny.exposures.labels[k], again.exposures.labels[k])
    assert tiny.items.text == again.items.text
    assert list(tiny.items.image) == list(again.items.image)
    assert list(tiny.items.audio) == list(again.items.audio)
    for m, ft in tiny.items.features.items():
        assert (ft.features == again.items.features[m].features).all()

    other = make_world("tiny", seed=1)
    assert len(other.train) != len(tiny.train) or not np.array_equal(other.train.item, tiny.train.item)
    assert sum(a != b for a, b in zip(tiny.items.image[:20], other.items.image[:20])) >= 15
    assert sum(a != b for a, b in zip(tiny.items.audio[:20], other.items.audio[:20])) >= 10
    assert tiny.items.text["title"] != other.items.text["title"]


def test_schema_fields(tiny):
    assert tiny.name == "synthetic:tiny"
    assert tiny.behaviors == ["view", "cart", "buy"] and tiny.target == "buy"
    assert tiny.user_ids[0] == "u0" and tiny.item_ids[-1] == f"i{tiny.n_items - 1}"
    assert tiny.valid is None and tiny.test is None and tiny.cold_items is None
    assert tiny.scenarios == ["home", "search", "promo"]
    assert tiny.train.timestamp.dtype == np.int64
    assert set(np.unique(tiny.train.scenario)) == {0, 1, 2}
    assert 2000 < len(tiny.train) < 20_000
    for n in ("attributes", "user_taste", "affinity", "affinity_matrix", "noisy_items", "cold_items"):
        assert n in tiny.ground_truth
    a = tiny.ground_truth["affinity"]
    np.testing.assert_allclose(a(np.arange(5)), tiny.ground_truth["affinity_matrix"][:5], atol=1e-5)
    np.testing.assert_allclose(a.pairs(np.array([3]), np.array([7]), np.array([1])),
                               a(np.array([3]), None, 1)[:, 7], atol=1e-5)


# -- behaviors ---------------------------------------------------------------------------------------

def test_cascade_holds_and_times_follow_it(tiny):
    n = tiny.n_items
    view, cart, buy = (_pairs(tiny.train, b, n) for b in range(3))
    assert buy and buy <= cart <= view
    assert len(view) == int((tiny.train.behavior == 0).sum())  # each pair viewed once
    tr = tiny.train
    t = {b: dict(zip((tr.user[tr.behavior == b] * n + tr.item[tr.behavior == b]).tolist(),
                     tr.timestamp[tr.behavior == b].tolist())) for b in range(3)}
    assert all(t[0][k] < t[1][k] < t[2][k] for k in buy)


def test_users_buy_enough_for_leave_one_out(tiny):
    buys = tiny.train.for_behavior(2)
    per_user = np.bincount(buys.user, minlength=tiny.n_users)
    assert (per_user >= 3).mean() >= 0.95
    keys = buys.user * np.int64(10**12) + buys.timestamp
    assert len(np.unique(keys)) == len(keys)  # distinct buy times per user: LOO by time is well defined


def test_small_preset_builds():
    d = make_world("small")
    assert (d.n_users, d.n_items) == (2000, 1000)
    assert (np.bincount(d.train.for_behavior(2).user, minlength=d.n_users) >= 3).mean() >= 0.95


def test_scenarios_shift_preferences(tiny):
    """Views in scenario s favour the items that s's shift boosts."""
    shift = tiny.ground_truth["affinity"].scenario_item  # [n_scenarios, n_items]
    views = tiny.train.for_behavior(0)
    table = np.array([[shift[s2, views.item[views.scenario == s]].mean() for s2 in range(3)] for s in range(3)])
    assert (np.argmax(table, axis=0) == np.arange(3)).all(), table  # column s2: views in s2 score highest


def test_exposures_follow_esmm_structure(tiny):
    e = tiny.exposures
    click, convert = e.labels["click"], e.labels["convert"]
    assert click.dtype == np.float32 and set(np.unique(click)) <= {0.0, 1.0}
    assert (convert <= click).all() and 0 < convert.sum() < click.sum() < len(e)
    assert (e.behavior == tiny.target_index).all() and e.scenario is not None
    p = tiny.ground_truth["exposure_p_click"]
    assert len(p) == len(e)
    hi = p > np.median(p)
    assert click[hi].mean() > click[~hi].mean() + 0.1


# -- content -----------------------------------------------------------------------------------------

def test_images_show_colour_shape_and_differ(tiny):
    imgs = tiny.items.image
    assert isinstance(imgs, LazyContent) and len(imgs) == tiny.n_items
    first = Image.open(io.BytesIO(imgs[0]))
    assert first.size == (64, 64) and first.mode == "RGB" and first.format == "PNG"
    colour = tiny.ground_truth["attributes"]["color"]
    guesses = np.array([_colour_guess(imgs[i]) for i in range(100)])
    assert (guesses == colour[:100]).mean() > 0.9
    assert len({imgs[i] for i in range(100)}) == 100


def test_audio_pitch_tracks_category(tiny):
    gt = tiny.ground_truth
    rates, errs = set(), []
    for i in range(40):
        sr, pcm, hz = _dominant_hz(tiny.items.audio[i])
        rates.add(sr)
        assert pcm.dtype == np.int16 and pcm.ndim == 1 and len(pcm) == 8000  # 0.5 s mono
        errs.append(abs(hz - gt["audio_pitch_hz"][i]) / gt["audio_pitch_hz"][i])
    assert rates == {16_000}
    assert max(errs) < 0.03  # categories are 3 semitones (19 %) apart


def test_text_names_the_attributes(tiny):
    gt = tiny.ground_truth["attributes"]
    for i in range(tiny.n_items):
        title = _words(tiny.items.text["title"][i])
        desc = _words(tiny.items.text["description"][i])
        for a in ("shape", "color", "texture"):
            assert title & set(VOCAB[a][gt[a][i]]), (a, tiny.items.text["title"][i])
            assert desc & set(VOCAB[a][gt[a][i]]), (a, tiny.items.text["description"][i])
        assert desc & set(VOCAB["category"][gt["category"][i]])


def test_features_cover_all_items(tiny):
    for m in ("image", "text", "audio"):
        ft = tiny.items.features[m]
        assert tuple(ft.features.shape) == (tiny.n_items, 32) and ft.features.dtype == torch.float32
        assert ft.mask.dtype == torch.bool and ft.mask.all()
    assert make_world("tiny", features=False, n_users=20).items.features == {}


def test_lazy_content_indexing_and_pickle(tiny):
    imgs = tiny.items.image
    assert imgs[-1] == imgs[len(imgs) - 1]
    assert imgs[2:5] == [imgs[2], imgs[3], imgs[4]]
    with pytest.raises(IndexError):
        imgs[len(imgs)]
    assert imgs.n_present == len(imgs)
    back = pickle.loads(pickle.dumps(tiny))  # DataLoader workers and caches pickle the dataset
    assert back.items.audio[7] == tiny.items.audio[7] and back.items.image[3] == tiny.items.image[3]
    np.testing.assert_array_equal(back.ground_truth["affinity"](np.arange(3)),
                                  tiny.ground_truth["affinity"](np.arange(3)))


def _attribute_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Ridge regression on one-hot labels, fitted on ``train`` rows, accuracy on ``test`` rows."""
    x = np.c_[features, np.ones(len(features))]
    y = np.eye(labels.max() + 1)[labels]
    w = np.linalg.solve(x[train].T @ x[train] + 1e-2 * np.eye(x.shape[1]), x[train].T @ y[train])
    return float((np.argmax(x[test] @ w, 1) == labels[test]).mean())


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_noisy_modality_is_marked_and_uninformative(modality):
    d = make_world("tiny", n_users=30, noisy_modality=modality, noisy_share=0.3)
    gt = d.ground_truth
    noisy = gt["noisy_items"]
    assert gt["noisy_modality"] == modality and len(noisy) == 60 and len(np.unique(noisy)) == 60
    clean = np.setdiff1d(np.arange(d.n_items), noisy)
    # the attribute every modality shows
    shape = gt["attributes"]["shape"]
    feats = d.items.features[modality].features.numpy()
    assert _attribute_accuracy(feats, shape, clean[:100], clean[100:]) > 0.9
    assert _attribute_accuracy(feats, shape, clean[:100], noisy) < 0.55
    if modality == "image":
        colour = gt["attributes"]["color"]
        assert np.mean([_colour_guess(d.items.image[i]) == colour[i] for i in noisy]) < 0.4
        assert np.mean([_colour_guess(d.items.image[i]) == colour[i] for i in clean[:60]]) > 0.9
    elif modality == "text":
        for i in noisy:
            assert not _words(d.items.text["title"][i] + " " + d.items.text["description"][i]) & ALL_ATTRIBUTE_WORDS
        assert all(_words(d.items.text["title"][i]) & ALL_ATTRIBUTE_WORDS for i in clean)
    else:
        pitch = gt["audio_pitch_hz"]
        off = [abs(_dominant_hz(d.items.audio[i])[2] - pitch[i]) / pitch[i] > 0.03 for i in noisy]
        assert np.mean(off) > 0.9
    # other modalities of noisy items are untouched
    other = "text" if modality != "text" else "image"
    assert _attribute_accuracy(d.items.features[other].features.numpy(), shape, clean[:100], noisy) > 0.9


# -- cold items and the signal ---------------------------------------------------------------------

def test_cold_items_have_no_training_rows():
    d = make_world("tiny", cold_share=0.2)
    cold = d.cold_items
    assert len(cold) == 40 and np.array_equal(cold, d.ground_truth["cold_items"])
    assert not np.isin(d.train.item, cold).any()
    assert not np.isin(d.exposures.item, cold).any()
    held = d.ground_truth["cold_interactions"]
    assert len(held) > 0 and np.isin(held.item, cold).all()
    assert d.report["cold_rows_withheld"] == len(held)
    assert len(d.train) + len(held) == len(make_world("tiny").train)  # same world, rows just withheld
    assert len(d.exposures) + len(d.ground_truth["cold_exposures"]) == 300 * PRESETS["tiny"].exposures_per_user


def test_content_predicts_cold_item_buyers():
    """Content features rank the true buyers of cold items above chance (ID-only models cannot: AUC 0.5)."""
    d = make_world("small", cold_share=0.3, seed=3)
    held = d.ground_truth["cold_interactions"].for_behavior(2)
    f = d.items.features["text"].features.numpy()
    f = f - f.mean(0)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    warm_buys = d.train.for_behavior(2)
    profile = np.zeros((d.n_users, f.shape[1]))
    np.add.at(profile, warm_buys.user, f[warm_buys.item])
    cold = d.cold_items
    scores = profile @ f[cold].T  # [n_users, n_cold]
    truth = np.zeros_like(scores, dtype=bool)
    truth[held.user, np.searchsorted(cold, held.item)] = True
    aucs = []
    for u in np.flatnonzero(truth.any(1) & ~truth.all(1)):
        pos, neg = scores[u, truth[u]], scores[u, ~truth[u]]
        aucs.append((pos[:, None] > neg[None, :]).mean())
    assert len(aucs) > 1000 and np.mean(aucs) > 0.65


def test_behaviour_follows_true_affinity(tiny):
    gt = tiny.ground_truth
    buys = tiny.train.for_behavior(2)
    counts = np.bincount(buys.item, minlength=tiny.n_items)
    assert np.corrcoef(gt["affinity_matrix"].mean(0), counts)[0, 1] > 0.3
    # a user's bought items carry the attribute values that user likes, more than random items do
    taste = sum(gt["user_taste"][a][buys.user, gt["attributes"][a][buys.item]] for a in ATTRIBUTES)
    rnd = np.random.default_rng(0).integers(0, tiny.n_items, len(buys))
    base = sum(gt["user_taste"][a][buys.user, gt["attributes"][a][rnd]] for a in ATTRIBUTES)
    assert taste.mean() > base.mean() + 1.0
