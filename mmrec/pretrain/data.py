"""Item batches for pre-training: in memory (small data) or streamed from shards.

Both sources yield the same batch dict, built in DataLoader workers by
:class:`ItemCollator` (each encoder's own preprocessing, with bad media skipped and
counted by :func:`~mmrec.encoders.robust.preprocess_robust`)::

    {"index": LongTensor [b],                 # contiguous item indices (the behavior view's input)
     "views": {modality: Batch | None},       # preprocessed rows of the items that have the modality
     "masks": {modality: BoolTensor [b]},     # which rows of the batch the view's rows are
     "bad": {"image/corrupt": 1, ...}}        # what was skipped in this batch

Order is a pure function of ``(seed, epoch)``, so a run resumed at ``(epoch, batch)``
sees exactly the batches an uninterrupted run would. Under DDP each rank takes its
contiguous share of every global batch (in memory) or its shards (streaming).
"""

from __future__ import annotations

import math
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from mmrec.datasets.schema import Dataset
from mmrec.encoders.base import Encoder
from mmrec.encoders.robust import BadMedia, preprocess_robust
from mmrec.errors import ConfigError, DataError
from mmrec.pretrain import shards as shard_io

#: Sample field of each content modality (the shard format's extensions).
FIELDS = {"image": "image", "text": "txt", "audio": "wav"}


def memory_sample(data: Dataset, i: int, modalities: Sequence[str] = ("image", "text", "audio")) -> dict[str, Any]:
    """Item ``i`` in the shard sample layout (``index, item, txt, image, wav``), without reading files.

    Only ``modalities`` are fetched (the synthetic world renders media on access).
    """
    items = data.items
    out: dict[str, Any] = {"index": int(i), "item": str(data.item_ids[i]), "txt": None, "image": None, "wav": None}
    if "text" in modalities and items.text:
        out["txt"] = items.item_text(i) or None
    if "image" in modalities and items.image is not None:
        out["image"] = items.image[i]
    if "audio" in modalities and items.audio is not None:
        out["wav"] = items.audio[i]
    return out


#: The view of a modality whose features come from the frozen-feature cache (see ``ItemCollator.cached``).
CACHED = "cached"


class ItemCollator:
    """Samples -> the batch dict of the module docstring (runs in DataLoader workers)."""

    def __init__(self, encoders: dict[str, Encoder], modalities: Sequence[str],
                 item_ids: Sequence[str] | None = None) -> None:
        self.encoders = encoders
        self.modalities = list(modalities)
        # shards carry the original id beside the index: checked, so shards of another
        # dataset (or another item order) fail instead of training on wrong pairs
        self.item_ids = [str(x) for x in item_ids] if item_ids is not None else None
        # modality -> [n_items] bool: a frozen backbone's features are cached for these items, so the
        # batch carries only the presence mask and :data:`CACHED` instead of decoded media (decoding
        # and resizing every poster each epoch cost more than the heads' whole training)
        self.cached: dict[str, torch.Tensor] = {}

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        index = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        ids = [s["item"] for s in samples]
        if self.item_ids is not None:
            for s in samples:
                i = s["index"]
                if not 0 <= i < len(self.item_ids) or self.item_ids[i] != s["item"]:
                    raise DataError(f"sample index {i} is item '{s['item']}' but the dataset's item {i} is "
                                    f"'{self.item_ids[i] if 0 <= i < len(self.item_ids) else '(out of range)'}': "
                                    f"the shards were written for other data", field="json")
        bad = BadMedia()
        views: dict[str, Any] = {}
        masks: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            if m in self.cached and samples:
                views[m], masks[m] = CACHED, self.cached[m][index].clone()
                continue
            raws = [s.get(FIELDS[m]) for s in samples]  # WAV/PNG bytes or paths: the encoders read both
            if not samples:
                views[m], masks[m] = None, torch.zeros(0, dtype=torch.bool)
                continue
            views[m], masks[m] = preprocess_robust(self.encoders[m], raws, m, bad, ids)
        info = torch.utils.data.get_worker_info()
        return {"index": index, "views": views, "masks": masks, "bad": dict(bad.counts),
                "bad_examples": dict(bad.examples), "worker": info.id if info is not None else 0}


def _loader_generator(seed: int, epoch: int) -> torch.Generator:
    # an explicit generator: creating the iterator must not draw from the global torch RNG,
    # or a resumed run's dropout masks would differ from an uninterrupted one
    return torch.Generator().manual_seed(seed * 7919 + epoch)


