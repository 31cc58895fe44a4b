"""webdataset shards: format round trip, split by node and worker, resume position, atomic writes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mmrec.cli import main
from mmrec.datasets.loading import load_dataset
from mmrec.errors import DataError
from mmrec.pretrain import shards as shard_io
from mmrec.pretrain.data import ItemCollator, ShardSource
from mmrec.pretrain.shards import (decode_sample, iter_shard_samples, partition, read_sizes, sample_pipeline,
                                   shard_seed, shard_urls, write_shards)


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic:tiny")


@pytest.fixture(scope="module")
def shard_dir(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "tiny"
    sizes = write_shards(tiny, out, maxcount=30, progress=False)
    assert sizes == read_sizes(out)
    return out


def test_sizes_json_and_sample_format(tiny, shard_dir):
    sizes = json.loads((shard_dir / "sizes.json").read_text())
    assert sum(sizes.values()) == tiny.n_items == 200
    assert len(sizes) == 7 and all(v == 30 for k, v in sizes.items() if k != "shard-000006.tar")
    assert sorted(p.name for p in shard_dir.glob("*.tar")) == sorted(sizes)
    samples = list(iter_shard_samples(shard_dir))
    assert [s["index"] for s in samples] == list(range(200))  # written in index order
    for i in (0, 57, 199):
        s = samples[i]
        assert s["item"] == str(tiny.item_ids[i])
        assert s["txt"] == tiny.items.item_text(i)
        assert s["image"] == tiny.items.image[i]  # raw PNG bytes, unchanged
        assert s["wav"] == tiny.items.audio[i]


def test_sample_keys_follow_the_documented_format(tiny):
    s = shard_io.item_sample(tiny, 12)
    assert s["__key__"] == "000000012"
    assert s["json"] == {"index": 12, "item": str(tiny.item_ids[12])}
    assert set(s) == {"__key__", "json", "txt", "image", "wav"}


def test_missing_media_and_empty_text_are_omitted(tiny, tmp_path):
    import dataclasses
    items = dataclasses.replace(tiny.items, image=[None] * 3, audio=[b"RIFF..."] * 3,
                                text={"title": ["", "a title", ""], "description": ["", "", ""]})
    small = dataclasses.replace(tiny, items=items, item_ids=tiny.item_ids[:3])
    write_shards(small, tmp_path / "s", progress=False)
    got = list(iter_shard_samples(tmp_path / "s"))
    assert [s["txt"] for s in got] == [None, "a title", None]
    assert all(s["image"] is None and s["wav"] == b"RIFF..." for s in got)


def test_unreadable_files_are_an_error_or_counted(tiny, tmp_path):
    import dataclasses

    from mmrec.encoders.robust import BadMedia
    png = tmp_path / "ok.png"
    png.write_bytes(tiny.items.image[0])
    items = dataclasses.replace(tiny.items, image=[str(png), str(tmp_path / "gone.png")], audio=None,
                                text={"title": ["a", "b"]})
    small = dataclasses.replace(tiny, items=items, item_ids=tiny.item_ids[:2])
    with pytest.raises(DataError, match="gone.png"):
        write_shards(small, tmp_path / "s1", progress=False)
    assert not (tmp_path / "s1").exists()
    bad = BadMedia()
    write_shards(small, tmp_path / "s2", progress=False, unreadable=bad)
    got = list(iter_shard_samples(tmp_path / "s2"))
    assert got[0]["image"] == tiny.items.image[0] and got[1]["image"] is None
    assert bad.as_dict() == {"image/unreadable": 1} and "gone.png" in bad.examples["image/unreadable"]


def _indices(urls, **kw) -> list[int]:
    return [s["index"] for s in sample_pipeline(urls, **kw)]


def test_every_item_once_per_epoch_over_nodes_and_workers(shard_dir, monkeypatch):
    urls = shard_urls(shard_dir)
    # simulate 2 ranks x 2 workers through webdataset's own environment hooks
    seen: Counter = Counter()
    per_part = {}
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            got = _indices(urls, seed=3, epoch=1, shuffle_buffer=40, rank=rank)
            seen.update(got)
            per_part[(rank, worker)] = len(got)
    assert sorted(seen) == list(range(200)) and set(seen.values()) == {1}
    # sizes.json predicts each part's share without reading the shards
    expect = partition(read_sizes(shard_dir), 2, 2, shard_seed(3, 1))
    assert [[per_part[(r, w)] for w in range(2)] for r in range(2)] == expect


def test_real_dataloader_workers_see_each_item_once(shard_dir):
    pipe = sample_pipeline(shard_urls(shard_dir), seed=0, epoch=0, shuffle_buffer=20)
    loader = DataLoader(pipe, batch_size=None, num_workers=2, generator=torch.Generator().manual_seed(0))
    got = [s["index"] for s in loader]
    assert sorted(got) == list(range(200))
    assert got != sorted(got)  # shuffled


def test_shuffle_is_deterministic_per_epoch(shard_dir):
    urls = shard_urls(shard_dir)
    a = _indices(urls, seed=1, epoch=2, shuffle_buffer=50)
    assert a == _indices(urls, seed=1, epoch=2, shuffle_buffer=50)
    assert a != _indices(urls, seed=1, epoch=3, shuffle_buffer=50)


def test_shard_source_resumes_at_a_batch_and_keeps_workers_in_step(tiny, shard_dir):
    collate = ItemCollator({}, [], item_ids=list(tiny.item_ids))  # no content: indices only
    src = ShardSource(shard_dir, collate, batch_size=24, seed=5, num_workers=2, shuffle_buffer=30)
    full = [b["index"].tolist() for b in src.epoch(1)]
    assert len(full) == src.batches_per_epoch(1)
    assert [b["worker"] for b in src.epoch(1)] == [i % 2 for i in range(len(full))]
    flat = [i for b in full for i in b]
    assert len(flat) == len(set(flat)) == 200 - src.dropped(1)
    for start in (3, 4):  # the next batch comes from worker 1, then worker 0
        assert [b["index"].tolist() for b in src.epoch(1, start=start)] == full[start:]


def test_shards_of_other_data_are_refused(tiny, shard_dir):
    wrong = list(tiny.item_ids)
    wrong[0] = "not-i0"
    collate = ItemCollator({}, [], item_ids=wrong)
    src = ShardSource(shard_dir, collate, batch_size=50, seed=0, shuffle_buffer=0)
    with pytest.raises(DataError, match="written for other data"):
        list(src.epoch(0))


def test_failed_write_leaves_no_output(tiny, tmp_path, monkeypatch):
    real = shard_io.item_sample

    def broken(data, i, unreadable=None):
        if i == 50:
            raise RuntimeError("disk on fire")
        return real(data, i, unreadable)

    monkeypatch.setattr(shard_io, "item_sample", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(tiny, tmp_path / "out", maxcount=20, progress=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too
    assert not list(tmp_path.rglob("sizes.json"))


def test_existing_output_needs_overwrite(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="--overwrite"):
        write_shards(tiny, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").exists()


def test_incomplete_directories_are_errors(tmp_path, shard_dir):
    with pytest.raises(DataError, match="sizes.json"):
        read_sizes(tmp_path)
    broken = tmp_path / "b"
    broken.mkdir()
    (broken / "sizes.json").write_text(json.dumps({"shard-000000.tar": 3}))
    with pytest.raises(DataError, match="missing"):
        read_sizes(broken)
    with pytest.raises(DataError, match="json"):
        decode_sample({"__key__": "1", "__url__": "x.tar", "txt": b"hi"})


def test_cli_writes_shards(tmp_path, capsys):
    rc = main(["data", "shards", "synthetic:tiny", "--out", str(tmp_path / "s"), "--maxcount", "64",
               "--no-progress"])
    assert rc == 0
    assert sum(read_sizes(tmp_path / "s").values()) == 200
    assert "4 shard(s)" in capsys.readouterr().out


# -- exact resume while streaming ----------------------------------------------------------------
class Killed(RuntimeError):
    pass


def test_streaming_resume_after_a_kill_is_bit_identical(tiny, shard_dir, tmp_path, monkeypatch):
    """Training from shards (2 loader workers, shuffle buffer), killed mid-epoch, resumed from the
    last checkpoint: the same final weights and log as an uninterrupted run. The data position
    (epoch, batch) must bring back the worker whose turn it was and the shuffle buffer's order."""

    from mmrec.pretrain import trainer as trainer_mod
    from mmrec.pretrain.run import pretrain
    from tests.test_pretrain import assert_same_run, tiny_config

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads and forked workers
    # BERT dropout on (RNG), 2 workers over 7 shards, a 50-sample shuffle buffer
    sets = ["modalities=[text]", f"loader.shards={shard_dir}", "loader.num_workers=2", "loader.shuffle_buffer=50",
            "loader.batch_size=30", "train.epochs=2", "train.checkpoint_every=3", "train.warmup_steps=2",
            "train.lr=0.003"]
    ref = pretrain(tiny_config(tmp_path / "a", *sets), data=tiny)
    assert ref["streaming"] is True
    per_epoch = ShardSource(shard_dir, ItemCollator({}, []), 30, seed=0, num_workers=2).batches_per_epoch(1)
    assert ref["steps"] == 2 * per_epoch and per_epoch % 2 == 0
    kill_at = per_epoch + 4   # checkpoint of step per_epoch + 3: epoch 1, batch 3 (worker 1's turn)
    real = trainer_mod.PretrainTrainer._append_log

    def dying(self, record):
        real(self, record)
        if record["step"] == kill_at:
            raise Killed("SIGKILL")

    b = tmp_path / "b"
    monkeypatch.setattr(trainer_mod.PretrainTrainer, "_append_log", dying)
    with pytest.raises(Killed):
        pretrain(tiny_config(b, *sets), data=tiny)
    monkeypatch.setattr(trainer_mod.PretrainTrainer, "_append_log", real)
    state = torch.load(b / "checkpoint.pt", weights_only=False)
    assert state["step"] == per_epoch + 3 and state["position"] == {"epoch": 1, "batch": 3}

    done = pretrain(tiny_config(b, *sets, "train.resume=true"), data=tiny)
    assert_same_run(tmp_path / "a", b)
    assert done["metrics"] == ref["metrics"]
