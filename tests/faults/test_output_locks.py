"""One writer per output: ``mmrec pipeline`` (its out/ directory, for the whole call), ``mmrec extract``
and ``mmrec export`` (``OUT.lock`` beside the feature file / export directory), as ``train`` / ``pretrain`` /
``evaluate`` lock their run directories (tests/faults/test_run_dir.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmrec.cli import main
from mmrec.config import load_yaml
from mmrec.rundir import LOCK, RunLockedError, lock_path, output_lock, run_lock

REPO = Path(__file__).resolve().parents[2]
HOLDER = ("import sys\nfrom mmrec.rundir import output_lock, run_lock\n"
          "lock = output_lock if sys.argv[2] == 'file' else run_lock\n"
          "with lock(sys.argv[1], sys.argv[3]):\n    print('held', flush=True)\n    sys.stdin.read()\n")


class Reached(Exception):
    """Raised by a patched step to prove the call got that far (and no further)."""


@pytest.fixture
def hold():
    """``hold(path, "dir"|"file", command)``: another process holding the lock, as that command would."""
    procs: list[subprocess.Popen] = []

    def start(path: Path, kind: str, command: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), kind, command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _pipeline_file(tmp_path: Path, out: Path) -> Path:
    raw = load_yaml(REPO / "configs" / "pipelines" / "synthetic-tiny.yaml")
    raw["out"] = str(out)
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def _no_stages(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("a stage ran although the pipeline directory is locked")
    monkeypatch.setattr("mmrec.pipeline._run_stages", refuse)


# -- mmrec pipeline --------------------------------------------------------------------------------
def test_second_pipeline_on_the_same_out_is_refused(tmp_path, hold, monkeypatch, capsys):
    out = tmp_path / "pipe"
    out.mkdir()
    proc = hold(out, "dir", "pipeline")
    _no_stages(monkeypatch)
    rc = main(["pipeline", str(_pipeline_file(tmp_path, out))])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert (f"mmrec: error: pipeline directory {out} is in use by another mmrec process (pipeline, pid {proc.pid} "
            f"on ") in err and "choose another --out" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK]


def test_pipeline_holds_its_directory_for_the_whole_call(tmp_path, monkeypatch):
    from mmrec import pipeline as pl
    out = tmp_path / "pipe"
    seen: list[str] = []

    def stages(cfg, plans, out_, records, **kw):  # mid-pipeline: a second pipeline must be refused
        assert out_ == out and not kw["dry_run"]
        with pytest.raises(RunLockedError) as e:
            pl.run_pipeline(_pipeline_file(tmp_path, out), log=lambda m: None)
        seen.append(str(e.value))
        return pl.PipelineResult(out_, [])

    monkeypatch.setattr(pl, "_run_stages", stages)
    pl.run_pipeline(_pipeline_file(tmp_path, out), log=lambda m: None)
    assert len(seen) == 1 and "(pipeline, pid" in seen[0]
    with run_lock(out):  # released when the pipeline returned
        pass


def test_a_dry_run_takes_no_lock(tmp_path, hold):
    from mmrec.pipeline import run_pipeline
    out = tmp_path / "pipe"
    out.mkdir()
    hold(out, "dir", "pipeline")
    result = run_pipeline(_pipeline_file(tmp_path, out), dry_run=True, log=lambda m: None)
    assert set(result.status().values()) == {"would compute"}


# -- mmrec extract ---------------------------------------------------------------------------------
def test_second_extract_to_the_same_file_is_refused(tmp_path, hold, monkeypatch, capsys):
    out = tmp_path / "features.safetensors"
    proc = hold(out, "file", "extract")

    def refuse(*a, **k):
        raise AssertionError("data was read although the output is locked")
    monkeypatch.setattr("mmrec.datasets.loading.load_dataset", refuse)
    rc = main(["extract", "--data", "synthetic:tiny", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert (f"mmrec: error: output {out} is being written by another mmrec process (extract, pid {proc.pid} "
            f"on ") in err and "choose another --out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.safetensors.lock"]


def test_extract_holds_the_lock_while_it_runs_and_other_files_are_free(tmp_path, monkeypatch):
    from mmrec.pretrain.extract import ExtractConfig, run_extract
    out = tmp_path / "features.safetensors"
    seen: list[str] = []

    def load_dataset(*a, **k):  # inside run_extract: the output is locked, a sibling file is not
        with pytest.raises(RunLockedError) as e:
            with output_lock(out, "extract"):
                pass
        seen.append(str(e.value))
        with output_lock(tmp_path / "other.safetensors", "extract"):
            pass
        raise Reached

    monkeypatch.setattr("mmrec.datasets.loading.load_dataset", load_dataset)
    with pytest.raises(Reached):
        run_extract(ExtractConfig(data="synthetic:tiny", out=str(out), progress=False), log=lambda m: None)
    assert len(seen) == 1 and f"output {out} is being written by another mmrec process (extract, pid " \
                              f"{os.getpid()} on " in seen[0]
    assert lock_path(out) == tmp_path / "features.safetensors.lock"
    with output_lock(out, "extract"):  # released on the error too
        pass


def test_extract_to_a_directory_or_under_a_file_is_an_error(tmp_path, monkeypatch):
    from mmrec.errors import MMRecError
    from mmrec.pretrain.extract import ExtractConfig, run_extract
    monkeypatch.setattr("mmrec.datasets.loading.load_dataset", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(MMRecError, match=f"--out {tmp_path} is a directory; give the output file's path"):
        run_extract(ExtractConfig(data="synthetic:tiny", out=str(tmp_path)))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MMRecError, match="cannot create output directory .*a_file is a file, not a directory"):
        run_extract(ExtractConfig(data="synthetic:tiny", out=str(tmp_path / "a_file" / "f.safetensors")))


# -- mmrec export ----------------------------------------------------------------------------------
def test_second_export_to_the_same_directory_is_refused(tmp_path, hold, monkeypatch, capsys):
    out = tmp_path / "export"
    proc = hold(out, "file", "export")
    monkeypatch.setattr("mmrec.export.export_run", lambda *a, **k: pytest.fail("the run was read"))
    rc = main(["export", "--run", str(tmp_path / "no-such-run"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert (f"mmrec: error: output {out} is being written by another mmrec process (export, pid {proc.pid} "
            f"on ") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.lock"]  # OUT itself is not created


def test_export_holds_the_lock_while_it_runs(tmp_path, monkeypatch):
    out = tmp_path / "export"
    seen: list[str] = []

    def export_run(run, out_, **k):
        with pytest.raises(RunLockedError) as e:
            with output_lock(out_, "export"):
                pass
        seen.append(str(e.value))
        raise Reached

    monkeypatch.setattr("mmrec.export.export_run", export_run)
    with pytest.raises(Reached):
        main(["export", "--run", str(tmp_path / "run"), "--out", str(out)])
    assert len(seen) == 1 and "(export, pid" in seen[0]
    with output_lock(out, "export"):
        pass
