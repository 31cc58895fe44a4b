"""ContrastiveAlignmentLoss: hand computation, masks, duplicates, gradients, all-gather."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn import functional as F

from mmrec.errors import ConfigError
from mmrec.pretrain.losses import ContrastiveAlignmentLoss, info_nce
from tests.conftest import free_port


def _hand_info_nce(a: list[list[float]], b: list[list[float]], scale: float, ids: list[int] | None = None) -> float:
    """Symmetric InfoNCE by explicit loops over python floats."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]
    a, b = [unit(v) for v in a], [unit(v) for v in b]
    n = len(a)
    ids = ids if ids is not None else list(range(n))
    sim = [[scale * sum(x * y for x, y in zip(a[i], b[j])) for j in range(n)] for i in range(n)]

    def ce(rows):
        tot = 0.0
        for i in range(n):
            cols = [j for j in range(n) if j == i or ids[j] != ids[i]]
            tot += -rows[i][i] + math.log(sum(math.exp(rows[i][j]) for j in cols))
        return tot / n
    simt = [[sim[j][i] for j in range(n)] for i in range(n)]
    return 0.5 * (ce(sim) + ce(simt))


A = [[1.0, 0.0], [0.6, 0.8], [0.0, -2.0]]
B = [[0.9, 0.1], [0.5, 1.0], [0.3, -1.0]]
C = [[0.2, 0.7], [1.0, 1.0], [-0.5, 0.5]]


def test_equals_hand_computation():
    loss_fn = ContrastiveAlignmentLoss(init_temperature=0.5)
    got = loss_fn({"image": torch.tensor(A), "behavior": torch.tensor(B)})
    assert math.isclose(loss_fn.scale().item(), 2.0, rel_tol=1e-6)
    assert got.item() == pytest.approx(_hand_info_nce(A, B, 2.0), rel=1e-5)


def test_weighted_pairs_and_default_pairs():
    f = {"image": torch.tensor(A), "text": torch.tensor(C), "behavior": torch.tensor(B)}
    s = math.exp(math.log(1 / 0.07))
    ib, tb, it = _hand_info_nce(A, B, s), _hand_info_nce(C, B, s), _hand_info_nce(A, C, s)
    default = ContrastiveAlignmentLoss()  # content-behavior 1.0, content-content 0.5
    total, terms = default(f, return_terms=True)
    assert set(terms) == {"image-behavior", "text-behavior", "image-text"}
    assert total.item() == pytest.approx(ib + tb + 0.5 * it, rel=1e-5)
    custom = ContrastiveAlignmentLoss(pairs={"image-behavior": 2.0, ("image", "text"): 0.25})
    assert custom(f).item() == pytest.approx(2 * ib + 0.25 * it, rel=1e-5)
    with pytest.raises(ConfigError, match="audio"):
        ContrastiveAlignmentLoss(pairs={"audio-behavior": 1.0})(f)


def test_lower_for_aligned_than_shuffled():
    g = torch.Generator().manual_seed(0)
    beh = torch.randn(64, 16, generator=g)
    img = beh + 0.3 * torch.randn(64, 16, generator=g)
    loss_fn = ContrastiveAlignmentLoss()
    aligned = loss_fn({"image": img, "behavior": beh}).item()
    shuffled = loss_fn({"image": img[torch.randperm(64, generator=g)], "behavior": beh}).item()
    assert aligned < 0.2 * shuffled
    assert shuffled > math.log(64) * 0.5


def test_duplicate_items_are_not_negatives():
    a = torch.tensor(A + [A[0]])  # item 7 sampled twice (rows 0 and 3)
    b = torch.tensor(B + [B[0]])
    ids = torch.tensor([7, 8, 9, 7])
    loss_fn = ContrastiveAlignmentLoss(init_temperature=0.5)
    with_ids = loss_fn({"image": a, "behavior": b}, item_ids=ids).item()
    without = loss_fn({"image": a, "behavior": b}).item()
    hand_ids = _hand_info_nce(A + [A[0]], B + [B[0]], 2.0, ids=[7, 8, 9, 7])
    hand_without = _hand_info_nce(A + [A[0]], B + [B[0]], 2.0)
    assert with_ids == pytest.approx(hand_ids, rel=1e-5)
    assert without == pytest.approx(hand_without, rel=1e-5)
    assert with_ids < without  # the copy no longer competes with the positive


