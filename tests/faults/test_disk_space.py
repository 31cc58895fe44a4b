"""A full output file system: refused before the work starts, and a write that still fails is a clear error.

* ``train`` / ``pretrain`` / ``extract`` compare ``shutil.disk_usage`` of their output directory with an
  estimate of what they will write (``mmrec.rundir.training_bytes``, ``PretrainTrainer.space_needed``,
  ``mmrec.pretrain.extract.extraction_bytes``) before the first epoch / step / batch, and with a floor
  (``MIN_FREE_BYTES``) before any data is read. The tests shrink the reported free space.
* An ``OSError(ENOSPC)`` (or a writer's own wording of it) during a checkpoint, weights or metrics write
  becomes an ``OutOfSpaceError`` naming the file; the previous file is untouched (atomic writes).
"""

from __future__ import annotations

import errno
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from mmrec.cli import main
from mmrec.io import OutOfSpaceError, atomic_path, write_json
from mmrec.rundir import MIN_FREE_BYTES, SPACE_MARGIN, check_free_space, state_bytes
from mmrec.train.checkpoint import load_state
from mmrec.train.config import build_run_config
from mmrec.train.run import train

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def free_space(monkeypatch, tmp_path):
    """Report ``box["free"]`` free bytes for every path under tmp_path (None: the real value)."""
    box: dict[str, int | None] = {"free": None}
    real = shutil.disk_usage

    def disk_usage(path):
        if box["free"] is not None and str(Path(path).resolve()).startswith(str(tmp_path.resolve())):
            return Usage(10 << 30, (10 << 30) - box["free"], box["free"])
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return box


def _cfg(out: Path, epochs: int = 2, *sets: str):
    return build_run_config(None, {"model": "bprmf", "data": "synthetic:tiny", "out": str(out), "epochs": epochs,
                                   "device": "cpu"}, ["train.progress=false", *sets])


