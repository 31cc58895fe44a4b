"""The only configurable dense items x items allocation: pre-training retrieval's ranking block.

``ranks_of_self`` ranks queries in [eval.block_size, n_items] blocks; a block_size >= n_items
makes each block the dense items x items similarity. The block is sized against the
available memory before it is allocated (``check_block_fits``); tests shrink "available
memory" with monkeypatch.
"""

from __future__ import annotations

import re

import pytest
import torch

import mmrec.pretrain.retrieval as retrieval
from mmrec.errors import ConfigError
from mmrec.pretrain.retrieval import available_memory, ranks_of_self, retrieval_metrics

N = 200  # items; a dense block is N * N * 5 bytes = 200 000 bytes


def _embs(n: int = N, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=g)
    return keys + 0.5 * torch.randn(n, d, generator=g), keys


def test_a_dense_block_over_the_available_memory_is_refused_with_the_estimate_and_the_fix(monkeypatch):
    monkeypatch.setattr(retrieval, "available_memory", lambda device: 100_000)
    queries, keys = _embs()
    with pytest.raises(ConfigError) as e:
        ranks_of_self(queries, keys, torch.arange(N), block_size=4096)
    msg = str(e.value)
    assert "eval.block_size=4096" in msg and f"[{N}, {N}]" in msg and "dense items x items" in msg
    # the estimate (N * N * 5 bytes) and the available memory are both stated
    assert "about 195.3 KiB, but only 97.7 KiB of cpu memory is available" in msg
    fits = int(re.search(r"set eval.block_size to (\d+) or less", msg).group(1))
    assert 1 <= fits < N and fits * N * 5 <= 100_000
    # the suggested setting runs and gives the ranks of an unconstrained run
    monkeypatch.undo()
    expected = ranks_of_self(queries, keys, torch.arange(N), block_size=4096)
    monkeypatch.setattr(retrieval, "available_memory", lambda device: 100_000)
    assert torch.equal(ranks_of_self(queries, keys, torch.arange(N), block_size=fits), expected)


def test_a_block_that_is_not_dense_but_too_large_is_refused_too(monkeypatch):
    monkeypatch.setattr(retrieval, "available_memory", lambda device: 10_000)
    queries, keys = _embs()
    with pytest.raises(ConfigError, match=r"\[50, 200\] similarity block of about") as e:
        ranks_of_self(queries, keys, torch.arange(N), block_size=50)
    assert "dense" not in str(e.value)


def test_the_check_runs_before_any_allocation(monkeypatch):
    monkeypatch.setattr(retrieval, "available_memory", lambda device: 1000)
    calls = []
    monkeypatch.setattr(retrieval.F, "normalize", lambda *a, **k: calls.append(a) or a[0])
    with pytest.raises(ConfigError):
        ranks_of_self(*_embs(), torch.arange(N), block_size=N)
    assert not calls


def test_retrieval_metrics_reach_the_check_and_fit_when_memory_allows(monkeypatch):
    _, keys = _embs()
    embs = {"behavior": keys, "image": keys.clone()}
    masks = {"behavior": torch.ones(N, dtype=torch.bool), "image": torch.ones(N, dtype=torch.bool)}
    out = retrieval_metrics(embs, masks, ["image"], ks=[1], block_size=N)
    assert out["image_to_behavior/Recall@1"] == 1.0  # identical embeddings: every item finds itself
    monkeypatch.setattr(retrieval, "available_memory", lambda device: 1000)
    with pytest.raises(ConfigError, match="eval.block_size"):
        retrieval_metrics(embs, masks, ["image"], ks=[1], block_size=N)


def test_no_fitting_block_says_so(monkeypatch):
    monkeypatch.setattr(retrieval, "available_memory", lambda device: 100)
    with pytest.raises(ConfigError, match="not even one row fits"):
        ranks_of_self(*_embs(), torch.arange(N), block_size=1)


def test_block_size_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.block_size must be >= 1"):
        ranks_of_self(*_embs(), torch.arange(N), block_size=0)


def test_available_memory_reads_the_machine():
    have = available_memory(torch.device("cpu"))
    assert 0 < have <= 1 << 50
