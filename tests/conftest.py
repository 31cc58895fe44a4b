"""Shared fixtures. Tests that need ../shared/data skip when it is absent."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir(name: str | None = None) -> Path:
    """Path to ../shared/data (or one dataset in it); skips the test when absent."""
    root = Path(os.environ.get("MMREC_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = root / name if name else root
    if not path.exists():
        pytest.skip(f"shared data not available at {path}")
    return path


def free_port() -> int:
    """A free TCP port on localhost for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Tests share a 2-core machine: keep torch from oversubscribing it."""
    import torch
    torch.set_num_threads(1)
    yield


def write_planted_dataset(root: Path, n_users: int = 80, n_items: int = 48, clusters: int = 4,
                          per_user: int = 8, seed: int = 0, behaviors: bool = True) -> Path:
    """A canonical directory with planted cluster structure (users like their cluster's items).

    ID models can learn it, popularity cannot: a fixture where ranking quality must differ.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["user\titem\tbehavior\ttimestamp" if behaviors else "user\titem\ttimestamp"]
    t = 0
    for u in range(n_users):
        c = u % clusters
        own = [i for i in range(n_items) if i % clusters == c]
        bought = rng.choice(own, size=min(per_user, len(own)), replace=False)
        for i in bought:
            t += 1
            if behaviors:
                rows.append(f"u{u}\ti{i}\tview\t{t}")
                rows.append(f"u{u}\ti{i}\tbuy\t{t + 1}")
            else:
                rows.append(f"u{u}\ti{i}\t{t}")
        if behaviors:  # some noise views
            for i in rng.choice(n_items, size=3, replace=False):
                t += 1
                rows.append(f"u{u}\ti{i}\tview\t{t}")
    (root / "interactions.tsv").write_text("\n".join(rows) + "\n")
    if behaviors:
        (root / "dataset.yaml").write_text("behaviors: [view, buy]\ntarget: buy\nname: planted\n")
    return root


@pytest.fixture
def planted_dir(tmp_path: Path) -> Path:
    return write_planted_dataset(tmp_path / "planted")


def capture_top_lists(monkeypatch, evaluate) -> "torch.Tensor":
    """Run ``evaluate()`` with the evaluator's RankingMetrics spied on; return the top-K rows it ranked.

    The first RankingMetrics the protocol builds accumulates every evaluated user (later ones
    hold the repeat / discovery parts), so its rows are the whole test set's lists, in user order.
    """
    import torch
    from mmrec.eval import protocols

    spies: list = []
    base = protocols.RankingMetrics

    class Spy(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tops: list = []
            spies.append(self)

        def update(self, top, labels):
            self.tops.append(top.clone())
            return super().update(top, labels)

    monkeypatch.setattr(protocols, "RankingMetrics", Spy)
    try:
        evaluate()
    finally:
        monkeypatch.setattr(protocols, "RankingMetrics", base)
    return torch.cat(spies[0].tops)


MODALITIES = ["audio", "image", "text"]


def modality_parts(n: int = 12, seed: int = 0, grad: bool = False, dim: int = 8) -> dict:
    """Random projected modality rows [n, dim] per modality (fusion / filtration tests)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, dim, generator=g).requires_grad_(grad) for m in MODALITIES}


def modality_masks(n: int = 12) -> dict:
    """Item 0 has nothing, item 1 only text, item 2 lacks image; the rest have everything."""
    import torch
    masks = {m: torch.ones(n, dtype=torch.bool) for m in MODALITIES}
    for m in MODALITIES:
        masks[m][0] = False
    masks["audio"][1] = masks["image"][1] = False
    masks["image"][2] = False
    return masks


def random_content_encoder(n: int, seed: int, feat_dim: int, dim: int = 8, **encoder_args):
    """An ``ItemContentEncoder`` over random stored features of :data:`MODALITIES` [n, feat_dim]
    with :func:`modality_masks`, seeded (the features by ``seed``, the projections by ``torch.manual_seed``)."""
    import torch
    from mmrec.datasets.schema import FeatureTable
    from mmrec.fusion.content import FrozenFeatures, ItemContentEncoder
    g = torch.Generator().manual_seed(seed)
    masks = modality_masks(n)
    tables = {m: FeatureTable(torch.randn(n, feat_dim, generator=g), masks[m]) for m in MODALITIES}
    torch.manual_seed(seed)
    return ItemContentEncoder(FrozenFeatures(tables, norm="none"), dim, **encoder_args)
