"""Item content as webdataset tar shards: the streaming input of pre-training at scale.

One sample per item (the format is fixed; see docs/pretraining.md)::

    __key__  f"{index:09d}"                      (the contiguous item index, zero-padded)
    json     {"index": <int>, "item": "<original item id>"}
    txt      items.item_text(index)              (UTF-8; absent when the item has no text)
    image    the encoded image bytes as stored   (PNG/JPEG...; absent when none)
    wav      the encoded audio bytes as stored   (absent when none)

``sizes.json`` maps each shard's file name to its number of samples (open_clip's
convention), so a trainer knows an epoch's length without reading the shards. A
directory is written into a temporary sibling and renamed into place at the end: a
crash never leaves a directory with a ``sizes.json`` that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mmrec.datasets.schema import Dataset
from mmrec.encoders.robust import BadMedia
from mmrec.errors import ConfigError, DataError

SIZES = "sizes.json"
PATTERN = "shard-%06d.tar"


def _read_media(x: Any, field: str, item: str) -> bytes | None:
    """Raw bytes of an image/audio entry (a path is read; bytes are kept as they are)."""
    if x is None:
        return None
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    path = Path(x)
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {field} of item '{item}': {e}", file=path, field=field) from e


def item_sample(data: Dataset, i: int, unreadable: BadMedia | None = None) -> dict[str, Any]:
    """The shard sample of item ``i`` (the documented format above).

    A media file that cannot be read is an error naming it, or, with ``unreadable``,
    left out of the sample and counted (training then counts the item as missing).
    """
    item = str(data.item_ids[i])
    sample: dict[str, Any] = {"__key__": f"{i:09d}", "json": {"index": int(i), "item": item}}
    items = data.items
    text = items.item_text(i) if items.text else ""
    if text:
        sample["txt"] = text
    for field, seq in (("image", items.image), ("wav", items.audio)):
        modality = "image" if field == "image" else "audio"
        try:
            raw = _read_media(seq[i], modality, item) if seq is not None else None
        except DataError as e:
            if unreadable is None:
                raise
            unreadable.add(modality, "unreadable", f"{item}: {e}")
            raw = None
        if raw is not None:
            sample[field] = raw
    return sample


def write_shards(data: Dataset, out: str | Path, maxcount: int = 1000, maxsize: float = 1e9,
                 progress: bool = True, overwrite: bool = False,
                 unreadable: BadMedia | None = None) -> dict[str, int]:
    """Write every item of ``data`` into tar shards under ``out`` plus ``sizes.json``.

    Returns ``{shard file name: n samples}``. The directory appears only when complete.
    ``unreadable``: count media files that cannot be read (and write the item without
    them) instead of failing on the first one.
    """
    import webdataset as wds
    from mmrec.progress import progress_bar

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if maxcount < 1:
        raise ConfigError(f"maxcount must be at least 1, got {maxcount}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        sizes: dict[str, int] = {}

        def done(fname: str) -> None:  # ShardWriter calls this after closing each shard
            sizes[Path(fname).name] = writer.count

        writer = wds.ShardWriter(str(tmp / PATTERN), maxcount=maxcount, maxsize=maxsize, verbose=0, post=done)
        try:
            for i in progress_bar(range(data.n_items), desc="shards", unit="item", enabled=progress):
                writer.write(item_sample(data, i, unreadable))
        finally:
            writer.close()
        # ShardWriter opens its first stream eagerly: an empty dataset leaves one empty tar
        sizes = {k: v for k, v in sizes.items() if v > 0}
        for f in tmp.glob("*.tar"):
            if f.name not in sizes:
                f.unlink()
        (tmp / SIZES).write_text(json.dumps(sizes, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return sizes


def read_sizes(shard_dir: str | Path) -> dict[str, int]:
    """``sizes.json`` of a shard directory, checked against the files present."""
    shard_dir = Path(shard_dir)
    path = shard_dir / SIZES
    if not path.exists():
        raise DataError(f"no {SIZES}: not a complete shard directory (write one with `mmrec data shards`)",
                        file=shard_dir)
    try:
        sizes = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e}", file=path, line=e.lineno) from e
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
        raise DataError("expected a mapping {shard file name: number of samples}", file=path)
    missing = [name for name in sizes if not (shard_dir / name).exists()]
    if missing:
        raise DataError(f"{len(missing)} shard(s) listed but missing, e.g. {missing[0]}", file=path)
    return dict(sorted(sizes.items()))


def shard_urls(shard_dir: str | Path) -> list[str]:
    """Shard paths in name order (the order ``sizes.json`` lists them)."""
    return [str(Path(shard_dir) / name) for name in read_sizes(shard_dir)]


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw webdataset sample (bytes per field) -> ``{index, item, txt, image, wav}``."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    try:
        meta = json.loads(sample["json"])
        index, item = int(meta["index"]), str(meta["item"])
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"sample {where}: bad or missing 'json' ({e})", field="json") from e
    txt = sample.get("txt")
    return {"index": index, "item": item, "txt": txt.decode("utf-8") if txt is not None else None,
            "image": sample.get("image"), "wav": sample.get("wav")}


class RotatedWorkerSplit:
    """``wds.split_by_worker`` with the worker ids rotated by ``offset``.

    A run resumed in the middle of an epoch must continue with the worker whose turn
    it was; the DataLoader always starts its round-robin at worker 0, so worker 0
    takes over the shards of worker ``offset``, and so on.
    """

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        from itertools import islice

        from webdataset.utils import pytorch_worker_info
        _, _, worker, workers = pytorch_worker_info()
        if workers > 1:
            yield from islice(src, (worker + self.offset) % workers, None, workers)
        else:
            yield from src


def sample_pipeline(urls: list[str], *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                    shuffle_buffer: int = 1000, rank: int = 0, worker_offset: int = 0):
    """Decoded samples of the shards, split by node (rank) and by DataLoader worker.

    Shard order is shuffled with ``seed + epoch`` (the same on every rank, so the
    split by node is a partition); samples go through a shuffle buffer seeded with
    ``(seed, epoch, rank)``. Both are deterministic, so an epoch can be replayed.
    ``worker_offset``: see :class:`RotatedWorkerSplit` (resuming mid-epoch).
    """
    import webdataset as wds

    by_worker = wds.split_by_worker if worker_offset == 0 else RotatedWorkerSplit(worker_offset)
    stages: list[Any] = [wds.SimpleShardList(urls, seed=shard_seed(seed, epoch) if shuffle else None),
                         wds.split_by_node, by_worker, wds.tarfile_to_samples(), wds.map(decode_sample)]
    if shuffle and shuffle_buffer > 1:
        rng = random.Random(f"{seed}-{epoch}-{rank}")
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng))
    return wds.DataPipeline(*stages)


def shard_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's shard order (shared by every rank)."""
    return seed * 1_000_003 + epoch


def partition(sizes: dict[str, int], world_size: int, num_workers: int, seed: int | None) -> list[list[int]]:
    """Samples per (rank, worker) for one epoch, mirroring ``sample_pipeline``'s splits.

    Lets every rank compute the epoch's length (and stop together) from ``sizes.json``.
    """
    names = list(sizes)
    if seed is not None:
        random.Random(seed).shuffle(names)
    workers = max(1, num_workers)
    out = []
    for r in range(world_size):
        mine = names[r::world_size]
        out.append([sum(sizes[n] for n in mine[w::workers]) for w in range(workers)])
    return out


def iter_shard_samples(shard_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every sample of a shard directory in order (no splitting): for evaluation passes."""
    import webdataset as wds
    pipe = wds.DataPipeline(wds.SimpleShardList(shard_urls(shard_dir)), wds.tarfile_to_samples(),
                            wds.map(decode_sample))
    yield from pipe


__all__ = ["SIZES", "PATTERN", "item_sample", "write_shards", "read_sizes", "shard_urls", "decode_sample",
           "sample_pipeline", "RotatedWorkerSplit", "shard_seed", "partition", "iter_shard_samples"]
