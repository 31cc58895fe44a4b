"""Readers: canonical directory (read, write, round trip), MMRec, MB-GMN / SSLRec, RecBole, detection."""

from __future__ import annotations

import io
import pickle
import random
import sys
import types
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch
from PIL import Image

from mmrec.datasets.canonical import read_canonical, write_canonical
from mmrec.datasets.features import write_features
from mmrec.datasets.loading import detect_format, load_dataset
from mmrec.datasets.readers.table import encode
from mmrec.datasets.schema import Dataset, FeatureTable, Interactions, ItemContent
from mmrec.errors import ConfigError, DataError


def tsv(path: Path, *rows: str) -> Path:
    """Write lines whose fields are separated by single spaces in the test source -> tabs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.replace(" ", "\t") + "\n" for r in rows), encoding="utf-8")
    return path


def png_bytes(color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def wav_file(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * 80)
    return path


def rows_as_strings(data: Dataset, split: str = "train") -> list[tuple[str, str, str]]:
    r = data.split_rows(split)
    return sorted(zip(data.user_ids[r.user], data.item_ids[r.item], np.array(data.behaviors)[r.behavior]))


# ---------------------------------------------------------------------------
# canonical reading
# ---------------------------------------------------------------------------

def test_canonical_with_behavior_column_orders_known_cascade(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item behavior timestamp",
        "u1 a buy 30", "u1 a view 10", "u2 b cart 20", "u2 a view 5", "u1 b view 7")
    tsv(tmp_path / "test.tsv", "user item", "u2 b", "u1 b")
    d = read_canonical(tmp_path)
    assert d.behaviors == ["view", "cart", "buy"] and d.target == "buy"
    assert d.describe()["interactions"] == {"view": 3, "cart": 1, "buy": 1}
    assert list(d.user_ids) == ["u1", "u2"] and list(d.item_ids) == ["a", "b"]
    assert d.train.timestamp.dtype == np.int64 and d.train.timestamp.tolist() == [30, 10, 20, 5, 7]
    assert rows_as_strings(d, "test") == [("u1", "b", "buy"), ("u2", "b", "buy")]
    assert d.report["unseen"]["test"] == {"users": 0, "items": 0, "rows": 0}
    assert d.split == "fixed" and d.valid is None


def test_canonical_without_behavior_column_is_interact(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item rating timestamp", "1 10 4 100", "2 10 3.5 101.5", "1 11 5 99")
    tsv(tmp_path / "valid.tsv", "user item", "2 11")
    d = read_canonical(tmp_path)
    assert d.behaviors == ["interact"] and d.target == "interact"
    assert d.train.rating.tolist() == [4.0, 3.5, 5.0]
    assert d.train.timestamp.dtype == np.float64  # one non-integer time: read as float
    assert rows_as_strings(d, "valid") == [("2", "11", "interact")]
    assert d.test is None


def test_yaml_sets_order_and_target(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item behavior", "a x share", "a y click", "b x like", "b y click")
    (tmp_path / "dataset.yaml").write_text("name: demo\nbehaviors: [click, like, share]\ntarget: like\n")
    d = read_canonical(tmp_path)
    assert d.name == "demo" and d.behaviors == ["click", "like", "share"] and d.target == "like"
    assert np.array(d.behaviors)[d.train.behavior].tolist() == ["share", "click", "like", "click"]


def test_unknown_names_keep_first_appearance_order(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item behavior", "a x share", "a y click", "b x like")
    d = read_canonical(tmp_path)
    assert d.behaviors == ["share", "click", "like"] and d.target == "like"


def test_scenario_column(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item scenario label", "a x home 1", "a y search 0", "b x home 1")
    tsv(tmp_path / "test.tsv", "user item scenario", "b y feed")
    d = read_canonical(tmp_path)
    assert d.scenarios == ["home", "search", "feed"]
    assert d.train.scenario.tolist() == [0, 1, 0] and d.test.scenario.tolist() == [2]
    assert d.train.labels["label"].tolist() == [1.0, 0.0, 1.0]


def test_ids_stay_strings(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "007 7", "7 007", "07 7.0", "007 007")
    d = read_canonical(tmp_path)
    assert list(d.user_ids) == ["007", "7", "07"]
    assert list(d.item_ids) == ["7", "007", "7.0"]
    assert d.train.user.tolist() == [0, 1, 2, 0] and d.train.item.tolist() == [0, 1, 2, 1]


def test_integer_ids_index_by_number(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "10 3", "2 1", "0 2", "1 0")
    d = read_canonical(tmp_path)
    assert list(d.user_ids) == ["0", "1", "2", "10"] and list(d.item_ids) == ["0", "1", "2", "3"]
    assert d.user_ids[d.train.user].tolist() == ["10", "2", "0", "1"]
    assert d.item_ids[d.train.item].tolist() == ["3", "1", "2", "0"]


def test_items_tsv_text_quoting_cold_items_and_image_column(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "u i1", "u i2")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "one.png").write_bytes(png_bytes())
    (tmp_path / "items.tsv").write_text(
        'item\ttitle\tyear\tplot\thas_image\timage\n'
        'i1\tOne\t1995\t"He said ""hi""\tand left"\t1\timg/one.png\n'
        'i2\tTwo\t\tplain\t0\t\n'
        'cold\tThree\t2001\t\t0\t\n', encoding="utf-8")
    d = read_canonical(tmp_path)
    assert list(d.item_ids) == ["i1", "i2", "cold"]
    assert d.cold_items.tolist() == [2]
    assert list(d.items.text) == ["title", "plot"]  # year is numeric, has_image a flag
    assert d.items.text["plot"] == ['He said "hi"\tand left', "plain", ""]
    assert d.items.image[0] == str((tmp_path / "img" / "one.png").absolute())
    assert d.items.image[1:] == [None, None]
    assert "missing_media" not in d.report


def test_yaml_text_columns_override(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "u 1")
    tsv(tmp_path / "items.tsv", "item code title", "1 123 Title")
    (tmp_path / "dataset.yaml").write_text("text_columns: [code]\n")
    assert list(read_canonical(tmp_path).items.text) == ["code"]


def test_reader_option_text_columns_keeps_a_numeric_column_and_its_order(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "u 1")
    tsv(tmp_path / "items.tsv", "item year title", "1 1995 Heat")
    assert list(read_canonical(tmp_path).items.text) == ["title"]          # a numeric column is not text by default
    d = load_dataset(tmp_path, text_columns=["title", "year"])
    assert list(d.items.text) == ["title", "year"] and d.items.item_text(0) == "Heat. 1995"
    with pytest.raises(DataError, match="plot"):
        read_canonical(tmp_path, text_columns=["plot"])
    with pytest.raises(ConfigError, match="text_columns"):
        read_canonical(tmp_path, text_columns="title")


def test_media_conventions_and_features(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "u 1", "u 2", "u 3")
    tsv(tmp_path / "items.tsv", "item title has_image", "1 a 1", "2 b 1", "3 c 0")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(png_bytes())
    (tmp_path / "images" / "2.png").write_bytes(png_bytes())
    (tmp_path / "audio").mkdir()
    wav_file(tmp_path / "audio" / "3.wav")
    feats = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    write_features(tmp_path / "features" / "image.safetensors",
                   FeatureTable(feats, torch.tensor([True, True, False])), ["3", "2", "1"])
    d = read_canonical(tmp_path, verify_media=True)  # 1.jpg holds PNG bytes: PIL still decodes it
    assert d.items.image[0].endswith("1.jpg") and d.items.image[1].endswith("2.png") and d.items.image[2] is None
    assert d.items.audio[:2] == [None, None] and d.items.audio[2].endswith("3.wav")
    ft = d.items.features["image"]
    assert ft.mask.tolist() == [False, True, True]  # item "1" is row 2 of the file, masked there
    assert torch.equal(ft.features[1], feats[1]) and torch.equal(ft.features[2], feats[0])


# ---------------------------------------------------------------------------
# writing and the round trip
# ---------------------------------------------------------------------------

def _rich_dataset(tmp_path: Path) -> Dataset:
    audio = wav_file(tmp_path / "clip.wav")
    train = Interactions(user=[0, 0, 1, 2, 2, 1], item=[0, 1, 1, 2, 0, 3], behavior=[0, 1, 0, 0, 2, 2],
                         timestamp=np.array([5, 6, 7, 8, 9, 10]), rating=np.array([1.5, 2, 3, 4, 5, 1]),
                         scenario=np.array([1, 0, 1, 0, 1, 1]), labels={"label": np.array([1., 0, 1, 1, 0, 1])})
    test = Interactions(user=[0, 1], item=[2, 2], behavior=[2, 2], scenario=np.array([0, 1]))
    valid = Interactions(user=[2], item=[3], behavior=[2])
    exposures = Interactions(user=[0, 1, 2], item=[1, 2, 3], behavior=[2, 2, 2], scenario=np.array([1, 0, 0]),
                             labels={"click": np.array([1., 0, 1]), "convert": np.array([0., 0, 1])})
    items = ItemContent(
        text={"title": ["Alpha", 'Beta "quoted"', "Gamma\twith tab", "", "Cold one"]},
        image=[png_bytes(), None, png_bytes((0, 0, 255)), None, png_bytes((0, 255, 0))],
        audio=[None, str(audio), None, None, None],
        features={"text": FeatureTable(torch.randn(5, 3), torch.tensor([True, True, True, False, True]))})
    return Dataset(name="rich", behaviors=["view", "cart", "buy"], target="buy",
                   user_ids=np.array(["u0", "u1", "007"], dtype=object),
                   item_ids=np.array(["i0", "i1", "i/2", "i3", "cold"], dtype=object),
                   train=train, valid=valid, test=test, scenarios=["feed", "home"], items=items,
                   exposures=exposures)


def test_round_trip_preserves_everything(tmp_path):
    data = _rich_dataset(tmp_path)
    out = tmp_path / "out"
    write_canonical(data, out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dir left
    back = read_canonical(out)
    assert back.name == "rich" and back.behaviors == data.behaviors and back.target == "buy"
    assert list(back.user_ids) == list(data.user_ids) and list(back.item_ids) == list(data.item_ids)
    for split in ("train", "valid", "test"):
        assert rows_as_strings(back, split) == rows_as_strings(data, split)
    assert back.train.timestamp.tolist() == data.train.timestamp.tolist()
    assert back.train.rating.tolist() == data.train.rating.tolist()
    assert back.train.labels["label"].tolist() == data.train.labels["label"].tolist()
    assert back.scenarios == ["feed", "home"]  # index order kept (the file shows "home" first)
    assert back.train.scenario.tolist() == data.train.scenario.tolist()
    assert back.test.scenario.tolist() == data.test.scenario.tolist()
    assert back.exposures.scenario.tolist() == data.exposures.scenario.tolist()
    assert back.items.text == data.items.text
    assert back.cold_items.tolist() == [4]
    for a, b in zip(back.items.image, data.items.image):
        assert (a is None) == (b is None) and (a is None or Path(a).read_bytes() == b)
    assert back.items.audio[1] is not None and Path(back.items.audio[1]).read_bytes() == Path(data.items.audio[1]).read_bytes()
    ft, ft0 = back.items.features["text"], data.items.features["text"]
    assert torch.equal(ft.mask, ft0.mask) and torch.allclose(ft.features[ft.mask], ft0.features[ft0.mask])
    assert back.exposures is not None and len(back.exposures) == 3
    assert back.exposures.labels["click"].tolist() == [1.0, 0.0, 1.0]
    assert back.exposures.labels["convert"].tolist() == [0.0, 0.0, 1.0]
    assert back.describe()["interactions"] == data.describe()["interactions"]
    # a second round trip writes the same files
    write_canonical(back, tmp_path / "again")
    for name in ("interactions.tsv", "test.tsv", "valid.tsv", "items.tsv", "exposures.tsv", "dataset.yaml"):
        assert (out / name).read_text() == (tmp_path / "again" / name).read_text(), name


def test_write_refuses_non_empty_output_and_leaves_nothing_on_failure(tmp_path):
    data = _rich_dataset(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="keep.txt"):
        write_canonical(data, out)
    write_canonical(data, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "interactions.tsv").exists()
    write_canonical(data.replace(name="second"), out)  # an earlier output of this writer: replaced
    assert read_canonical(out).name == "second"
    bad = data.replace(items=ItemContent(image=[b"not an image"] * 5))
    with pytest.raises(DataError, match="image"):
        write_canonical(bad, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------
# peer formats
# ---------------------------------------------------------------------------

def _mmrec_dir(tmp_path: Path) -> Path:
    d = tmp_path / "baby"
    tsv(d / "baby.inter", "userID itemID rating timestamp x_label",
        "0 0 5 100 0", "0 1 4 101 0", "1 1 3 102 0", "1 2 5 103 1", "0 3 2 104 2", "2 0 1 105 2")
    np.save(d / "image_feat.npy", np.array([[1, 2], [0, 0], [3, 4], [5, 6], [7, 8]], dtype=np.float32))
    np.save(d / "text_feat.npy", np.ones((5, 3), dtype=np.float32))
    return d


def test_mmrec_format(tmp_path):
    d = load_dataset(_mmrec_dir(tmp_path))
    assert d.name == "baby" and d.behaviors == ["interact"]
    assert d.n_users == 3 and d.n_items == 5  # 5 feature rows: item 4 exists, without interactions
    assert len(d.train) == 3 and len(d.valid) == 1 and len(d.test) == 2
    assert d.test.user.tolist() == [0, 2] and d.test.item.tolist() == [3, 0]
    assert d.items.features["image"].mask.tolist() == [True, False, True, True, True]
    assert d.items.features["text"].mask.all() and d.items.features["text"].dim == 3
    assert d.train.rating.tolist() == [5.0, 4.0, 3.0]
    assert d.report["held_out_without_train"]["test"] == {"rows": 1}  # user 2 has no training row
    assert d.cold_items.tolist() == [2, 3, 4]  # no training row (2 is only in valid)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_mbgmn_naming(tmp_path):
    m = lambda rows: sp.csr_matrix((np.ones(len(rows)), tuple(zip(*rows))), shape=(3, 4))  # noqa: E731
    _dump(tmp_path / "trn_buy", m([(0, 1)]))
    _dump(tmp_path / "trn_pv", m([(0, 1), (0, 2), (1, 3), (2, 0)]))
    _dump(tmp_path / "trn_cart", m([(0, 1), (1, 3)]))
    _dump(tmp_path / "trn_fav", m([(2, 0)]))
    _dump(tmp_path / "tst_int", [3, None, np.int64(2)])
    assert detect_format(tmp_path) == "mbgmn"
    d = load_dataset(tmp_path)
    assert d.behaviors == ["pv", "fav", "cart", "buy"] and d.target == "buy"
    assert (d.n_users, d.n_items) == (3, 4)
    assert d.describe()["interactions"] == {"pv": 4, "fav": 1, "cart": 2, "buy": 1}
    assert d.test.user.tolist() == [0, 2] and d.test.item.tolist() == [3, 2]
    assert set(d.test.behavior.tolist()) == {3}
    assert d.train.timestamp is None


def test_sslrec_naming_skips_derived_and_keeps_times(tmp_path):
    m = lambda rows, v: sp.csr_matrix((np.array(v, float), tuple(zip(*rows))), shape=(2, 3))  # noqa: E731
    _dump(tmp_path / "train_mat_view.pkl", m([(0, 0), (1, 2)], [1600000000, 1600000100]))
    _dump(tmp_path / "train_mat_buy.pkl", m([(1, 2)], [1600000200]))
    _dump(tmp_path / "train_mat_view_buy.pkl", m([(0, 0), (1, 2)], [1, 1]))
    _dump(tmp_path / "test_mat.pkl", sp.coo_matrix(([1.0], ([0], [1])), shape=(2, 3)))
    (tmp_path / "meta_multi_single_beh_user_index_shuffle").write_bytes(b"x")
    d = load_dataset(tmp_path)
    assert d.behaviors == ["view", "buy"] and d.target == "buy"
    assert d.report["skipped_files"] == ["train_mat_view_buy.pkl"]
    assert d.train.timestamp.tolist() == [1600000000, 1600000100, 1600000200]
    assert d.test.user.tolist() == [0] and d.test.item.tolist() == [1]


def test_mbgmn_unknown_behavior_names_need_an_order(tmp_path):
    m = sp.csr_matrix(np.eye(2))
    for b in ("neg", "pos"):
        _dump(tmp_path / f"trn_{b}", m)
    with pytest.raises(DataError, match="behaviors="):
        load_dataset(tmp_path)
    d = load_dataset(tmp_path, behaviors=["neg", "pos"])
    assert d.behaviors == ["neg", "pos"] and d.target == "pos"


def _recbole_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ml-tiny"
    tsv(d / "ml-tiny.inter", "user_id:token item_id:token rating:float timestamp:float",
        "196 242 3 881250949", "186 302 3 891717742", "196 302 4 881250950")
    (d / "ml-tiny.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\tscore:float\n"
        "242\tKolya\t1996\tComedy\t0.5\n302\t\"L.A. \"\"Confidential\"\"\"\t1997\tCrime Thriller\t0.7\n"
        "999\tNever Rated\t1990\tDrama\t0.1\n", encoding="utf-8")
    return d


def test_recbole_atomic_files(tmp_path):
    d = load_dataset(_recbole_dir(tmp_path))
    assert d.name == "ml-tiny" and d.behaviors == ["interact"]
    assert list(d.user_ids) == ["186", "196"] and list(d.item_ids) == ["242", "302", "999"]
    assert list(d.items.text) == ["movie_title", "class"]
    assert d.items.text["movie_title"] == ["Kolya", 'L.A. "Confidential"', "Never Rated"]
    assert d.train.timestamp.tolist() == [881250949, 891717742, 881250950]
    assert d.cold_items.tolist() == [2]


def test_recbole_benchmark_split_files(tmp_path):
    d = tmp_path / "bench"
    tsv(d / "bench.train.inter", "user_id:token item_id:token", "a x", "b y")
    tsv(d / "bench.valid.inter", "user_id:token item_id:token", "a y")
    tsv(d / "bench.test.inter", "user_id:token item_id:token", "b x")
    data = load_dataset(d)
    assert len(data.train) == 2 and rows_as_strings(data, "test") == [("b", "x", "interact")]


# ---------------------------------------------------------------------------
# detection and dispatch
# ---------------------------------------------------------------------------

def test_detection_and_forced_format(tmp_path):
    tsv(tmp_path / "canon" / "interactions.tsv", "user item", "a b")
    assert detect_format(tmp_path / "canon") == "canonical"
    assert detect_format(tmp_path / "canon" / "interactions.tsv") == "canonical"  # a file: its directory
    assert detect_format(_mmrec_dir(tmp_path)) == "mmrec"
    assert detect_format(_recbole_dir(tmp_path)) == "recbole"
    assert load_dataset(tmp_path / "canon", format="CANONICAL").n_users == 1
    with pytest.raises(DataError, match="trn_"):
        load_dataset(tmp_path / "canon", format="mbgmn")
    with pytest.raises(ConfigError, match="known: canonical, csv, mbgmn, mmrec, recbole"):
        load_dataset(tmp_path / "canon", format="parquet")
    with pytest.raises(ConfigError, match="verify_media"):
        load_dataset(tmp_path / "canon", colour="blue")


def test_synthetic_spec_dispatches_to_make_world(monkeypatch):
    calls = []
    fake = types.ModuleType("mmrec.datasets.synthetic")
    fake.make_world = lambda preset, seed=0, **kw: calls.append((preset, seed, kw)) or "world"
    monkeypatch.setitem(sys.modules, "mmrec.datasets.synthetic", fake)
    assert load_dataset("synthetic:tiny", seed=3, n_users=5) == "world"
    assert calls == [("tiny", 3, {"n_users": 5})]


def test_encode_matches_a_dict_on_tricky_strings():
    rng = random.Random(0)
    pool = ["007", "7", "07", "", "a", "a\x00", "\x00", "é", "abcdefg", "abcdefgh", "abcdefghijklmno",
            "abcdefghijklmnop", "x" * 30] + [str(i) for i in range(200)]
    for n in (1, 7, 2000):
        values = [rng.choice(pool) for _ in range(n)]
        for few in (False, True):
            parts = [values[: n // 3], values[n // 3:]]
            codes, uniques = encode(pa.chunked_array([pa.array(p, pa.string()) for p in parts]), few=few)
            seen: dict[str, int] = {}
            expected = [seen.setdefault(v, len(seen)) for v in values]
            assert codes.tolist() == expected and uniques.to_pylist() == list(seen)


# -- the integer-id fast path must read exactly what the string path reads -------------
_INT_PATH_CASES = {
    "plain": "user\titem\tbehavior\n10\t2\tview\n7\t3\tbuy\n0\t3\tbuy\n",
    "no-trailing-newline": "user\titem\tbehavior\n1\t2\tview\n7\t3\tbuy",
    "leading-zero": "user\titem\tbehavior\n1\t2\tview\n007\t3\tbuy\n7\t3\tbuy\n",
    "padded": "user\titem\tbehavior\n1\t2\tview\n 7\t3\tbuy\n7\t3\tbuy\n",
    "negative": "user\titem\tbehavior\n1\t2\tview\n-7\t3\tbuy\n",
    "crlf": "user\titem\tbehavior\r\n1\t2\tview\r\n7\t3\tbuy\r\n",
    "timestamp-zero-padded": "user\titem\tbehavior\ttimestamp\n10\t2\tview\t100\n7\t3\tbuy\t0099\n",
    "mixed": "user\titem\tbehavior\n1\t2\tview\nu7\t3\tbuy\n",
}


@pytest.mark.parametrize("case", sorted(_INT_PATH_CASES))
def test_integer_id_fast_path_matches_string_path(tmp_path, monkeypatch, case):
    import mmrec.datasets.readers.table as table_mod
    from mmrec.datasets.canonical import read_canonical

    (tmp_path / "interactions.tsv").write_bytes(_INT_PATH_CASES[case].encode())
    fast = read_canonical(tmp_path)
    monkeypatch.setattr(table_mod, "_parse_int_ids", lambda *a, **k: None)
    slow = read_canonical(tmp_path)
    assert list(fast.user_ids) == list(slow.user_ids)
    assert list(fast.item_ids) == list(slow.item_ids)
    assert fast.behaviors == slow.behaviors
    for col in ("user", "item", "behavior"):
        np.testing.assert_array_equal(getattr(fast.train, col), getattr(slow.train, col))
    if case == "leading-zero":
        assert "007" in list(fast.user_ids) and "7" in list(fast.user_ids)


def test_integer_id_fast_path_is_taken_for_canonical_integers(tmp_path):
    from mmrec.datasets.readers.table import ID, _parse_int_ids, read_header

    path = tmp_path / "interactions.tsv"
    path.write_text(_INT_PATH_CASES["plain"])
    wanted = {"user": ("user", ID), "item": ("item", ID), "behavior": ("behavior", ID)}
    cols = _parse_int_ids(path, read_header(path), wanted, ["user", "item"])
    assert cols is not None and cols["user"].type == pa.int64()
    path.write_text(_INT_PATH_CASES["leading-zero"])
    assert _parse_int_ids(path, read_header(path), wanted, ["user", "item"]) is None