class _EpochBatches(TorchDataset):
    """Map-style: batch ``b`` of an epoch = this rank's share of global batch ``b`` of the permutation."""

    def __init__(self, data: Dataset, perm: np.ndarray, batch_size: int, n_batches: int, world: int, rank: int,
                 collate: ItemCollator) -> None:
        self.data, self.perm, self.batch_size, self.n_batches = data, perm, batch_size, n_batches
        self.world, self.rank, self.collate = world, rank, collate

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, b: int) -> dict[str, Any]:
        rows = self.perm[b * self.batch_size:(b + 1) * self.batch_size]
        local = np.array_split(rows, self.world)[self.rank]
        return self.collate([memory_sample(self.data, int(i), self.collate.modalities) for i in local])


class MemorySource:
    """Items of a loaded dataset, one seeded permutation per epoch."""

    streaming = False

    def __init__(self, data: Dataset, collate: ItemCollator, batch_size: int, *, seed: int = 0, world: int = 1,
                 rank: int = 0, drop_last: bool = True, num_workers: int = 0,
                 items: np.ndarray | None = None) -> None:
        """``items``: the item indices to train on (default: all); held-out items are left out here,
        so no batch ever holds one."""
        self.data, self.collate, self.batch_size = data, collate, batch_size
        self.seed, self.world, self.rank, self.num_workers = seed, world, rank, num_workers
        self.items = np.arange(data.n_items) if items is None else np.asarray(items, dtype=np.int64)
        n = len(self.items)
        self.n_batches = n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)
        if self.n_batches == 0:
            raise ConfigError(f"no training batches: {n} items")

    def permutation(self, epoch: int) -> np.ndarray:
        # items[perm] equals perm itself when all items train: the order of runs without held-out items
        return self.items[np.random.default_rng([self.seed, epoch]).permutation(len(self.items))]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return self.n_batches

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """Batches ``start, start+1, ...`` of ``epoch`` (the same on a resumed run)."""
        ds = _EpochBatches(self.data, self.permutation(epoch), self.batch_size, self.n_batches, self.world,
                           self.rank, self.collate)
        loader = DataLoader(ds, batch_size=None, sampler=range(start, self.n_batches),
                            num_workers=self.num_workers, generator=_loader_generator(self.seed, epoch))
        yield from loader


class _Window:
    """Pipeline stage: batches ``skip .. count`` of this worker (equal counts keep ranks and workers in step)."""

    def __init__(self, skips: list[int], count: int, offset: int = 0) -> None:
        self.skips, self.count, self.offset = skips, count, offset

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        return islice(src, self.skips[(w + self.offset) % len(self.skips)], self.count)


