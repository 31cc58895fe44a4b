"""Bad input: each case is a clear error naming file, line and field, or is skipped and counted."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from mmrec.datasets.canonical import read_canonical
from mmrec.datasets.loading import detect_format, load_dataset
from mmrec.errors import ConfigError, DataError
from test_readers import png_bytes, tsv


def error_of(path: Path, **kw) -> DataError:
    with pytest.raises(DataError) as e:
        load_dataset(path, **kw)
    return e.value


def assert_points_at(err: DataError, file: str, line: int | None, field: str | None) -> None:
    msg = str(err)
    assert file in msg and err.file is not None and err.file.endswith(file), msg
    if line is not None:
        assert f"line {line}" in msg and err.line == line, msg
    if field is not None:
        assert f"'{field}'" in msg and err.field == field, msg


def test_malformed_row_names_file_line_and_field(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item behavior", "a x view", "a y view", "b x", "b y buy")
    assert_points_at(error_of(tmp_path), "interactions.tsv", 4, "behavior")


def test_extra_field(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "a x", "a y z")
    err = error_of(tmp_path)
    assert_points_at(err, "interactions.tsv", 3, "item")
    assert "3 fields" in str(err)


def test_non_numeric_timestamp(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item timestamp", "a x 1", "a y 2", "b x 3", "b y yesterday")
    err = error_of(tmp_path)
    assert_points_at(err, "interactions.tsv", 5, "timestamp")
    assert "yesterday" in str(err)


def test_non_finite_rating(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item rating", "a x 1", "a y nan")
    assert_points_at(error_of(tmp_path), "interactions.tsv", 3, "rating")


def test_empty_user(tmp_path):
    (tmp_path / "interactions.tsv").write_text("user\titem\na\tx\n\ty\n")
    assert_points_at(error_of(tmp_path), "interactions.tsv", 3, "user")


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    (tmp_path / "interactions.tsv").write_text("user\titem\trating\na\tx\t1\n\nb\ty\tbad\n")
    assert_points_at(error_of(tmp_path), "interactions.tsv", 4, "rating")


def test_missing_required_column(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user behavior", "a view")
    assert_points_at(error_of(tmp_path), "interactions.tsv", 1, "item")


def test_invalid_utf8(tmp_path):
    (tmp_path / "interactions.tsv").write_bytes(b"user\titem\na\tx\nb\t\xff\xfe\n")
    assert_points_at(error_of(tmp_path), "interactions.tsv", 3, None)


def test_unknown_behavior_not_in_yaml(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item behavior", "a x view", "a y buy", "b y clck")
    (tmp_path / "dataset.yaml").write_text("behaviors: [view, buy]\n")
    err = error_of(tmp_path)
    assert_points_at(err, "interactions.tsv", 4, "behavior")
    assert "clck" in str(err)


def test_scenario_not_in_yaml(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item scenario", "a x home", "a y feed")
    (tmp_path / "dataset.yaml").write_text("scenarios: [home]\n")
    assert_points_at(error_of(tmp_path), "interactions.tsv", 3, "scenario")


def test_unknown_behavior_in_test_file(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item behavior", "a x view", "a y buy")
    tsv(tmp_path / "test.tsv", "user item behavior", "a x buy", "a y cart")
    assert_points_at(error_of(tmp_path), "test.tsv", 3, "behavior")


def test_unseen_test_ids_are_dropped_and_counted(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "a x", "b y")
    tsv(tmp_path / "test.tsv", "user item", "a y", "ghost x", "b nowhere", "ghost nowhere", "ghost y")
    with pytest.warns(UserWarning, match="dropped 4 of 5 rows"):
        d = load_dataset(tmp_path)
    assert len(d.test) == 1
    assert d.report["unseen"]["test"] == {"users": 1, "items": 1, "rows": 4}


def test_unseen_test_ids_error_mode(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "a x", "b y")
    tsv(tmp_path / "test.tsv", "user item", "a y", "b nowhere")
    err = error_of(tmp_path, on_unseen="error")
    assert_points_at(err, "test.tsv", 3, "item")
    assert "nowhere" in str(err)
    with pytest.raises(ConfigError, match="on_unseen"):
        load_dataset(tmp_path, on_unseen="ignore")


def test_missing_image_file_is_counted_and_masked(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "a 1", "a 2")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "1.png").write_bytes(png_bytes())
    tsv(tmp_path / "items.tsv", "item image", "1 pics/1.png", "2 pics/2.png")
    with pytest.warns(UserWarning, match="missing media"):
        d = load_dataset(tmp_path)
    assert d.report["missing_media"] == {"image": 1}
    assert d.items.image[0] is not None and d.items.image[1] is None


def test_missing_image_by_convention_with_has_image_flag(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "a 1", "a 2", "a 3")
    tsv(tmp_path / "items.tsv", "item title has_image", "1 t 1", "2 t 1", "3 t 0")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(png_bytes())
    with pytest.warns(UserWarning, match="missing media"):
        d = load_dataset(tmp_path)
    assert d.report["missing_media"] == {"image": 1}  # item 2 says it has one; item 3 does not
    assert [x is not None for x in d.items.image] == [True, False, False]


def test_corrupt_image_counted_with_verify_media(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "a 1", "a 2")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(png_bytes())
    (tmp_path / "images" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert "unreadable_media" not in load_dataset(tmp_path).report  # not decoded unless asked
    with pytest.warns(UserWarning, match="do not decode"):
        d = load_dataset(tmp_path, verify_media=True)
    assert d.report["unreadable_media"] == {"image": 1}
    assert d.items.image[0] is not None and d.items.image[1] is None


def test_empty_dataset(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item behavior")
    assert_points_at(error_of(tmp_path), "interactions.tsv", None, None)
    assert "no interaction rows" in str(error_of(tmp_path))
    (tmp_path / "interactions.tsv").write_text("")
    assert "empty file" in str(error_of(tmp_path))


def test_missing_target_behavior(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item behavior", "a x view", "a y cart")
    (tmp_path / "dataset.yaml").write_text("target: buy\n")
    err = error_of(tmp_path)
    assert_points_at(err, "dataset.yaml", None, "target")
    (tmp_path / "dataset.yaml").write_text("behaviors: [view, cart, buy]\n")  # target = buy, no rows
    err = error_of(tmp_path)
    assert_points_at(err, "interactions.tsv", None, "behavior")
    assert "'buy' has no training rows" in str(err)


def test_bad_yaml_key_names_the_file(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "a x")
    (tmp_path / "dataset.yaml").write_text("behaviours: [view]\n")
    err = error_of(tmp_path)
    assert "dataset.yaml" in str(err) and "behaviours" in str(err)


def test_duplicate_item_in_items_tsv(tmp_path):
    tsv(tmp_path / "interactions.tsv", "user item", "a x")
    tsv(tmp_path / "items.tsv", "item title", "x one", "y two", "x again")
    err = error_of(tmp_path)
    assert_points_at(err, "items.tsv", 4, "item")
    assert "line 2" in str(err)  # where it was first listed


def test_undetectable_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as e:
        detect_format(tmp_path)
    msg = str(e.value)
    for looked_for in ("interactions.tsv", "x_label", "user_id:token", "trn_", "train_mat_"):
        assert looked_for in msg
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent")


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "trn_buy", "wb") as f:
        pickle.dump(Evil(), f)
    err = error_of(tmp_path)
    assert "trn_buy" in str(err) and "refusing" in str(err)
    assert not (tmp_path / "pwned").exists()


def test_mbgmn_shape_mismatch(tmp_path):
    for b, shape in (("pv", (2, 3)), ("buy", (2, 4))):
        with open(tmp_path / f"trn_{b}", "wb") as f:
            pickle.dump(sp.csr_matrix(shape), f)
    assert error_of(tmp_path).field == "shape"


def test_mmrec_bad_x_label(tmp_path):
    tsv(tmp_path / "x.inter", "userID itemID x_label", "0 0 0", "0 1 3")
    np.save(tmp_path / "image_feat.npy", np.ones((2, 2), np.float32))
    assert_points_at(error_of(tmp_path), "x.inter", 3, "x_label")


def test_read_canonical_rejects_a_file_path(tmp_path):
    f = tsv(tmp_path / "interactions.tsv", "user item", "a x")
    with pytest.raises(DataError, match="not a directory"):
        read_canonical(f)
