"""MB-GMN's fast paths compute the same mathematics as the previous implementation.

``MBGMNConfig.fast`` (default True) selects :class:`_FastGeneratedLayer` for the meta
prediction network's generated layer and the per-user ``score_all``; ``fast=False`` is
the previous implementation, and ``reference_predict`` the literal per-pair W₁(m) of
the reference code. Everything runs in float64 on a tiny random graph, so the paths
must agree to rounding, in values and in every gradient.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmrec.datasets.schema import Dataset, Interactions
from mmrec.graph.mbgmn import (MBGMN, MetaPredictionNetwork, _FastGeneratedLayer, _GeneratedLayer, group_buckets,
                               reference_predict)
from mmrec.models.base import create_model

TOL = dict(rtol=1e-9, atol=1e-9)


def tiny_graph(n_users: int = 24, n_items: int = 30, seed: int = 0) -> Dataset:
    """Random view / cart / buy rows; every user views, most cart, some buy."""
    rng = np.random.default_rng(seed)
    U, I, B = [], [], []
    for u in range(n_users):
        items = rng.choice(n_items, size=int(rng.integers(4, 10)), replace=False)
        for b, cut in enumerate((len(items), int(rng.integers(0, 4)), int(rng.integers(0, 3)))):
            U += [u] * cut
            I += [int(x) for x in items[:cut]]
            B += [b] * cut
    return Dataset("tiny", ["view", "cart", "buy"], "buy", np.array([f"u{u}" for u in range(n_users)], dtype=object),
                   np.array([f"i{i}" for i in range(n_items)], dtype=object),
                   Interactions(np.array(U), np.array(I), np.array(B)))


@pytest.fixture(scope="module")
def data() -> Dataset:
    return tiny_graph()


def build(data: Dataset, **overrides) -> MBGMN:
    torch.manual_seed(0)
    cfg = {"dim": 4, "layers": 2, "rank": 2, "heads": 2, "samples_per_user": 5, **overrides}
    return create_model("mbgmn", data, cfg).double()


def batch_of(model: MBGMN, data: Dataset, seed: int = 0) -> dict:
    return next(iter(model.training_batches(data, 16, np.random.default_rng(seed))))


def _layer_args(d: int, n_pairs: int, n_groups: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    group = torch.randint(0, n_groups, (n_pairs,), generator=g)
    group[: n_pairs // 3] = 1                      # one large group: split across buckets
    group[group == 3] = 0                          # an empty group
    args = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
            for shape in ((n_pairs, 3 * d), (n_pairs, d), (n_groups, d), (3 * d + 1, 3 * d, d), (3 * d + 1, d))]
    return args, group


@pytest.mark.parametrize("max_rows,max_groups", [(4, 2), (5, 64), (4096, 64)])
def test_fast_layer_equals_the_previous_layer_values_and_gradients(max_rows, max_groups):
    args, group = _layer_args(3, 50, 6, seed=max_rows)
    fast = _FastGeneratedLayer.apply(*args, group, max_rows, max_groups)
    m, bias = args[0], args[4]                     # the fast layer also adds b₁(m) = [m ‖ 1] bias
    old = _GeneratedLayer.apply(*args[:4], group_buckets(group, 6)) + m @ bias[:-1] + bias[-1]
    torch.testing.assert_close(fast, old, **TOL)
    assert old.abs().max() > 0.1
    weights = torch.randn(old.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    weights[::3] = 0                               # rows without a gradient are skipped by the fast backward
    weights[1, 0] = 0                              # ... but not a row with a single zero
    for got, want in zip(torch.autograd.grad(fast, args, weights), torch.autograd.grad(old, args, weights)):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, **TOL)


def test_fast_layer_with_no_gradient_at_all_gives_zero_gradients():
    args, group = _layer_args(2, 12, 4, seed=1)
    out = _FastGeneratedLayer.apply(*args, group, 8, 4)
    for grad in torch.autograd.grad(out, args, torch.zeros_like(out)):
        assert torch.count_nonzero(grad) == 0


def test_fast_layer_gradcheck():
    args, group = _layer_args(2, 11, 4, seed=2)
    assert torch.autograd.gradcheck(lambda m, i, u, w, b: _FastGeneratedLayer.apply(m, i, u, w, b, group, 3, 2),
                                    args)


def test_fast_predictor_equals_the_literal_per_pair_weights():
    torch.manual_seed(0)
    net = MetaPredictionNetwork(5, max_rows=4).double()
    g = torch.Generator().manual_seed(3)
    users = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    group = torch.randint(0, 4, (30,), generator=g)
    si, tu, ti = (torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fast = net(users, group, si, net.pair_embedding(tu, ti), fast=True)
    ref = reference_predict(net, users[group], si, tu, ti)
    torch.testing.assert_close(fast, ref, **TOL)
    inputs = [users, si, tu, ti, *net.parameters()]
    w = torch.randn(30, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(fast, inputs, w), torch.autograd.grad(ref, inputs, w)):
        torch.testing.assert_close(got, want, **TOL)


def test_fast_loss_and_every_parameter_gradient_equal_the_previous_implementation(data):
    fast, old = build(data), build(data, fast=False)
    assert fast.config.fast and not old.config.fast
    batch = batch_of(fast, data)
    lf, lo = fast.loss(batch), old.loss(batch)
    torch.testing.assert_close(lf, lo, **TOL)
    lf.backward()
    lo.backward()
    n_checked = 0
    for (name, pf), (_, po) in zip(fast.named_parameters(), old.named_parameters()):
        assert pf.grad is not None and po.grad is not None, name
        torch.testing.assert_close(pf.grad, po.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        n_checked += 1
    assert n_checked == len(list(old.parameters())) == len(list(fast.parameters()))
    # the batch has hinge terms that are met (rows without a gradient) and terms that are not
    with torch.no_grad():
        (reps,) = old.compute_representations()
        u, i, j, b = (batch[k].repeat(old.n_behaviors + 1) for k in ("user", "pos", "neg", "behavior"))
        src = torch.arange(old.n_behaviors + 1).repeat_interleave(len(batch["user"]))
        margin = old._predict(reps, src, b, u, i) - old._predict(reps, src, b, u, j)
    assert 0 < int((margin < 1).sum()) < len(margin)


def test_fast_path_is_deterministic(data):
    runs = []
    for _ in range(2):
        model = build(data).float()
        loss = model.loss(batch_of(model, data, seed=3))
        loss.backward()
        runs.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_fast_training_follows_the_same_trajectory(data):
    """A few Adam steps from the same seed: same parameters with either path."""
    models = [build(data), build(data, fast=False)]
    for model in models:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step, batch in zip(range(3), model.training_batches(data, 16, np.random.default_rng(7))):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
    for pf, po in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(pf, po, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("item_chunk", [7, 1024])
def test_fast_score_all_equals_the_previous_scoring(data, item_chunk):
    model = build(data)
    model.eval()
    model.prepare_eval()
    users = torch.tensor([0, 5, 3, 23])
    with torch.no_grad():
        fast = model._score_all_fast(users, item_chunk=item_chunk)
        assert torch.equal(model.score_all(users), model._score_all_fast(users))
        model.config.fast = False
        old = model.score_all(users)
        model.config.fast = True
    assert fast.shape == (4, data.n_items)
    torch.testing.assert_close(fast, old, **TOL)
    assert old.std() > 0
    # the literal per-pair reference scores of the multi-behavior branch for the target behavior
    (reps,) = model.representations()
    n, k, t = model.n_users, model.n_behaviors, model.target
    uu = users.repeat_interleave(data.n_items)
    ii = torch.arange(data.n_items).repeat(len(users)) + n
    with torch.no_grad():
        ref = model.config.mult * reference_predict(model.predictor, reps[k, uu], reps[k, ii], reps[t, uu], reps[t, ii])
    torch.testing.assert_close(fast, ref.view(4, -1), **TOL)


def test_score_all_with_gradients_uses_the_differentiable_path(data):
    model = build(data)
    scores = model.score_all(torch.tensor([1, 2]))
    scores.sum().backward()
    assert model.user_emb.weight.grad is not None and model.user_emb.weight.grad.abs().sum() > 0


def test_the_switch_is_a_config_field(data):
    model = create_model("mbgmn", data, {"dim": 4, "fast": False})
    assert model.config.fast is False
    copy.deepcopy(model)  # still a plain module