def _no_data_reads(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("data was read before the free space was checked")
    monkeypatch.setattr("mmrec.train.run.prepare_data", refuse)


def _bytes_in(msg: str) -> list[int]:
    """The exact byte counts a message gives: ``512 bytes``, ``1.2 KiB (1,234 bytes)``."""
    import re
    return [int(m.replace(",", "")) for m in re.findall(r"([\d,]+) bytes", msg)]


# -- checked before the work -----------------------------------------------------------------------
def test_a_nearly_full_directory_is_refused_before_data_is_read(tmp_path, free_space, monkeypatch, capsys):
    free_space["free"] = MIN_FREE_BYTES - 1
    _no_data_reads(monkeypatch)
    run = tmp_path / "run"
    rc = main(["train", "--data", "synthetic:tiny", "--model", "bprmf", "--out", str(run), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"mmrec: error: not enough free space in {run}: " in err
    assert f"16.0 MiB ({MIN_FREE_BYTES - 1:,} bytes) free, 16.0 MiB needed (16.0 MiB is the least any mmrec " \
           f"output needs); free some space or choose another --out" in err


def test_train_refuses_when_its_checkpoints_would_not_fit(tmp_path, free_space):
    from mmrec.graph.baselines import BPRMF
    seen: dict[str, int] = {}
    real_fit = BPRMF.fit

    def fit(self, data):  # the model's size, as the trainer sees it before the first epoch
        real_fit(self, data)
        params = sum(p.numel() * p.element_size() for p in self.parameters())
        seen["params"] = params
        seen["state"] = state_bytes(self)

    out = tmp_path / "run"
    free_space["free"] = MIN_FREE_BYTES + 1000  # passes the floor, not the estimate
    with pytest.MonkeyPatch.context() as m:
        m.setattr(BPRMF, "fit", fit)
        with pytest.raises(OutOfSpaceError) as e:
            train(_cfg(out))
    msg = str(e.value)
    # checkpoint = weights + Adam's two moments (3x), twice while it is replaced, + best.safetensors
    estimate = 2 * (seen["state"] + 2 * seen["params"]) + seen["state"]
    assert seen["state"] == seen["params"] > 0  # BPR-MF's state is its two embedding tables
    assert f"not enough free space in {out}" in msg and "checkpoint.pt" in msg and "best.safetensors" in msg
    assert _bytes_in(msg) == [MIN_FREE_BYTES + 1000, estimate]
    assert not (out / "log.jsonl").exists() and not (out / "checkpoint.pt").exists()  # no epoch ran

    free_space["free"] = int(estimate * SPACE_MARGIN) + MIN_FREE_BYTES  # exactly enough: it runs
    assert train(_cfg(out, 1))["epochs"] == 1


def test_a_resumed_run_counts_the_files_it_replaces(tmp_path, free_space):
    from mmrec.rundir import training_bytes
    out = tmp_path / "run"
    train(_cfg(out, 1))
    written = (out / "checkpoint.pt").stat().st_size + (out / "best.safetensors").stat().st_size

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1000))

    fresh = training_bytes(Model(), tmp_path / "empty")
    assert fresh == 7 * 4000
    assert training_bytes(Model(), out) == max(fresh - written, 0)


def test_sparse_buffers_count_by_their_entries_not_their_shape():
    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            i = torch.tensor([[0, 1], [1, 0]])
            self.register_buffer("adj", torch.sparse_coo_tensor(i, torch.ones(2), (100_000, 100_000),
                                                                check_invariants=True))

    # 2 x 2 int64 indices + 2 float32 values, not 10^10 floats
    assert state_bytes(Graph()) == 2 * 2 * 8 + 2 * 4


def test_pretrain_refuses_before_its_first_step(tmp_path, free_space):
    from tests.faults.test_nan_policy import _pretrain
    from mmrec.datasets.loading import load_dataset
    out = tmp_path / "run"
    free_space["free"] = MIN_FREE_BYTES + 1000
    with pytest.raises(OutOfSpaceError) as e:
        _pretrain(out, load_dataset("synthetic:tiny"))
    msg = str(e.value)
    assert f"not enough free space in {out}" in msg and "encoders.safetensors" in msg
    assert _bytes_in(msg)[1] > 5 * 4 * 16 * 30522  # the BERT's word embeddings: weights, 2 AdamW moments, ...
    assert not (out / "log.jsonl").exists() and not (out / "checkpoint.pt").exists()


def test_extract_refuses_before_the_first_batch(tmp_path, free_space, monkeypatch):
    from mmrec.datasets.synthetic import make_world
    from mmrec.pretrain import extract as ex
    from tests.test_extract import tiny_encoders
    encoders = {m: e for m, e in tiny_encoders().items() if m != "image"}
    data = make_world("tiny")
    monkeypatch.setattr(ex, "_run_batches", lambda *a, **k: pytest.fail("encoding started"))
    out = tmp_path / "feats" / "features.safetensors"
    out.parent.mkdir()
    free_space["free"] = MIN_FREE_BYTES + 10
    with pytest.raises(OutOfSpaceError) as e:
        ex.extract_features(data, encoders, out, chunk_size=64, progress=False, log=lambda m: None)
    msg = str(e.value)
    dims = [ex.output_dim(encoders[m], False) for m in sorted(encoders)]
    assert ex.extraction_bytes(data.n_items, dims) == 2 * data.n_items * (4 * (sum(dims) + max(dims)) + 3)
    assert _bytes_in(msg) == [MIN_FREE_BYTES + 10, ex.extraction_bytes(data.n_items, dims)]
    assert "features.safetensors (+ its chunks in features.safetensors.partial/)" in msg
    assert list(out.parent.iterdir()) == []


def test_extract_command_checks_the_floor_before_loading_data(tmp_path, free_space, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("data was read before the free space was checked")
    monkeypatch.setattr("mmrec.datasets.loading.load_dataset", refuse)
    free_space["free"] = 100
    out = tmp_path / "x" / "f.safetensors"
    assert main(["extract", "--data", "synthetic:tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"not enough free space in {out.parent}: 100 bytes free" in err


def test_an_unreadable_usage_is_not_checked(monkeypatch, tmp_path):
    def broken(path):
        raise OSError(errno.ENOSYS, "not supported")
    monkeypatch.setattr(shutil, "disk_usage", broken)
    assert check_free_space(tmp_path, 10 ** 18, "anything") == -1


# -- a write that runs out of space anyway --------------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("how", ["oserror", "torch_zip_writer"])
def test_a_checkpoint_write_without_space_names_the_file_and_keeps_the_previous(tmp_path, free_space,
                                                                                monkeypatch, how):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):  # the epoch 2 checkpoint: half written, then the disk is full
        calls["n"] += 1
        if calls["n"] < 2:
            return real_save(obj, f, *a, **k)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        if how == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        free_space["free"] = 4096  # torch's writer only says this; the file system is full by then
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OutOfSpaceError) as e:
        train(_cfg(out, 3))
    msg = str(e.value)
    assert msg.startswith(f"cannot write {out / 'checkpoint.pt'}: no space left on device (")
    assert "the previous checkpoint.pt is unchanged" in msg
    monkeypatch.setattr(torch, "save", real_save)
    assert load_state(out)["epoch"] == 1  # the last good checkpoint, whole
    assert not list(out.glob(".checkpoint.pt.*.tmp"))  # the half-written temporary file is gone


def test_a_weights_write_without_space_through_safetensors(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    out = tmp_path / "run"

    def save_model(model, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("mmrec.train.checkpoint.save_model", save_model)
    with pytest.raises(OutOfSpaceError, match=r"cannot write .*best\.safetensors: no space left on device .*"
                                              r"no best\.safetensors was written"):
        train(_cfg(out, 1))
    assert not list(out.glob(".best.safetensors.*"))


def test_metrics_write_without_space_keeps_the_previous_metrics(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(_cfg(out, 1))
    before = (out / "metrics.json").read_text()
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name.startswith(".metrics.json."):
            real(self, '{"truncated": ')
            _enospc()
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    rc = main(["train", "--data", "synthetic:tiny", "--model", "bprmf", "--out", str(out), "--epochs", "1",
               "--set", "train.progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"mmrec: error: cannot write {out / 'metrics.json'}: no space left on device" in err
    assert "the previous metrics.json is unchanged" in err
    assert (out / "metrics.json").read_text() == before
    json.loads(before)


def test_other_write_errors_pass_through(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "x.json") as tmp:
            raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # torch's wording with plenty of space left
        with atomic_path(tmp_path / "x.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")
    write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