def test_masked_items_contribute_nothing():
    g = torch.Generator().manual_seed(1)
    img, txt, beh = (torch.randn(6, 8, generator=g) for _ in range(3))
    img_nan = img.clone()
    img_nan[[1, 4]] = float("nan")  # items without an image: garbage must not leak
    mask = torch.tensor([True, False, True, True, False, True])
    loss_fn = ContrastiveAlignmentLoss(pairs={"image-behavior": 1.0})
    img_nan.requires_grad_(True)
    masked = loss_fn({"image": img_nan, "behavior": beh}, masks={"image": mask})
    ref = loss_fn({"image": img[mask], "behavior": beh[mask]})
    assert masked.item() == pytest.approx(ref.item(), rel=1e-6)
    masked.backward()
    assert torch.isfinite(img_nan.grad).all()
    assert (img_nan.grad[~mask] == 0).all() and (img_nan.grad[mask] != 0).any()

    # text-behavior terms still count items without an image
    both = ContrastiveAlignmentLoss(pairs={"image-behavior": 1.0, "text-behavior": 1.0})
    _, terms = both({"image": img, "text": txt, "behavior": beh}, masks={"image": mask}, return_terms=True)
    assert terms["text-behavior"].item() == pytest.approx(
        ContrastiveAlignmentLoss()({"text": txt, "behavior": beh}).item(), rel=1e-6)

    # all rows masked: exactly zero, finite gradients, no NaN
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.randn(4, 8, requires_grad=True)
    loss = loss_fn({"image": x, "behavior": y}, masks={"image": torch.zeros(4, dtype=torch.bool)})
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_gradient_reaches_logit_scale_and_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 4, generator=g, requires_grad=True)
    y = torch.randn(8, 4, generator=g, requires_grad=True)
    loss_fn = ContrastiveAlignmentLoss()
    loss_fn({"image": x, "behavior": y}).backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.abs() > 0
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


def test_logit_scale_is_clamped():
    loss_fn = ContrastiveAlignmentLoss(max_logit_scale=100.0)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(10.0)
    assert loss_fn.scale().item() == pytest.approx(100.0)
    x = torch.tensor(A)
    assert loss_fn({"image": x, "behavior": torch.tensor(B)}).item() == pytest.approx(_hand_info_nce(A, B, 100.0), rel=1e-5)


def test_bad_shapes_are_errors():
    loss_fn = ContrastiveAlignmentLoss()
    with pytest.raises(ValueError, match="same batch rows"):
        loss_fn({"image": torch.randn(3, 2), "behavior": torch.randn(4, 2)})
    with pytest.raises(ValueError, match="mask of 'image'"):
        loss_fn({"image": torch.randn(3, 2), "behavior": torch.randn(3, 2)}, masks={"image": torch.ones(4, dtype=torch.bool)})


# -- two ranks with half the batch each == one process with the whole batch -------------

def _batch():
    g = torch.Generator().manual_seed(3)
    n = 10
    feats = {k: torch.randn(n, 6, generator=g) for k in ("image", "text", "behavior")}
    masks = {"image": torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool),
             "text": torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)}
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 6, 7, 3, 9])  # items 0 and 3 on both ranks
    return feats, masks, ids


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        feats, masks, ids = _batch()
        # unequal local batches (6 + 4) exercise the padding of the gather
        sl = slice(0, 6) if rank == 0 else slice(6, 10)
        local = {k: v[sl].clone().requires_grad_(True) for k, v in feats.items()}
        loss_fn = ContrastiveAlignmentLoss(init_temperature=0.2)
        loss = loss_fn(local, masks={k: m[sl] for k, m in masks.items()}, item_ids=ids[sl])
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": {k: v.grad for k, v in local.items()},
                    "scale_grad": loss_fn.logit_scale.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gather_matches_single_process():
    feats, masks, ids = _batch()
    full = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    loss_fn = ContrastiveAlignmentLoss(init_temperature=0.2)
    ref = loss_fn(full, masks=masks, item_ids=ids)
    ref.backward()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank_main, args=(2, free_port(), d), nprocs=2, join=True)
        res = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    for r, sl in ((0, slice(0, 6)), (1, slice(6, 10))):
        # every rank computes the loss of the global batch
        assert res[r]["loss"].item() == pytest.approx(ref.item(), rel=1e-6)
        # the gather's backward sums the gradients of both ranks' (identical) losses,
        # so a rank holds world_size x the single-process gradient; DDP's averaging
        # over ranks divides it back
        for k in full:
            torch.testing.assert_close(res[r]["grads"][k] / 2, full[k].grad[sl], rtol=1e-5, atol=1e-7)
        # the logit scale is not gathered: each rank has the full-batch gradient
        torch.testing.assert_close(res[r]["scale_grad"], loss_fn.logit_scale.grad, rtol=1e-5, atol=1e-7)


def test_info_nce_symmetry():
    a, b = F.normalize(torch.tensor(A), dim=-1), F.normalize(torch.tensor(B), dim=-1)
    s = torch.tensor(3.0)
    assert info_nce(a, b, s).item() == pytest.approx(info_nce(b, a, s).item(), rel=1e-6)
