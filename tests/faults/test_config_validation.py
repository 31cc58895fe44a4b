"""Fault injection: typos in registry names and wrongly typed ``--set`` values.

An unknown name lists the registered ones and suggests the closest; a value of the wrong
type names its key. Both through the library and through ``mmrec`` (exit status 2, one line).
"""

from __future__ import annotations

import pytest

from mmrec.cli import main
from mmrec.config import from_dict
from mmrec.errors import ConfigError
from mmrec.registry import FILTRATIONS, FUSIONS, HEADS, MODELS, SPLITS, Registry
from mmrec.train.config import RunConfig, build_run_config


@pytest.fixture(scope="module", autouse=True)
def _registries():
    """Fill every registry the CLI resolves names in."""
    import mmrec.datasets.splits  # noqa: F401
    import mmrec.heads  # noqa: F401
    from mmrec.fusion.content import import_all_fusions
    from mmrec.models.base import import_all_models
    import_all_models()
    import_all_fusions()


TYPOS = [  # (registry, typo, the suggestion it must make)
    (MODELS, "lightgnc", "lightgcn"),
    (MODELS, "BPRMF2", "bprmf"),
    (MODELS, "light-gcn-mb", "lightgcn-mb"),
    (FUSIONS, "atention", "attention"),
    (FUSIONS, "concatenate", "concat"),
    (FILTRATIONS, "edge_prune", "edge-prune"),
    (HEADS, "mmeo", "mmoe"),
    (HEADS, "shared_bottom", "shared-bottom"),
    (SPLITS, "temporl", "temporal"),
    (SPLITS, "lo", "loo"),
]


@pytest.mark.parametrize("registry,typo,expected", TYPOS, ids=[f"{r.kind}:{t}" for r, t, _ in TYPOS])
def test_unknown_name_suggests_the_closest_and_lists_all(registry, typo, expected):
    assert expected in registry  # the contract name is registered
    with pytest.raises(ConfigError) as err:
        registry.get(typo)
    msg = str(err.value)
    assert msg.startswith(f"unknown {registry.kind} '{typo}'; did you mean ")
    suggested = msg.split("did you mean ")[1].split("?")[0]
    assert f"'{expected}'" in suggested
    assert msg.endswith("? known: " + ", ".join(registry.names()))


def test_no_suggestion_when_nothing_is_close():
    reg: Registry = Registry("widget")
    reg.register("alpha", object())
    with pytest.raises(ConfigError, match=r"^unknown widget 'zzzz'; known: alpha$"):
        reg.get("zzzz")


def test_cli_typo_in_model_name_exits_2_with_the_suggestion(tmp_path, capsys):
    rc = main(["train", "--data", "synthetic:tiny", "--model", "lightgnc", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown model 'lightgnc'; did you mean 'lightgcn' or 'lightgcn-mb'? known: behavior-prior, " in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_cli_typo_in_fusion_name(tmp_path, capsys):
    rc = main(["train", "--data", "synthetic:tiny", "--model", "vbpr", "--fusion", "atention",
               "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown fusion 'atention'; did you mean 'attention'?" in err


BAD_VALUES = [  # (--set, the key the error must name, what it must say)
    ("train.epochs=abc", "train.epochs", "expected int, got 'abc'"),
    ("train.epochs=1.5", "train.epochs", "expected int, got 1.5"),      # int(1.5) would truncate silently
    ("train.epochs=true", "train.epochs", "expected int, got True"),    # bool is an int in Python
    ("train.epochs=[1, 2]", "train.epochs", "expected int, got [1, 2]"),
    ("train.lr=fast", "train.lr", "expected float, got 'fast'"),
    ("train.lr=false", "train.lr", "expected float, got False"),
    ("seed=x", "seed", "expected int, got 'x'"),
]


@pytest.mark.parametrize("override,key,says", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_wrong_type_in_set_names_the_key(override, key, says):
    with pytest.raises(ConfigError) as err:
        build_run_config(None, {"model": "bprmf", "data": "synthetic:tiny"}, [override])
    assert str(err.value) == f"{key}: {says}"


def test_model_section_types_are_checked_with_their_path():
    from mmrec.models.base import model_config
    with pytest.raises(ConfigError, match=r"^model\.dim: expected int, got 'abc'$"):
        model_config("bprmf", {"dim": "abc"})
    assert model_config("bprmf", {"dim": 8.0}).dim == 8  # an integral float is an int


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train\.epoch; did you mean 'train\.epochs'\?"):
        from_dict(RunConfig, {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) sed; did you mean 'seed'\? known: "):
        from_dict(RunConfig, {"sed": 3})


def test_cli_set_wrong_type_exits_2_naming_the_key(tmp_path, capsys):
    rc = main(["train", "--data", "synthetic:tiny", "--model", "bprmf", "--out", str(tmp_path / "run"),
               "--set", "train.epochs=abc"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "mmrec: error: train.epochs: expected int, got 'abc'"
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
