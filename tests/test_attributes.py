"""``mmrec data attributes``: categorical items.tsv columns as a multi-hot feature table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmrec.cli import main
from mmrec.datasets.attributes import attribute_features
from mmrec.datasets.canonical import read_item_rows
from mmrec.datasets.features import load_feature_file
from mmrec.datasets.loading import load_dataset
from mmrec.errors import ConfigError, DataError

ITEMS = """item\tyear\tgenres\ttitle
a\t1995\tAction|Comedy\tA
b\t1995\tComedy\tB
c\t1997\t\tC
d\t\t\tD
"""


def write_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.tsv").write_text(ITEMS)
    (root / "interactions.tsv").write_text("user\titem\nu1\ta\nu1\tb\nu2\tc\nu2\td\nu3\ta\n")
    return root


def test_multi_hot_columns_values_and_mask(tmp_path):
    rows = read_item_rows(write_dir(tmp_path) / "items.tsv")
    table, vocab = attribute_features(rows, ["year", "genres"])
    assert vocab == ["year=1995", "year=1997", "genres=Action", "genres=Comedy"]
    expected = torch.tensor([[1, 0, 1, 1],     # a: 1995, Action|Comedy
                             [1, 0, 0, 1],     # b
                             [0, 1, 0, 0],     # c: no genres
                             [0, 0, 0, 0]],    # d: nothing -> masked, not an all-zero "attribute"
                            dtype=torch.float32)
    torch.testing.assert_close(table.features, expected)
    assert table.mask.tolist() == [True, True, True, False]
    assert json.loads(table.meta["vocabulary"]) == vocab


def test_min_count_and_max_tokens_keep_the_frequent_values(tmp_path):
    rows = read_item_rows(write_dir(tmp_path) / "items.tsv")
    _, vocab = attribute_features(rows, ["year", "genres"], min_count=2)
    assert vocab == ["year=1995", "genres=Comedy"]
    table, vocab = attribute_features(rows, ["year", "genres"], max_tokens=1)
    assert vocab == ["genres=Comedy"] and table.meta["dropped_tokens"] == "3"  # tie with year=1995: by name
    _, vocab = attribute_features(rows, ["genres"], sep=None)  # no splitting: the cell is the value
    assert vocab == ["genres=Action|Comedy", "genres=Comedy"]


def test_bad_columns_name_the_file_line_and_field(tmp_path):
    rows = read_item_rows(write_dir(tmp_path) / "items.tsv")
    with pytest.raises(DataError) as e:
        attribute_features(rows, ["year", "studio"])
    assert e.value.field == "studio" and e.value.line == 1 and "items.tsv" in str(e.value)
    with pytest.raises(ConfigError, match="twice"):
        attribute_features(rows, ["year", "year"])
    with pytest.raises(DataError, match="carried by >= 5"):
        attribute_features(rows, ["year"], min_count=5)


def test_cli_writes_a_feature_file_that_aligns_to_the_dataset(tmp_path, capsys):
    root = write_dir(tmp_path / "data")
    out = tmp_path / "attributes.safetensors"
    assert main(["data", "attributes", str(root), "--columns", "year", "genres", "--out", str(out)]) == 0
    assert "4 items x 4 attribute values" in capsys.readouterr().out
    data = load_dataset(str(root))
    tables = load_feature_file(out, list(data.item_ids))
    table = tables["attributes"]
    row = {x: k for k, x in enumerate(data.item_ids)}
    assert table.features[row["a"]].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert not bool(table.mask[row["d"]])
    assert main(["data", "attributes", str(tmp_path), "--columns", "year", "--out", str(out)]) == 2  # no items.tsv
