"""Preprocessing that survives bad media: corrupt images, truncated audio, empty text.

Pre-training skips such items and extraction masks them; both need to know *which*
rows failed and why, without one bad file ending an epoch. :func:`preprocess_robust`
tries the whole batch first (the fast path) and falls back to item by item only when
that fails, so clean batches cost nothing extra.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mmrec.encoders.base import Batch, Encoder


@dataclass
class BadMedia:
    """Counts of skipped/masked items per modality and reason (goes to logs and metrics.json)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # "modality/reason" -> first item seen

    def add(self, modality: str, reason: str, item: Any) -> None:
        key = f"{modality}/{reason}"
        self.counts[key] += 1
        self.examples.setdefault(key, str(item))

    def merge(self, counts: dict[str, int], examples: dict[str, str] | None = None) -> None:
        """Fold in another tally (a batch's, a chunk's, a worker's): counts add, first examples stay."""
        for key, n in counts.items():
            self.counts[key] += int(n)
        for key, ex in (examples or {}).items():
            self.examples.setdefault(key, ex)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def _is_missing(modality: str, raw: Any) -> bool:
    if raw is None:
        return True
    if modality == "text":
        return not isinstance(raw, str) or not raw.strip()
    return isinstance(raw, (bytes, bytearray)) and len(raw) == 0


def preprocess_robust(encoder: Encoder, raws: Sequence[Any], modality: str | None = None,
                      bad: BadMedia | None = None, ids: Sequence[Any] | None = None) -> tuple[Batch | None, torch.Tensor]:
    """``(batch of the good rows or None, ok mask [len(raws)])``.

    Missing content (None, empty bytes, blank text) is ``missing``; content the
    encoder's own preprocessing rejects (undecodable image, truncated WAV) is
    ``corrupt`` (or the reason the error carries, e.g. ``too_large``). All are counted in
    ``bad`` (when given) and left out of the batch.
    """
    modality = modality or encoder.modality
    ids = list(ids) if ids is not None else list(range(len(raws)))
    ok = torch.tensor([not _is_missing(modality, r) for r in raws], dtype=torch.bool)
    if bad is not None:
        for i in torch.nonzero(~ok).flatten().tolist():
            bad.add(modality, "missing", ids[i])
    keep = torch.nonzero(ok).flatten().tolist()
    if not keep:
        return None, ok
    try:
        return encoder.preprocess([raws[i] for i in keep]), ok
    except Exception:  # noqa: BLE001 - find the culprits item by item below
        pass
    good: list[int] = []
    for i in keep:
        try:
            encoder.preprocess([raws[i]])
            good.append(i)
        except Exception as e:  # noqa: BLE001 - any decoder error means this item's media is bad
            ok[i] = False
            if bad is not None:
                # reason: "corrupt", or what the decoder named ("too_large": image bombs, WAVs over the bound)
                bad.add(modality, getattr(e, "reason", "corrupt"), f"{ids[i]}: {type(e).__name__}: {e}"[:200])
    if not good:
        return None, ok
    return encoder.preprocess([raws[i] for i in good]), ok


__all__ = ["BadMedia", "preprocess_robust"]
