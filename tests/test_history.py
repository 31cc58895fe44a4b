"""Repeat / discovery parts of the evaluator, and the history-aware model (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrec.datasets.schema import Dataset, Interactions
from mmrec.errors import ConfigError
from mmrec.eval.protocols import evaluate_full, evaluate_sampled, history_parts
from mmrec.graph.history import HistoryAware, PairEvidence, split_stack_pairs
from mmrec.models.base import create_model

N_USERS, N_ITEMS = 60, 40


def make_data(seed: int = 0) -> Dataset:
    """view (0) / cart (1) / buy (2); 6 training buys per user, each viewed first, some carted.

    One valid and one test buy per user; the test buy of even users was viewed in training
    (a *repeat* pair), that of odd users never seen (a *discovery* pair).
    """
    rng = np.random.default_rng(seed)
    u_tr, i_tr, b_tr, t_tr = [], [], [], []
    valid_u, valid_i, test_u, test_i = [], [], [], []
    t = 0
    for u in range(N_USERS):
        items = rng.permutation(N_ITEMS)[:12]
        for i in items[:6]:  # training buys, viewed then carted (half) then bought
            for b in (0, 1, 2) if rng.random() < 0.5 else (0, 2):
                u_tr.append(u), i_tr.append(i), b_tr.append(b), t_tr.append(t)
                t += 1
        for i in items[6:9]:  # extra views
            u_tr.append(u), i_tr.append(i), b_tr.append(0), t_tr.append(t)
            t += 1
        valid_u.append(u), valid_i.append(items[9])
        test_u.append(u)
        test_i.append(items[6] if u % 2 == 0 else items[11])  # viewed (repeat) / never seen (discovery)
    train = Interactions(np.array(u_tr), np.array(i_tr), np.array(b_tr), timestamp=np.array(t_tr, np.int64))

    def buys(u, i):
        return Interactions(np.array(u), np.array(i), np.full(len(u), 2))

    return Dataset("hist", ["view", "cart", "buy"], "buy", [f"u{x}" for x in range(N_USERS)],
                   [f"i{x}" for x in range(N_ITEMS)], train, valid=buys(valid_u, valid_i),
                   test=buys(test_u, test_i), split="fixed")


class Table:
    """Scores from a fixed matrix (the evaluator's duck-typed scorer)."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores

    def prepare_eval(self) -> None: ...

    def score_all(self, users):
        return self.scores[users].clone()

    def score(self, users, items):
        return self.scores[users[:, None], items]


@pytest.fixture(scope="module")
def data() -> Dataset:
    return make_data()


def repeat_oracle(data: Dataset) -> torch.Tensor:
    """Ranks each user's test item first where it is a repeat pair, last where it is not."""
    s = -torch.rand(data.n_users, data.n_items, generator=torch.Generator().manual_seed(0))
    for u, i in zip(data.test.user, data.test.item):
        s[u, i] = 1.0 if u % 2 == 0 else -5.0
    return s


def test_parts_split_test_pairs_by_training_history(data):
    keys = data.test.user.astype(np.int64) * data.n_items + data.test.item
    parts = history_parts(data, keys)
    assert parts["repeat"].tolist() == [u % 2 == 0 for u in data.test.user]
    assert (parts["repeat"] ^ parts["discovery"]).all()


@pytest.mark.parametrize("protocol", ["full", "sampled"])
def test_parts_metrics_and_counts(data, protocol):
    scorer = Table(repeat_oracle(data))
    if protocol == "full":
        r = evaluate_full(scorer, data, "test", ks=(20,))
        name = "Recall@20"
    else:
        r = evaluate_sampled(scorer, data, "test", ks=(10,), seed=0)
        name = "HR@10"
    assert r[f"repeat/{name}"] == pytest.approx(1.0)
    assert r[f"discovery/{name}"] == pytest.approx(0.0)
    half = N_USERS // 2
    assert r.parts == {"repeat": {"n_users": half, "n_pairs": half}, "discovery": {"n_users": half, "n_pairs": half}}
    # one held-out pair per user: the whole is the pair-weighted mean of the parts
    assert r[name] == pytest.approx(0.5 * r[f"repeat/{name}"] + 0.5 * r[f"discovery/{name}"])


def test_single_behavior_data_has_no_parts(data):
    one = Dataset("one", ["buy"], "buy", data.user_ids, data.item_ids,
                  Interactions(data.train.user, data.train.item, np.zeros(len(data.train), np.int64)),
                  test=Interactions(data.test.user, data.test.item, np.zeros(N_USERS, np.int64)))
    r = evaluate_full(Table(torch.rand(N_USERS, N_ITEMS)), one, "test", ks=(10,))
    assert r.parts == {} and not any("/" in k for k in r)


# -- the history-aware model --------------------------------------------------------------

def build(data: Dataset, **kw) -> HistoryAware:
    torch.manual_seed(0)
    args = {"backbone": "lightgcn-mb", "backbone_args": {"dim": 8, "layers": 1}, "evidence_batch": 64,
            "hidden": 8, **kw}
    return create_model("history", data, args)


def one_batch(model: HistoryAware, data: Dataset) -> dict:
    return next(iter(model.training_batches(data, 64, np.random.default_rng(0))))


@pytest.mark.parametrize("backbone", ["lightgcn-mb", "cigf"])
def test_every_parameter_gets_a_gradient(data, backbone):
    model = build(data, backbone=backbone, backbone_args={"dim": 8, "layers": 2} if backbone == "cigf" else
                  {"dim": 8, "layers": 1})
    model.train()
    model.loss(one_batch(model, data)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_evidence_comes_from_training_rows_only(data):
    ev = PairEvidence(data)
    # odd users' test items were never seen in training: no evidence, though a test row holds them
    odd = data.test.user % 2 == 1
    assert (ev.lookup(data.test.user[odd], data.test.item[odd]) == -1).all()
    assert (ev.lookup(data.valid.user, data.valid.item) == -1).all()
    # rewriting every held-out row changes nothing in the features
    moved = data.replace(test=Interactions(data.test.user, (data.test.item + 1) % N_ITEMS, data.test.behavior),
                         valid=Interactions(data.valid.user, (data.valid.item + 3) % N_ITEMS, data.valid.behavior))
    ev2 = PairEvidence(moved)
    assert np.array_equal(ev.keys, ev2.keys) and torch.equal(ev.features, ev2.features)
    # a pair's training target row never counts as its own evidence (only auxiliary behaviors do)
    assert "buy/did" not in ev.names and ev.features.shape[1] == len(ev.names)
    assert "recency" in ev.names  # the data has timestamps


def test_stack_pairs_are_held_out_of_the_backbone(data):
    torch.manual_seed(3)
    reduced, (users, items, disc) = split_stack_pairs(data, 0.3)
    assert not disc.any()
    assert len(users) > 0
    backbone_keys = set((reduced.matrix().tocoo().row * N_ITEMS + reduced.matrix().tocoo().col).tolist())
    assert not backbone_keys & set((users * N_ITEMS + items).tolist())
    assert len(reduced.train) == len(data.train) - len(users)
    assert (np.asarray(reduced.matrix().sum(axis=1)).ravel() > 0).all()  # every user keeps a buy edge
    # the stacker's item statistics come from the reduced rows (a stack pair never counts itself)
    model = build(data, stack_share=0.3)
    assert model.evidence.keys.shape == PairEvidence(model.backbone_data).keys.shape
    torch.manual_seed(3)
    again = split_stack_pairs(data, 0.3)[1]
    assert np.array_equal(again[0], users) and np.array_equal(again[1], items)  # seeded


def test_simulated_discoveries_lose_every_row_of_their_pair(data):
    torch.manual_seed(3)
    reduced, (users, items, disc) = split_stack_pairs(data, 0.5, discovery_share=0.5)
    assert disc.any() and not disc.all()
    keys = users * N_ITEMS + items
    left = reduced.train.pair_keys(N_ITEMS)
    assert not np.isin(keys[disc], left).any()          # no view, cart or buy row of the pair is left
    assert np.isin(keys[~disc], left).mean() > 0.9      # the others keep their views (each buy was viewed)
    ev = PairEvidence(reduced)
    assert (ev.lookup(users[disc], items[disc]) == -1).all()
    model = build(data, stack_share=0.5, discovery_share=0.5)
    batch = one_batch(model, data)
    assert batch["ev_disc"].any()
    model.train()
    assert torch.isfinite(model.loss(batch))


def test_score_all_agrees_with_score(data):
    model = build(data)
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        users = torch.arange(10)
        items = torch.randint(0, N_ITEMS, (10, 7))
        assert torch.allclose(model.score_all(users).gather(1, items), model.score(users, items), atol=1e-5)
        # a pair in the history gets the bonus, one outside does not
        u = int(data.train.user[0])
        hist = model.evidence.history_items(u)
        outside = np.setdiff1d(np.arange(N_ITEMS), hist)
        base = model.scale * model.backbone.score_all(torch.tensor([u]))[0] + model._item_prior()
        diff = model.score_all(torch.tensor([u]))[0] - base
        assert torch.allclose(diff[torch.from_numpy(outside)], torch.zeros(len(outside)))
        assert torch.allclose(diff[torch.from_numpy(hist)], model.g(model.phi[model.indptr[u]:model.indptr[u + 1]]))


def test_bad_config_and_single_behavior(data):
    with pytest.raises(ConfigError, match="evidence_dropout"):
        build(data, evidence_dropout=1.5)
    with pytest.raises(ConfigError, match="itself"):
        build(data, backbone="history")
    one = Dataset("one", ["buy"], "buy", data.user_ids, data.item_ids,
                  Interactions(data.train.user, data.train.item, np.zeros(len(data.train), np.int64)))
    with pytest.raises(ConfigError, match="auxiliary behaviors"):
        build(one)


def test_training_is_deterministic_and_reduces_the_loss(data):
    def run() -> list[float]:
        model = build(data)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        rng = np.random.default_rng(0)
        torch.manual_seed(1)
        losses = []
        for _ in range(6):
            for batch in model.training_batches(data, 256, rng):
                opt.zero_grad()
                loss = model.loss(batch)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        return losses

    a, b = run(), run()
    assert a == b
    assert np.mean(a[-3:]) < np.mean(a[:3])


def test_evaluate_rebuilds_the_same_model(tmp_path):
    """The stack split draws from torch's generator: evaluate must rebuild it as train did."""
    from mmrec.train.config import build_run_config
    from mmrec.train.run import evaluate, train

    sets = ["model.backbone_args={dim: 8, layers: 1}", "model.hidden=8", "model.evidence_batch=64",
            "train.epochs=2", "train.progress=false", "train.eval_every=1"]
    cfg = build_run_config(None, {"model": "history", "data": "synthetic:tiny", "out": str(tmp_path / "h"),
                                  "seed": 3}, sets)
    trained = train(cfg)
    torch.manual_seed(123)  # whatever state the caller leaves behind
    again = evaluate(tmp_path / "h")
    assert again["metrics"] == trained["metrics"]
