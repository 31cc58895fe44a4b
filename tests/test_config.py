from pathlib import Path

import pytest

from mmrec.config import apply_overrides, from_dict
from mmrec.errors import ConfigError
from mmrec.registry import Registry
from mmrec.train.config import RunConfig, build_run_config


def test_overrides_parse_yaml_values_and_nest():
    d = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.01", "train.ks=[5, 10]", "seed=3", "name=abc"])
    assert d == {"train": {"lr": 0.01, "ks": [5, 10]}, "seed": 3, "name": "abc"}


def test_unknown_key_names_its_path():
    with pytest.raises(ConfigError, match="train.lrr"):
        from_dict(RunConfig, {"train": {"lrr": 1}})


def test_yaml_then_cli_then_set(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {name: bprmf, dim: 16}\ntrain: {epochs: 3, lr: 0.5}\nprotocol: sampled\n")
    cfg = build_run_config(str(cfg_file), {"epochs": 7, "data": "x"}, ["model.dim=8", "train.lr=0.25"])
    assert cfg.model == "bprmf" and cfg.model_args == {"dim": 8}
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.25 and cfg.protocol == "sampled"
    assert cfg.select_metric() == "NDCG@10"


def test_bad_protocol_is_a_clear_error():
    with pytest.raises(ConfigError, match="protocol"):
        build_run_config(None, {"protocol": "weird"}, [])


def test_registry_unknown_name_lists_known():
    r = Registry("thing")
    r.register("a", object)
    with pytest.raises(ConfigError, match="known: a"):
        r.get("b")
    with pytest.raises(ConfigError, match="twice"):
        r.register("A", int)
