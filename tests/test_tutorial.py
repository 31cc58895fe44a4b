"""docs/tutorial.md runs as written: every ```bash block, in order, in an empty directory.

``mmrec ...`` commands go through ``mmrec.cli.main`` in this process (the function the
``mmrec`` entry point calls; no interpreter start-up per command); every other command
(``mkdir``, heredocs, ``head``) runs in bash.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pandas as pd
import pytest

from mmrec.cli import main
from tests.conftest import REPO

TUTORIAL = REPO / "docs" / "tutorial.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")


def blocks(kind: str) -> list[str]:
    return [body for lang, body in FENCE.findall(TUTORIAL.read_text()) if lang == kind]


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, a heredoc kept with its command."""
    out: list[str] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        m = HEREDOC.search(line)
        if m:
            body = []
            while i < len(lines) and lines[i] != m.group(1):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"heredoc {m.group(1)} is not closed in docs/tutorial.md"
            line = "\n".join([line, *body, lines[i]])
            i += 1
        out.append(line)
    return out


def test_tutorial_splits_into_commands():
    cmds = [c for b in blocks("bash") for c in commands(b)]
    mmrec = [c for c in cmds if c.startswith("mmrec ")]
    assert [shlex.split(c)[1] for c in mmrec] == ["data", "data", "train", "recommend", "pipeline", "pipeline",
                                                  "pipeline"]
    assert any("interactions.csv" in c and "alice,i1,view,1" in c for c in cmds)


def test_tutorial_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    printed: list[tuple[str, str]] = []
    for block in blocks("bash"):
        for cmd in commands(block):
            if cmd.startswith("mmrec "):
                rc = main(shlex.split(cmd)[1:])
                out, err = capsys.readouterr()
                assert rc == 0, f"{cmd}\n{err}"
            else:
                done = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=tmp_path, capture_output=True,
                                      text=True)
                assert done.returncode == 0, f"{cmd}\n{done.stderr}"
                out = done.stdout
            printed.append((cmd, out))

    def output_of(prefix: str, nth: int = 0) -> str:
        return [out for cmd, out in printed if cmd.startswith(prefix)][nth]

    # what the page shows `describe` printing is what it prints
    shown = blocks("text")[0].strip().splitlines()
    real = output_of("mmrec data describe").strip().splitlines()
    assert real == shown
    # recommend: 3 items per user, never one the user bought in training
    recs = pd.read_csv(tmp_path / "recs.tsv", sep="\t", dtype=str)
    assert len(recs) == 18 and recs.groupby("user").size().eq(3).all()
    shown = [line.split("\t")[:3] for line in blocks("text")[1].strip().splitlines()]
    assert [line.split("\t")[:3] for line in output_of("head -4 recs.tsv").splitlines()] == shown  # ids, not scores
    train = pd.read_csv(tmp_path / "data" / "shop" / "interactions.tsv", sep="\t", dtype=str)
    alice_bought = set(train[(train.user == "alice") & (train.behavior == "buy")].item)
    assert not (alice_bought - {"i4"}) & set(recs[recs.user == "alice"].item)  # i4: her held-out test buy
    # the pipeline: computed, then reused, then only train and after recomputed
    first, second, third = (output_of("mmrec pipeline", k) for k in range(3))
    assert "stage extract: computing" in first and "stage recommend: computing" in first
    assert all(f"stage {s}: reused" in second for s in ("extract", "train", "recommend"))
    assert "stage extract: reused" in third and "stage train: computing" in third
    assert (tmp_path / "runs" / "shop-pipeline" / "recs.tsv").is_file()


@pytest.mark.parametrize("text, match", [
    ("user,item,behavior\nu1,i1,buy\nu2,,buy\n", r"interactions\.csv, line 3, field 'item'"),
    ("user,item\nu1,i1,extra\n", r"interactions\.csv, line 2"),
])
def test_csv_reader_names_the_bad_line(tmp_path, text, match):
    from mmrec.datasets.loading import load_dataset
    from mmrec.errors import DataError
    (tmp_path / "interactions.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        load_dataset(tmp_path)


def test_csv_reader_reads_quoted_text_and_keeps_cold_items(tmp_path):
    from mmrec.datasets.loading import detect_format, load_dataset
    (tmp_path / "interactions.csv").write_text("user,item\n007,1\n7,2\n")
    (tmp_path / "items.csv").write_text('item,title\n1,"Shoes, light"\n2,Boots\n3,Tent\n')
    assert detect_format(tmp_path) == "csv"
    data = load_dataset(tmp_path)
    assert sorted(map(str, data.user_ids)) == ["007", "7"]  # ids stay strings
    assert data.n_items == 3  # item 3 has no interaction: a cold item
    assert data.items.text["title"][list(data.item_ids).index("1")] == "Shoes, light"
