"""Progress output: a bar on a terminal, one plain line per epoch in a redirected log."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

import mmrec.progress as progress
from mmrec.train.config import RunConfig, TrainSection
from mmrec.train.run import train

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)  loss \d+\.\d{4}  valid Recall@20 \d\.\d{4}  \d+\.\d s$")


def _cfg(data: Path, out: Path, progress_on: bool = True) -> RunConfig:
    return RunConfig(model="bprmf", data=str(data), out=str(out), model_args={"dim": 8},
                     train=TrainSection(epochs=3, batch_size=64, lr=0.05, progress=progress_on))


def test_redirected_stderr_gets_one_line_per_epoch_and_no_carriage_returns(planted_dir: Path, tmp_path: Path,
                                                                           capsys):
    train(_cfg(planted_dir, tmp_path / "run"))  # capsys: stderr is not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch")]
    assert [EPOCH_LINE.match(line).groups() for line in lines] == [("1", "3"), ("2", "3"), ("3", "3")]


def test_progress_false_silences_everything(planted_dir: Path, tmp_path: Path, capsys):
    train(_cfg(planted_dir, tmp_path / "run", progress_on=False))
    err = capsys.readouterr().err
    assert "\r" not in err and not [line for line in err.splitlines() if line.startswith("epoch")]


def test_a_terminal_gets_the_bar_and_no_epoch_lines(planted_dir: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: True)
    train(_cfg(planted_dir, tmp_path / "run"))
    err = capsys.readouterr().err
    assert "\r" in err and "batch" in err  # tqdm redraws in place
    assert not [line for line in err.splitlines() if EPOCH_LINE.match(line.strip("\r"))]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("tty", [True, False])
def test_the_decision_follows_stderr(monkeypatch, tty: bool):
    monkeypatch.setattr("sys.stderr", _Stream(tty))
    assert progress.stderr_is_tty() is tty
    assert progress.show_bar(True) is tty and progress.show_bar(False) is False
    assert progress.log_lines(True) is (not tty) and progress.log_lines(False) is False
    bar = progress.progress_bar(range(3), enabled=True)
    assert bar.disable is (not tty)
    assert list(bar) == [0, 1, 2]


def test_a_closed_stderr_is_not_a_terminal(monkeypatch):
    stream = _Stream(True)
    stream.close()
    stream.isatty = io.StringIO.isatty.__get__(stream)  # raises ValueError on a closed stream
    monkeypatch.setattr("sys.stderr", stream)
    assert progress.stderr_is_tty() is False
