"""The shared real datasets load with the counts their READMEs state (skipped without ../shared/data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_data_dir
from mmrec.datasets.canonical import write_canonical
from mmrec.datasets.loading import detect_format, load_dataset

pytestmark = pytest.mark.shared


def test_tmall_counts():
    path = shared_data_dir("tmall")
    assert detect_format(path) == "canonical"
    d = load_dataset(path)
    assert (d.n_users, d.n_items) == (15449, 11953)
    assert d.behaviors == ["view", "cart", "buy"] and d.target == "buy"
    assert d.describe()["interactions"] == {"view": 858505, "cart": 180027, "buy": 92180}
    assert len(d.test) == 15449 and np.all(d.test.behavior == d.target_index)
    assert np.array_equal(np.sort(d.test.user), np.arange(15449))  # one held-out buy per user
    assert d.report["unseen"]["test"]["rows"] == 0
    # integer ids index by number, and the README says no duplicate rows
    assert list(d.user_ids[:3]) == ["0", "1", "2"] and d.item_ids[11952] == "11952"
    assert d.matrix("view").nnz == 858505
    assert d.cold_items is None  # every item has a training interaction


def test_beibei_mini_counts_and_round_trip(tmp_path):
    d = load_dataset(shared_data_dir("beibei-mini"))
    assert d.n_users == 1000 and d.n_items == 7833
    assert d.describe()["interactions"] == {"view": 111988, "cart": 29315, "buy": 12629}
    assert len(d.test) == 1000 and d.report["unseen"]["test"] == {"users": 0, "items": 0, "rows": 0}
    # strict cascade (README): every buy pair is a cart pair, every cart pair a view pair
    view, cart, buy = (d.matrix(b) for b in ("view", "cart", "buy"))
    assert (buy - buy.multiply(cart)).nnz == 0 and (cart - cart.multiply(view)).nnz == 0
    write_canonical(d, tmp_path / "beibei")
    back = load_dataset(tmp_path / "beibei")
    assert back.describe()["interactions"] == d.describe()["interactions"]
    assert list(back.user_ids) == list(d.user_ids) and list(back.item_ids) == list(d.item_ids)
    assert np.array_equal(back.test.item, d.test.item) and np.array_equal(back.train.item, d.train.item)


def test_ml100k_mm_content_and_features():
    d = load_dataset(shared_data_dir("ml100k-mm"))
    assert (d.n_users, d.n_items) == (943, 1682)
    assert d.behaviors == ["interact"] and len(d.train) == 100000
    assert d.train.rating.min() == 1 and d.train.rating.max() == 5
    assert d.train.timestamp.dtype == np.int64 and d.train.timestamp.min() == 874724710
    assert list(d.items.text) == ["title", "genres", "plot"]  # year numeric, has_image a flag
    i2 = list(d.item_ids).index("2")
    assert d.items.text["title"][i2] == "GoldenEye" and '"GoldenEye"' in d.items.text["plot"][i2]
    assert sum(x is not None for x in d.items.image) == 1669
    assert "missing_media" not in d.report  # has_image=1 exactly when the poster exists
    text, image = d.items.features["text"], d.items.features["image"]
    assert text.features.shape == (1682, 384) and int(text.mask.sum()) == 1682
    assert image.features.shape == (1682, 1280) and int(image.mask.sum()) == 1669
    has_poster = torch.tensor([x is not None for x in d.items.image])
    assert torch.equal(image.mask, has_poster)  # features aligned to the dataset's item order
