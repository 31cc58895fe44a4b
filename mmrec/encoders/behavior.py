"""Behavior encoders: item ID embeddings, the alignment target of content encoders.

``behavior/id`` is a trainable table; ``behavior/run`` takes the item embeddings
of a trained recommender run (``RUN/item_embeddings.safetensors`` in the feature-store layout: tensor
``features`` (or ``embeddings``) [n_items, d] and ``item_ids``, as an int64 tensor or JSON in the
file's metadata like the feature store), frozen by default so content is pulled
towards what collaborative filtering learned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mmrec.encoders.base import Batch, Encoder, as_mapping, check_embed_input
from mmrec.encoders.weights import Pretrained, WeightsError, WeightsNotFoundError
from mmrec.errors import ConfigError
from mmrec.registry import ENCODERS

ITEM_EMBEDDINGS_FILE = "item_embeddings.safetensors"


def read_item_embeddings(path: str | Path) -> tuple[Tensor, list[str] | None]:
    """``embeddings`` [n, d] and the item ids (None when the file has none)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / ITEM_EMBEDDINGS_FILE
    if not path.is_file():
        raise WeightsNotFoundError(f"item embeddings not found: {path} (expected a run directory "
                                   f"holding {ITEM_EMBEDDINGS_FILE}, or that file)")
    try:
        with safe_open(str(path), "pt") as f:
            keys, meta = set(f.keys()), dict(f.metadata() or {})
            # a run writes the feature-store layout (``features``); ``embeddings`` is accepted too
            name = "features" if "features" in keys else "embeddings"
            if name not in keys:
                raise WeightsError(f"{path}: no 'features' or 'embeddings' tensor (has: {', '.join(sorted(keys))})")
            emb = f.get_tensor(name).to(torch.float32)
            ids = [str(int(x)) for x in f.get_tensor("item_ids").tolist()] if "item_ids" in keys else None
    except WeightsError:
        raise
    except Exception as e:  # safetensors raises its own types for corrupt headers
        raise WeightsError(f"{path}: cannot read safetensors file: {e}") from e
    if ids is None and "item_ids" in meta:
        ids = [str(x) for x in json.loads(meta["item_ids"])]
    if emb.ndim != 2:
        raise WeightsError(f"{path}: 'embeddings' must be [n_items, d], got {tuple(emb.shape)}")
    if ids is not None and len(ids) != emb.shape[0]:
        raise WeightsError(f"{path}: {len(ids)} item_ids for {emb.shape[0]} embedding rows")
    if not torch.isfinite(emb).all():
        raise WeightsError(f"{path}: 'embeddings' contains NaN or inf")
    return emb, ids


class _ItemTable(Encoder):
    modality = "behavior"
    table: nn.Embedding
    item_ids: list[str] | None = None

    def preprocess(self, raw: Sequence[int | str]) -> Batch:
        """Item row indices (ints) or, when the table knows them, item id strings."""
        check_embed_input(raw, "item indices")
        if isinstance(raw[0], str):
            if self.item_ids is None:
                raise ConfigError("this table has no item ids: pass integer row indices")
            pos = {x: i for i, x in enumerate(self.item_ids)}
            missing = [x for x in raw if x not in pos]
            if missing:
                raise KeyError(f"{len(missing)} unknown item ids (e.g. {', '.join(missing[:3])})")
            idx = torch.tensor([pos[x] for x in raw], dtype=torch.long)
        else:
            idx = torch.as_tensor(np.asarray(raw), dtype=torch.long)
        n = self.table.num_embeddings
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"item index out of range [0, {n}): min {int(idx.min())}, max {int(idx.max())}")
        return {"item": idx}

    def encode(self, batch: Batch | Tensor) -> Tensor:
        return self.table(as_mapping(batch, "item")["item"])


@ENCODERS.register("behavior/id")
class IDEncoder(_ItemTable):
    """A trainable item-ID embedding table + head.

    ``pretrained=<file or run dir>`` initialises the table from item embeddings.
    """

    def __init__(self, name: str = "id", pretrained: Pretrained | str = None, embed_dim: int | None = 256,
                 head: str = "linear", num_items: int | None = None, dim: int = 64) -> None:
        super().__init__()
        if isinstance(pretrained, str) and pretrained == "auto":
            pretrained = None
        if pretrained is True:
            raise WeightsNotFoundError("behavior/id has no shipped weights; pass pretrained=<item embeddings file>")
        if pretrained not in (None, False):
            emb, self.item_ids = read_item_embeddings(pretrained)
            if num_items is not None and num_items != emb.shape[0]:
                raise WeightsError(f"{pretrained}: {emb.shape[0]} rows for num_items={num_items}")
            self.table = nn.Embedding.from_pretrained(emb, freeze=False)
        else:
            if num_items is None:
                raise ConfigError("behavior/id needs num_items")
            self.table = nn.Embedding(num_items, dim)
            nn.init.normal_(self.table.weight, std=0.1)
        self._init_head(self.table.embedding_dim, embed_dim, head)


@ENCODERS.register("behavior/run")
class RunEmbeddingEncoder(_ItemTable):
    """Item embeddings of a trained recommender run (frozen unless ``trainable``) + head.

    ``item_ids``: the dataset's item order; rows are reordered to it so that index
    ``i`` is dataset item ``i``. Items the run does not know are an error.
    """

    def __init__(self, name: str = "run", pretrained: Pretrained | str = None, embed_dim: int | None = 256,
                 head: str = "linear", run: str | Path | None = None, trainable: bool = False,
                 item_ids: Sequence[str] | None = None) -> None:
        super().__init__()
        if run is None:
            raise ConfigError("behavior/run needs run=<run directory or item_embeddings.safetensors>")
        emb, file_ids = read_item_embeddings(run)
        if item_ids is not None:
            if file_ids is None:
                if len(item_ids) != emb.shape[0]:
                    raise WeightsError(f"{run}: {emb.shape[0]} rows without item_ids for {len(item_ids)} items")
            else:
                pos = {x: i for i, x in enumerate(file_ids)}
                missing = [str(x) for x in item_ids if str(x) not in pos]
                if missing:
                    raise WeightsError(f"{run}: {len(missing)} of the data's {len(item_ids)} items have no embedding "
                                       f"(e.g. {', '.join(missing[:3])}); its {len(file_ids)} rows are for items "
                                       f"such as {', '.join(map(str, file_ids[:3]))}: trained on other data?")
                emb = emb[torch.tensor([pos[str(x)] for x in item_ids])]
            file_ids = [str(x) for x in item_ids]
        self.item_ids = file_ids
        self.table = nn.Embedding.from_pretrained(emb, freeze=not trainable)
        self._init_head(emb.shape[1], embed_dim, head)