class ShardSource:
    """Items streamed from webdataset shards, split by node and worker, through a shuffle buffer.

    Every (rank, worker) yields the same number of batches per epoch, the smallest any
    of them can fill (partial last batches allowed), so DDP ranks stay in step and the
    DataLoader's round-robin over workers is deterministic; the few samples beyond
    that are left out of the epoch (``dropped_per_epoch``) and differ each epoch
    because the shard order is reshuffled.
    """

    streaming = True

    def __init__(self, shard_dir: str | Path, collate: ItemCollator, batch_size: int, *, seed: int = 0,
                 world: int = 1, rank: int = 0, num_workers: int = 0, shuffle_buffer: int = 1000) -> None:
        self.shard_dir = Path(shard_dir)
        self.sizes = shard_io.read_sizes(self.shard_dir)
        self.urls = [str(self.shard_dir / n) for n in self.sizes]
        self.collate, self.seed, self.world, self.rank = collate, seed, world, rank
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.local_batch = math.ceil(batch_size / world)
        self.n_samples = sum(self.sizes.values())
        if len(self.sizes) < world * max(1, num_workers):
            raise ConfigError(f"{self.shard_dir}: {len(self.sizes)} shard(s) for {world} rank(s) x "
                              f"{max(1, num_workers)} worker(s); write more, smaller shards "
                              f"(`mmrec data shards --maxcount`)")

    def _counts(self, epoch: int) -> list[list[int]]:
        return shard_io.partition(self.sizes, self.world, self.num_workers,
                                  shard_io.shard_seed(self.seed, epoch))

    def batches_per_worker(self, epoch: int = 0) -> int:
        return min(math.ceil(n / self.local_batch) for rank in self._counts(epoch) for n in rank)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return self.batches_per_worker(epoch) * max(1, self.num_workers)

    def dropped(self, epoch: int = 0) -> int:
        """Samples (all ranks) left out of this epoch to keep ranks and workers in step."""
        m = self.batches_per_worker(epoch)
        return sum(max(0, n - m * self.local_batch) for rank in self._counts(epoch) for n in rank)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        import webdataset as wds
        workers = max(1, self.num_workers)
        per_worker = self.batches_per_worker(epoch)
        # the loader takes batches round-robin from workers 0, 1, ...: batch b came from worker
        # b % workers, which has made b // workers batches before it; a resumed loader starts
        # with the worker whose turn it is (the split by worker is rotated accordingly)
        skips = [start // workers + (1 if w < start % workers else 0) for w in range(workers)]
        offset = start % workers
        pipe = shard_io.sample_pipeline(self.urls, seed=self.seed, epoch=epoch, shuffle=True,
                                        shuffle_buffer=self.shuffle_buffer, rank=self.rank, worker_offset=offset)
        pipe.append(wds.batched(self.local_batch, collation_fn=None, partial=True))
        pipe.append(_Window(skips, per_worker, offset))
        pipe.append(wds.map(self.collate))
        loader = DataLoader(pipe, batch_size=None, num_workers=self.num_workers,
                            generator=_loader_generator(self.seed, epoch))
        yield from islice(loader, self.batches_per_epoch(epoch) - start)


def eval_batches(data: Dataset, collate: ItemCollator, batch_size: int, shard_dir: str | Path | None = None,
                 num_workers: int = 0, rank: int = 0, world: int = 1) -> Iterator[dict[str, Any]]:
    """Every item once, for retrieval: from memory in index order (chunks ``rank::world``), or
    from the shards in file order (all of them, whatever the rank)."""
    if shard_dir is None:
        chunks = [list(range(s, min(s + batch_size, data.n_items))) for s in range(0, data.n_items, batch_size)]
        ds = _IndexChunks(data, chunks[rank::world], collate)
        yield from DataLoader(ds, batch_size=None, num_workers=num_workers, generator=torch.Generator())
        return
    samples = shard_io.iter_shard_samples(shard_dir)
    while True:
        chunk = list(islice(samples, batch_size))
        if not chunk:
            return
        yield collate(chunk)


class _IndexChunks(TorchDataset):
    def __init__(self, data: Dataset, chunks: list[list[int]], collate: ItemCollator) -> None:
        self.data, self.chunks, self.collate = data, chunks, collate

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return self.collate([memory_sample(self.data, i, self.collate.modalities) for i in self.chunks[k]])


def hash_uniform(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform [0, 1) numbers that are a pure function of the integer keys (splitmix64 mixing).

    Counter-based randomness: a draw for (seed, epoch, item, stream) does not depend on
    which rank or batch the item landed in, so DDP and single-process runs sample the same.
    """
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for k in keys:
            h = (h ^ np.asarray(k).astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
            h = h ^ (h >> np.uint64(31))
            h = h * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(29))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class CooccurrenceSampler:
    """For each item, another item a random user of it also interacted with (item2vec-style positives).

    Vectorised over the batch; draws are :func:`hash_uniform` of (seed, epoch, item), so
    sampling needs no state to resume and does not depend on how a batch is split over
    ranks. Only training interactions are used.
    """

    def __init__(self, matrix: Any) -> None:
        self.by_user = matrix.tocsr()
        self.by_item = matrix.tocsc()

    def sample(self, items: np.ndarray, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(positives, ok)``: ``ok`` False where the item has no co-interacted item."""
        items = np.asarray(items, dtype=np.int64)
        ip = self.by_item.indptr
        deg = ip[items + 1] - ip[items]
        ok = deg > 0
        r1, r2 = hash_uniform(seed, epoch, items, 1), hash_uniform(seed, epoch, items, 2)
        pick = ip[items] + np.minimum((r1 * deg).astype(np.int64), np.maximum(deg - 1, 0))
        users = np.where(ok, self.by_item.indices[np.where(ok, pick, 0)], 0)
        up = self.by_user.indptr
        length = up[users + 1] - up[users]
        ok &= length > 1
        # uniform over the user's other items: draw among the first L-1 slots and swap the
        # item itself for the last slot
        k = np.minimum((r2 * (length - 1)).astype(np.int64), np.maximum(length - 2, 0))
        j = self.by_user.indices[np.where(ok, up[users] + k, 0)]
        last = self.by_user.indices[np.where(ok, up[users] + length - 1, 0)]
        j = np.where(j == items, last, j)
        return np.where(ok, j, items), ok


def check_shards_match(shard_dir: str | Path, data: Dataset) -> None:
    """Shards must hold this dataset's items (same count); a sample's id is checked as it is read."""
    sizes = shard_io.read_sizes(shard_dir)
    n = sum(sizes.values())
    if n != data.n_items:
        raise ConfigError(f"{shard_dir} holds {n} items, the dataset {data.n_items}: "
                          f"write the shards of this dataset (`mmrec data shards DATA --out DIR`)")


__all__ = ["FIELDS", "CooccurrenceSampler", "ItemCollator", "MemorySource", "ShardSource", "check_shards_match",
           "eval_batches", "hash_uniform", "memory_sample"]
