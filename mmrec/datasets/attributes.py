"""Item attributes as a feature table: categorical columns of ``items.tsv``, multi-hot.

Why: a release year or a genre list can say more about which items people pick than a
sentence embedding of the same words (on ml100k-mm's cold items, docs/results.md), and
recommenders should take such attributes like any other modality: a ``features`` table
with a ``mask`` in the feature store, fused, filtered and projected as images and text
are. Each kept value of a column becomes one 0/1 column named ``"<column>=<value>"``;
multi-valued cells (``Action|Comedy``) are split on ``sep``. Numbers are categories
too (``year=1995``): bin them first if they should not be.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Sequence

import torch

from mmrec.datasets.canonical import ItemRows
from mmrec.datasets.schema import FeatureTable
from mmrec.errors import ConfigError, DataError

#: Default cap on the number of attribute columns: the feature store holds dense tables.
MAX_TOKENS = 1024


def item_tokens(rows: ItemRows, columns: Sequence[str], sep: str | None = "|") -> list[set[str]]:
    """The ``"<column>=<value>"`` tokens of each row of ``items.tsv`` (empty cells and parts skipped)."""
    if not columns:
        raise ConfigError("no attribute columns given")
    dup = [c for c, n in Counter(columns).items() if n > 1]
    if dup:
        raise ConfigError(f"attribute column(s) given twice: {', '.join(dup)}")
    for c in columns:
        if c not in rows.columns:
            raise DataError(f"column '{c}' is not in the file (columns: {', '.join(rows.columns) or 'none'})",
                            file=rows.path, line=1, field=c)
    out: list[set[str]] = [set() for _ in rows.ids]
    for c in columns:
        for r, cell in enumerate(rows.columns[c]):
            parts = cell.split(sep) if sep else [cell]
            out[r].update(f"{c}={p.strip()}" for p in parts if p.strip())
    return out


def attribute_features(rows: ItemRows, columns: Sequence[str], sep: str | None = "|", min_count: int = 1,
                       max_tokens: int = MAX_TOKENS) -> tuple[FeatureTable, list[str]]:
    """Multi-hot table [items of ``rows``, kept tokens] and the token names, in column order.

    A token is kept when at least ``min_count`` items carry it; of those, the
    ``max_tokens`` most frequent (ties by name). Items left without a kept token are
    masked, so no model mistakes "no attributes" for an all-zero attribute vector.
    """
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, got {min_count}")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    tokens = item_tokens(rows, columns, sep)
    counts = Counter(t for ts in tokens for t in ts)
    frequent = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    kept = set(frequent[:max_tokens])
    if not kept:
        raise DataError(f"no attribute value in column(s) {', '.join(columns)} is carried by "
                        f">= {min_count} item(s)", file=rows.path)
    rank = {c: k for k, c in enumerate(columns)}
    vocab = sorted(kept, key=lambda t: (rank[t.split("=", 1)[0]], t))   # grouped by column, readable
    index = {t: j for j, t in enumerate(vocab)}
    x = torch.zeros(len(tokens), len(vocab))
    for r, ts in enumerate(tokens):
        cols = [index[t] for t in ts if t in index]
        if cols:
            x[r, cols] = 1.0
    mask = x.sum(1) > 0
    meta = {"kind": "attributes", "columns": json.dumps(list(columns)), "vocabulary": json.dumps(vocab),
            "dropped_tokens": str(len(counts) - len(vocab))}
    return FeatureTable(x, mask, meta), vocab


__all__ = ["MAX_TOKENS", "attribute_features", "item_tokens"]
