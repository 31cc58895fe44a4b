"""Fault injection on run directories: concurrent writers, unwritable outputs, changed data.

* Locks: a second process on the same ``--out`` is refused at once, naming the holder; a
  crashed holder (SIGKILL) leaves no stale lock.
* Output checks: ``--out`` under a file or in a read-only directory fails before any data is read.
* Provenance: ``RUN/provenance.json`` holds versions and the data fingerprint; ``evaluate`` and
  ``recommend`` warn when the data changed, and stay quiet when it only moved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mmrec.cli import main
from mmrec.errors import MMRecError
from mmrec.rundir import (LOCK, PROVENANCE, ProvenanceWarning, RunLockedError, data_record, prepare_run_dir,
                          run_lock, versions)
from mmrec.train.config import build_run_config
from mmrec.train.run import evaluate, train

HOLDER = ("import sys\nfrom mmrec.rundir import run_lock\n"
          "with run_lock(sys.argv[1], 'train'):\n    print('held', flush=True)\n    sys.stdin.read()\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """synthetic:tiny written as a canonical directory (interactions, items, images, audio, features)."""
    from mmrec.datasets.canonical import write_canonical
    from mmrec.datasets.synthetic import make_world
    root = tmp_path_factory.mktemp("data") / "tiny"
    write_canonical(make_world("tiny", seed=0), root)
    return root


def _cfg(data: str | Path, out: Path, *sets: str):
    return build_run_config(None, {"model": "bprmf", "data": str(data), "out": str(out), "epochs": 1}, list(sets))


def _no_data_reads(monkeypatch) -> None:
    """Make any data loading fail loudly: the checks under test must come first."""
    def refuse(*a, **k):
        raise AssertionError("data was read before the run directory was checked")
    monkeypatch.setattr("mmrec.train.run.prepare_data", refuse)


@pytest.fixture
def holder(tmp_path):
    """Another process holding RUN/.lock as `mmrec train` would."""
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# -- locks ----------------------------------------------------------------------------------------
def test_second_process_on_the_same_out_is_refused(holder, capsys, monkeypatch):
    run, proc = holder
    _no_data_reads(monkeypatch)
    rc = main(["train", "--data", "synthetic:tiny", "--model", "bprmf", "--out", str(run), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"run directory {run} is in use by another mmrec process (train, pid {proc.pid} on " in err
    assert "choose another --out" in err
    assert sorted(p.name for p in run.iterdir()) == [LOCK]  # nothing written, nothing interleaved


def test_lock_of_a_killed_process_is_released(holder):
    run, proc = holder
    with pytest.raises(RunLockedError):
        with run_lock(run):
            pass
    proc.kill()  # SIGKILL: no cleanup code runs; the OS drops the flock
    proc.wait()
    with run_lock(run, "train"):
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()


def test_train_holds_the_lock_for_its_whole_run(tmp_path, monkeypatch):
    from mmrec.train.trainer import Trainer
    run = tmp_path / "run"
    seen: list[str] = []
    real_fit = Trainer.fit

    def fit(self, model, data):  # mid-training: a second writer must be refused
        with pytest.raises(RunLockedError) as err:
            with run_lock(run, "train"):
                pass
        seen.append(str(err.value))
        return real_fit(self, model, data)

    monkeypatch.setattr(Trainer, "fit", fit)
    train(_cfg("synthetic:tiny", run))
    assert len(seen) == 1 and "(train, pid" in seen[0]
    with run_lock(run):  # released when train returned
        pass


def test_pretrain_and_evaluate_are_refused_while_locked(tmp_path):
    from mmrec.pretrain.config import build_pretrain_config
    from mmrec.pretrain.run import pretrain
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run, "train"):
        with pytest.raises(RunLockedError, match=r"in use by another mmrec process \(train, pid"):
            pretrain(build_pretrain_config(None, {"out": str(run), "data": "synthetic:tiny"}, []))
        with pytest.raises(RunLockedError):
            evaluate(run)
    assert sorted(p.name for p in run.iterdir()) == [LOCK]


# -- output directory -----------------------------------------------------------------------------
def test_out_under_a_file_fails_before_reading_data(tmp_path, capsys, monkeypatch):
    _no_data_reads(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = main(["train", "--data", "synthetic:tiny", "--model", "bprmf", "--out", str(blocker / "run")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == \
        f"mmrec: error: cannot create run directory {blocker / 'run'}: {blocker} is a file, not a directory"
    with pytest.raises(MMRecError, match="is a file, not a directory"):
        prepare_run_dir(blocker / "deeper" / "run")


def test_out_under_a_file_fails_for_pretrain(tmp_path):
    from mmrec.pretrain.config import build_pretrain_config
    from mmrec.pretrain.run import pretrain
    (tmp_path / "f").write_text("x")
    with pytest.raises(MMRecError, match="cannot create run directory"):
        pretrain(build_pretrain_config(None, {"out": str(tmp_path / "f" / "run"), "data": "synthetic:tiny"}, []))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555")
def test_read_only_out_fails_before_training(tmp_path, monkeypatch):
    _no_data_reads(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(MMRecError, match=r"run directory .*ro is not writable"):
            train(_cfg("synthetic:tiny", ro))
        with pytest.raises(MMRecError, match=r"cannot create run directory .*ro/run"):
            train(_cfg("synthetic:tiny", ro / "run"))
    finally:
        ro.chmod(0o755)


# -- provenance -----------------------------------------------------------------------------------
def _provenance_warnings(fn, *args, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, ProvenanceWarning)]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "bprmf"
    train(_cfg(data_dir, run))
    return run


def test_provenance_records_versions_and_the_data_fingerprint(trained, data_dir):
    record = json.loads((trained / PROVENANCE).read_text())
    assert record["command"] == "train"
    assert {"python", "mmrec", "torch", "numpy", "torch_geometric"} <= set(record["versions"])
    assert record["versions"] == versions()
    import torch
    assert record["versions"]["torch"] == torch.__version__
    data = record["data"]
    assert data["spec"] == str(data_dir) and data["digest"] == data_record(str(data_dir))["digest"]
    assert {"interactions.tsv", "items.tsv"} <= set(data["files"]) and data["n_files"] == len(data["files"])
    assert (trained / "config.yaml").exists()


def test_unchanged_or_moved_data_gives_no_warning(trained, data_dir, tmp_path):
    assert _provenance_warnings(evaluate, trained) == []
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    assert _provenance_warnings(evaluate, trained, data=str(moved)) == []  # compared by content


def test_changed_data_warns_in_evaluate_and_recommend(trained, data_dir, tmp_path):
    from mmrec.recommend import Recommender
    copy = tmp_path / "changed"
    shutil.copytree(data_dir, copy)
    with open(copy / "dataset.yaml", "a") as f:
        f.write("# edited after training\n")
    (copy / "notes.txt").write_text("new file")
    got = _provenance_warnings(evaluate, trained, data=str(copy))
    assert len(got) == 1
    assert f"data {copy} differs from the data run {trained} was trained on" in got[0]
    assert "changed dataset.yaml; added notes.txt" in got[0]
    assert _provenance_warnings(Recommender.load, trained, data=str(copy)) == got


def test_synthetic_run_records_its_spec(tmp_path):
    run = tmp_path / "run"
    train(_cfg("synthetic:tiny", run))
    data = json.loads((run / PROVENANCE).read_text())["data"]
    assert data["spec"] == "synthetic:tiny" and "files" not in data
    assert _provenance_warnings(evaluate, run) == []


def test_pretrain_records_provenance(tmp_path):
    from mmrec.pretrain.config import build_pretrain_config
    from mmrec.pretrain.run import pretrain
    tiny_text = ("text={name: bert, pretrained: null, args: {tokenizer: all-MiniLM-L6-v2, max_length: 16, "
                 "config: {hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}}")
    cfg = build_pretrain_config(None, {"out": str(tmp_path / "pt"), "data": "synthetic:tiny", "train.progress": False},
                                [tiny_text, "modalities=[text]", "train.epochs=1", "loader.batch_size=100",
                                 "train.stop_after=1", "train.checkpoint_every=0"])
    assert pretrain(cfg)["interrupted"]
    record = json.loads((tmp_path / "pt" / PROVENANCE).read_text())
    assert record["command"] == "pretrain" and record["data"]["spec"] == "synthetic:tiny"
    with run_lock(tmp_path / "pt"):  # released when pretrain returned
        pass
