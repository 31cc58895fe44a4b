"""Joint-task and multi-scenario heads: contract, gradients, errors, balancing, generator, claims."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mmrec.errors import ConfigError, DataError
from mmrec.heads import (FixedWeights, GradNorm, UncertaintyWeighting, create_balancer, create_head,
                         task_labels)
from mmrec.heads.layers import PartitionedNorm
from mmrec.heads.synthetic import ExposureConfig, make_exposures
from mmrec.registry import HEADS

CONTRACT = ["mesi", "shared-bottom", "mmoe", "ple", "esmm", "aitm", "star", "hamur", "pepnet", "hierrec"]

# small configs so every test runs in well under a second per head
SMALL = {
    "mesi": {},
    "shared-bottom": dict(bottom_dims=(16,), tower_dims=(8,)),
    "mmoe": dict(n_experts=3, expert_dims=(8,), tower_dims=(8,)),
    "ple": dict(n_levels=2, n_specific=1, n_shared=2, expert_dims=(8,), tower_dims=(8,)),
    "esmm": dict(shared_dims=(16,), tower_dims=(8,)),
    "aitm": dict(tower_dims=(16, 8)),
    "star": dict(hidden_dims=(16, 8), aux_dims=(8,), scenario_dim=4),
    "hamur": dict(hidden_dims=(16, 8), adapter_dim=4, k=4, hyper_dims=(8,)),
    "pepnet": dict(hidden_dims=(16, 8), scenario_dim=4),
    "hierrec": dict(bottom_dims=(16,), dynamic_dim=8, scenario_dim=4, implicit_heads=2, implicit_patterns=3,
                    tower_dims=(8,)),
}


def batch(n: int = 48, d: int = 24, n_scenarios: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    scenario = torch.arange(n) % n_scenarios
    click = (torch.rand(n, generator=g) < 0.5).float()
    convert = click * (torch.rand(n, generator=g) < 0.5).float()
    return x, scenario, torch.stack([click, convert], dim=1)


def test_registry_has_the_contract_names():
    assert set(CONTRACT) <= set(HEADS.names())


@pytest.mark.parametrize("name", CONTRACT)
def test_every_parameter_gets_a_finite_nonzero_gradient(name):
    torch.manual_seed(0)
    head = create_head(name, in_dim=24, n_tasks=2, n_scenarios=3, **SMALL[name])
    x, scenario, y = batch()
    logits = head(x, scenario)
    assert logits.shape == (48, 2)
    loss = head.task_losses(logits, y).sum() + head.aux_loss(logits)
    loss.backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", CONTRACT)
def test_same_seed_same_logits(name):
    x, scenario, _ = batch()
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        head = create_head(name, 24, 2, 3, **SMALL[name]).eval()
        outs.append(head(x, scenario))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["star", "pepnet", "hamur", "hierrec"])
def test_scenario_ids_out_of_range_name_the_column(name):
    head = create_head(name, 24, 1, 3, **SMALL[name])
    x, scenario, _ = batch()
    scenario[5] = 7
    with pytest.raises(DataError, match=r"field 'scenario'.*scenario id 7 out of range \[0, 3\)"):
        head(x, scenario)
    scenario[5] = -1
    with pytest.raises(DataError, match=r"scenario id -1 out of range"):
        head(x, scenario)
    with pytest.raises(DataError, match="scenario"):
        head(x)                                   # multi-scenario heads need the ids


def test_task_losses_mask_and_single_scenario_heads_ignore_scenario_ids():
    torch.manual_seed(0)
    head = create_head("shared-bottom", 24, 2, **SMALL["shared-bottom"])
    x, scenario, y = batch()
    torch.testing.assert_close(head(x, scenario + 5), head(x))
    logits = head(x)
    mask = torch.zeros_like(y)
    mask[:10, 1] = 1.0
    mask[:, 0] = 1.0
    losses = head.task_losses(logits, y, mask)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:10, 1], y[:10, 1])
    torch.testing.assert_close(losses[1], expected)
    with pytest.raises(DataError, match="field 'labels'"):
        head.task_losses(logits, y[:, :1])


def test_bad_features_and_configs_are_named():
    head = create_head("mmoe", 24, 2)
    with pytest.raises(DataError, match=r"\[B, 24\]"):
        head(torch.randn(4, 23))
    with pytest.raises(ConfigError, match="exactly 2 tasks"):
        create_head("esmm", 24, 3)
    with pytest.raises(ConfigError, match="divisible by 4"):
        create_head("mesi", 22, 2)
    with pytest.raises(ConfigError, match="head.n_expert"):
        create_head("mmoe", 24, 2, n_expert=3)     # typo in a config key
    with pytest.raises(ConfigError, match="unknown head 'mmo'"):
        create_head("mmo", 24, 2)


def test_asking_for_more_tasks_than_the_data_defines_lists_them():
    data = make_exposures(n=50, seed=0)
    names, y = task_labels(data.labels, 2)
    assert names == ["click", "convert"] and y.shape == (50, 2)
    assert torch.equal(y[:, 1], torch.as_tensor(data.convert))
    with pytest.raises(DataError, match="needs 3 tasks but the data defines 2: click, convert"):
        task_labels(data.labels, 3)
    with pytest.raises(DataError, match="buy.*defines: click, convert"):
        task_labels(data.labels, ["click", "buy"])


def test_esmm_ctcvr_is_ctr_times_cvr():
    torch.manual_seed(0)
    head = create_head("esmm", 24, 2, **SMALL["esmm"])
    x, _, _ = batch()
    logits = head(x)
    a, b = head.ctr_cvr_logits(x)
    torch.testing.assert_close(torch.sigmoid(logits[:, 0]), torch.sigmoid(a))
    torch.testing.assert_close(torch.sigmoid(logits[:, 1]), torch.sigmoid(a) * torch.sigmoid(b), rtol=1e-5, atol=1e-6)


def test_aitm_calibrator_penalises_only_a_later_task_that_is_likelier():
    head = create_head("aitm", 24, 3, **SMALL["aitm"])
    falling = torch.tensor([[2.0, 0.0, -1.0]])
    rising = torch.tensor([[0.0, 1.0, -1.0]])
    assert float(head.aux_loss(falling)) == 0.0
    expected = 0.6 * (torch.sigmoid(torch.tensor(1.0)) - 0.5)
    torch.testing.assert_close(head.aux_loss(rising), expected)


def test_mesi_head_reuses_cigf_mesi_on_separate_inputs():
    from mmrec.graph.cigf import MESI
    torch.manual_seed(0)
    head = create_head("mesi", 16, 2)                     # d = 4 per user / item part, per expert
    assert isinstance(head.mesi, MESI)
    x = torch.randn(5, 16)
    u, i = head.separate_inputs(x)
    torch.testing.assert_close(u[1], x[:, 8:12])          # expert 2's user part
    torch.testing.assert_close(i[0], x[:, 4:8])
    expected = head.mesi(torch.ones(5, dtype=torch.long), u, i) + head.bias[1]
    torch.testing.assert_close(head(x)[:, 1], expected)


def test_partitioned_norm_uses_each_scenarios_statistics():
    torch.manual_seed(0)
    pn = PartitionedNorm(3, 2, momentum=1.0)
    s = torch.tensor([0] * 50 + [1] * 50)
    z = torch.randn(100, 3) + torch.where(s == 0, -5.0, 5.0).unsqueeze(1)
    out = pn(z, s)
    for k in (0, 1):
        torch.testing.assert_close(out[s == k].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    pn.eval()                                             # running stats = this batch (momentum 1)
    torch.testing.assert_close(pn(z, s).mean(), out.mean(), atol=1e-2, rtol=0)


# -- loss balancing ----------------------------------------------------------------------------

def test_fixed_weights():
    bal = create_balancer("fixed", 2, weights=[1.0, 0.5])
    assert isinstance(bal, FixedWeights)
    torch.testing.assert_close(bal(torch.tensor([2.0, 4.0])), torch.tensor(4.0))
    with pytest.raises(ConfigError, match="2 per-task losses"):
        bal(torch.tensor([1.0, 2.0, 3.0]))


def test_uncertainty_weighting_learns_log_variance_of_each_task():
    bal = UncertaintyWeighting(2)
    losses = torch.tensor([0.2, 2.0])
    opt = torch.optim.SGD(bal.parameters(), lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        bal(losses).backward()
        opt.step()
    # stationary point of e^{-s} L + s/2 is s = log(2L): the noisier task gets the smaller weight
    torch.testing.assert_close(bal.log_var.detach(), torch.log(2 * losses), atol=1e-3, rtol=0)
    w = bal.weights()
    assert w[0] > w[1]


def test_gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient():
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4))
    a, b = torch.randn(4), torch.randn(4)
    bal = GradNorm(2, [shared], alpha=1.5)
    opt = torch.optim.Adam(bal.parameters(), lr=0.02)
    for _ in range(100):
        losses = torch.stack([((shared * a).sum() - 1) ** 2 * 10.0, ((shared * b).sum() + 1) ** 2])
        opt.zero_grad()
        bal(losses).backward()
        opt.step()
        bal.renormalize()
    w = bal.weights()
    assert w[0] < w[1]
    torch.testing.assert_close(w.sum(), torch.tensor(2.0))


# -- the generator -----------------------------------------------------------------------------

def test_generator_is_deterministic_and_its_knobs_mean_what_they_say():
    a, b = make_exposures(n=500, seed=4), make_exposures(n=500, seed=4)
    for f in ("x", "scenario", "click", "convert", "p_click"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.x, make_exposures(n=500, seed=5).x)
    assert (a.convert <= a.click).all() and np.array_equal(a.convert, a.click * a.convert_if_clicked)
    for rho in (-0.5, 0.0, 0.9):
        d = make_exposures(n=10, task_correlation=rho, scenario_shift=0.6, seed=1).directions
        cos = (d[:, 0] * d[:, 1]).sum(-1) / np.linalg.norm(d[:, 0], axis=-1) / np.linalg.norm(d[:, 1], axis=-1)
        np.testing.assert_allclose(cos, rho, atol=1e-5)
    same = make_exposures(n=10, scenario_shift=0.0).directions
    np.testing.assert_allclose(same[0], same[2], atol=1e-6)
    apart = make_exposures(n=10, scenario_shift=1.0).directions
    np.testing.assert_allclose((apart[0, 0] * apart[1, 0]).sum(), 0.0, atol=1e-5)
    with pytest.raises(ConfigError, match="task_correlation"):
        ExposureConfig(task_correlation=1.5)


# -- must-hold claims (small sizes, fixed seeds, averaged over two seeds) ----------------------

def fit(head, x, y, scenario=None, epochs=10, seed=0, valid=None, patience=3, lr=3e-3, batch_size=256):
    """Minibatch Adam on the head's own losses; with ``valid`` = (x, y, scenario), keep the
    epoch with the best validation loss (early stopping, so heads of different sizes are
    compared at their best rather than at one arbitrary epoch count)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    scenario = None if scenario is None else torch.as_tensor(scenario)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    best, best_state, bad = float("inf"), None, 0
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            logits = head(x[idx], None if scenario is None else scenario[idx])
            loss = head.task_losses(logits, y[idx]).sum() + head.aux_loss(logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if valid is not None:
            head.eval()
            with torch.no_grad():
                vx, vy, vs = (None if v is None else torch.as_tensor(v) for v in valid)
                v = float(head.task_losses(head(vx, vs), vy).sum())
            if v < best - 1e-4:
                best, best_state, bad = v, copy.deepcopy(head.state_dict()), 0
            else:
                bad += 1
                if bad >= patience:
                    break
    if best_state is not None:
        head.load_state_dict(best_state)
    return head.eval()


def test_esmm_cvr_beats_a_cvr_model_trained_on_clicks_only_over_the_whole_exposure_space():
    """Positively correlated tasks, sparse conversions (ESMM's setting): the CVR tower learns
    through pCTCVR on every exposure and shares its representation with CTR."""
    esmm_auc, base_auc = [], []
    for seed in (0, 1):
        data = make_exposures(n=15000, dim=64, task_correlation=0.9, click_bias=-1.5, convert_bias=-1.5,
                              seed=seed)
        train, test = data.split(5000 / 15000)
        torch.manual_seed(seed)
        esmm = fit(create_head("esmm", 64, 2, shared_dims=(32,), tower_dims=(32,)),
                   train.x, np.stack([train.click, train.convert], 1), seed=seed)
        clicked = train.click == 1
        torch.manual_seed(seed)
        base = fit(create_head("shared-bottom", 64, 1, bottom_dims=(32,), tower_dims=(32,)),
                   train.x[clicked], train.convert[clicked][:, None], seed=seed)
        with torch.no_grad():
            x = torch.as_tensor(test.x)
            esmm_auc.append(roc_auc_score(test.convert_if_clicked, esmm.cvr_logits(x).numpy()))
            base_auc.append(roc_auc_score(test.convert_if_clicked, base(x)[:, 0].numpy()))
    assert np.mean(esmm_auc) > np.mean(base_auc) + 0.01, (esmm_auc, base_auc)


SCENARIO_HEADS = {
    "star": dict(hidden_dims=(64, 32), aux_dims=(16,)),
    "hamur": dict(hidden_dims=(64, 32), k=8, hyper_dims=(32,), adapter_dim=16),
    "hierrec": dict(bottom_dims=(64,), dynamic_dim=16, scenario_dim=8, implicit_heads=2, implicit_patterns=4,
                    tower_dims=(16,)),
}


def test_multi_scenario_heads_beat_one_shared_model_on_shifted_preferences():
    """Six scenarios, each shifting the click direction (λ = 0.8), 1 000 training rows per
    scenario. The shared model sees the scenario as a one-hot feature; the multi-scenario
    heads see the same features plus the scenario id. Every model keeps its best epoch on a
    validation split. (PEPNet does not pass this on every seed: see docs/models/heads.md.)"""
    n_s = 6
    scores: dict[str, list[float]] = {"shared-bottom": [], **{k: [] for k in SCENARIO_HEADS}}
    for seed in (0, 1):
        data = make_exposures(n=15000, dim=16, n_scenarios=n_s, scenario_shift=0.8, click_bias=0.0,
                              logit_scale=3.0, seed=seed)
        train, test = data.split(6000 / 15000)
        train, valid = train.split(0.85)
        x, vx, tx = (d.features(scenario_one_hot=True) for d in (train, valid, test))
        for name, cfg in {"shared-bottom": dict(bottom_dims=(64,), tower_dims=(32,)), **SCENARIO_HEADS}.items():
            torch.manual_seed(seed)
            head = create_head(name, x.shape[1], 1, n_s, **cfg)
            ms = head.multi_scenario
            fit(head, x, train.click[:, None], train.scenario if ms else None, epochs=25, seed=seed,
                batch_size=512, valid=(vx, valid.click[:, None], valid.scenario if ms else None))
            with torch.no_grad():
                p = head(torch.as_tensor(tx), torch.as_tensor(test.scenario) if ms else None)[:, 0].numpy()
            scores[name].append(np.mean([roc_auc_score(test.click[test.scenario == s], p[test.scenario == s])
                                         for s in range(n_s)]))
    shared = np.mean(scores["shared-bottom"])
    for name in SCENARIO_HEADS:
        assert np.mean(scores[name]) > shared + 0.01, scores
