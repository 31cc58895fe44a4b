from pathlib import Path

import pytest
import torch

from mmrec.datasets.features import align_features, read_features, write_features
from mmrec.datasets.schema import FeatureTable
from mmrec.errors import DataError


def test_round_trip_int_ids(tmp_path: Path):
    t = FeatureTable(torch.randn(4, 3), torch.tensor([True, False, True, True]), {"model": "x"})
    write_features(tmp_path / "image.safetensors", t, ["1", "2", "3", "4"])
    back, ids = read_features(tmp_path / "image.safetensors")
    assert ids == ["1", "2", "3", "4"]
    assert torch.equal(back.features, t.features) and torch.equal(back.mask, t.mask)
    assert back.meta["model"] == "x"


def test_string_ids_survive_in_metadata(tmp_path: Path):
    t = FeatureTable(torch.randn(2, 3), torch.ones(2, dtype=torch.bool))
    write_features(tmp_path / "text.safetensors", t, ["007", "a b"])
    _, ids = read_features(tmp_path / "text.safetensors")
    assert ids == ["007", "a b"]


def test_align_masks_items_missing_from_file():
    t = FeatureTable(torch.arange(6.0).view(3, 2), torch.ones(3, dtype=torch.bool))
    out = align_features(t, ["b", "c", "a"], ["a", "z", "b"])
    assert out.mask.tolist() == [True, False, True]
    assert out.features[0].tolist() == [4.0, 5.0] and out.features[2].tolist() == [0.0, 1.0]


def test_write_is_atomic_and_no_temp_left(tmp_path: Path):
    t = FeatureTable(torch.randn(2, 3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError):
        write_features(tmp_path / "x.safetensors", t, ["only-one-id"])
    assert list(tmp_path.iterdir()) == []


def test_corrupt_file_is_a_data_error(tmp_path: Path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="bad.safetensors"):
        read_features(p)
