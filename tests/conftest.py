"""Shared fixtures. Tests that need ../shared/data skip when it is absent."""

from __future__ import annotations

import os
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


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Tests share a 2-core machine: keep torch from oversubscribing it."""
    import torch
    torch.set_num_threads(1)
    yield
