"""Multi-behavior graph models: LightGCN, LightGCN-MB, CIGF, MB-GMN.

Tiny hand-made datasets (3 behaviors view ⇒ cart ⇒ buy, 30 users x 40 items);
references are dense computations written out here, independent of the sparse code.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from mmrec.datasets.schema import Dataset, FeatureTable, Interactions, ItemContent
from mmrec.errors import ConfigError
from mmrec.graph.cigf import CIGF
from mmrec.graph.lightgcn import LightGCN, LightGCNMB
from mmrec.graph.mbgmn import MBGMN
from mmrec.graph.multibehavior_sampling import multibehavior_batches
from mmrec.graph.propagation import SparseGraphs
from mmrec.models.base import create_model

NAMES = ["lightgcn", "lightgcn-mb", "cigf", "mbgmn"]
# Small but complete configs: every component exists (CIGF needs >= 2 layers for its attention).
SMALL = {
    "lightgcn": {"dim": 8, "layers": 2},
    "lightgcn-mb": {"dim": 8, "layers": 2},
    "cigf": {"dim": 8, "layers": 3, "samples_per_user": 4},
    "mbgmn": {"dim": 8, "layers": 2, "rank": 2, "heads": 2, "samples_per_user": 4},
}


def cascade_rows(n_users: int, n_items: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    rng = np.random.default_rng(seed)
    U, I, B = [], [], []
    for u in range(n_users):
        views = rng.choice(n_items, size=int(rng.integers(6, 12)), replace=False)
        carts = views[: int(rng.integers(2, 5))]
        buys = carts[: int(rng.integers(1, 3))]
        for b, items in enumerate((views, carts, buys)):
            U += [u] * len(items)
            I += [int(x) for x in items]
            B += [b] * len(items)
    return U, I, B


def make_dataset(user_perm: np.ndarray | None = None, item_perm: np.ndarray | None = None,
                 n_users: int = 30, n_items: int = 40, seed: int = 0, features: bool = False) -> Dataset:
    """The tiny cascade; with permutations, user u becomes user_perm[u] (items likewise)."""
    U, I, B = (np.array(c) for c in cascade_rows(n_users, n_items, seed))
    pu = np.arange(n_users) if user_perm is None else user_perm
    pi = np.arange(n_items) if item_perm is None else item_perm
    user_ids = np.empty(n_users, dtype=object)
    user_ids[pu] = [f"u{u}" for u in range(n_users)]
    item_ids = np.empty(n_items, dtype=object)
    item_ids[pi] = [f"i{i}" for i in range(n_items)]
    items = ItemContent()
    if features:
        g = torch.Generator().manual_seed(seed)
        feats = torch.randn(n_items, 5, generator=g)
        mask = torch.ones(n_items, dtype=torch.bool)
        mask[::4] = False                           # every 4th item has no such content
        feats[~mask] = float("nan")                 # a placeholder that must never leak
        items = ItemContent(features={"image": FeatureTable(feats[np.argsort(pi)], mask[np.argsort(pi)])})
    return Dataset("tiny", ["view", "cart", "buy"], "buy", user_ids, item_ids,
                   Interactions(pu[U], pi[I], B), items=items)


@pytest.fixture(scope="module")
def data() -> Dataset:
    return make_dataset()


def build(name: str, data: Dataset, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, data, {**SMALL[name], **overrides})


def first_batch(model, data: Dataset, seed: int = 0, batch_size: int = 64) -> dict:
    return next(iter(model.training_batches(data, batch_size, np.random.default_rng(seed))))


def dense_bipartite(matrix: sp.csr_matrix) -> np.ndarray:
    r = matrix.toarray().astype(np.float64)
    n_u, n_i = r.shape
    a = np.zeros((n_u + n_i, n_u + n_i))
    a[:n_u, n_u:] = r
    a[n_u:, :n_u] = r.T
    return a


def sym_norm(a: np.ndarray) -> np.ndarray:
    d = a.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-12)), 0)
    return inv[:, None] * a * inv[None, :]


def left_norm(a: np.ndarray) -> np.ndarray:
    d = a.sum(1)
    return np.where(d[:, None] > 0, a / np.maximum(d[:, None], 1e-12), 0)


# -- every model ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_create_model_scores_are_finite_float32(name, data):
    model = create_model(name, data, {"dim": 8} if name != "lightgcn" else None)  # defaults, small dim
    model.eval()
    model.prepare_eval()
    users = torch.arange(5)
    scores = model.score_all(users)
    assert scores.shape == (5, data.n_items) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    items = torch.randint(0, data.n_items, (5, 7))
    torch.testing.assert_close(model.score(users, items), scores.gather(1, items), rtol=1e-5, atol=1e-4)
    assert model.item_embeddings().shape[0] == data.n_items


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient_from_one_batch(name, data):
    model = build(name, data)
    model.train()
    model.loss(first_batch(model, data)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_permuting_ids_permutes_scores(name):
    rng = np.random.default_rng(7)
    pu, pi = rng.permutation(30), rng.permutation(40)
    data, permuted = make_dataset(), make_dataset(pu, pi)
    a, b = build(name, data), build(name, permuted)
    state = {}
    for key, value in a.state_dict().items():
        value = value.clone()
        if key.endswith("user_emb.weight"):
            value[pu] = a.state_dict()[key]
        elif key.endswith("item_emb.weight"):
            value[pi] = a.state_dict()[key]
        state[key] = value
    b.load_state_dict(state)
    for m in (a, b):
        m.eval()
        m.prepare_eval()
    sa = a.score_all(torch.arange(30))
    sb = b.score_all(torch.from_numpy(pu))[:, torch.from_numpy(pi)]
    scale = sa.abs().max().item()
    torch.testing.assert_close(sb, sa, rtol=1e-4, atol=1e-5 * scale)
    assert sa.std() > 0  # not a constant that would pass trivially


@pytest.mark.parametrize("name", NAMES)
def test_a_few_adam_steps_lower_the_loss(name, data):
    model = build(name, data)
    fixed = first_batch(model, data, seed=123)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with torch.no_grad():
        before = model.loss(fixed).item()
    rng = np.random.default_rng(0)
    for _ in range(4):
        model.train()
        for batch in model.training_batches(data, 16, rng):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
    with torch.no_grad():
        after = model.loss(fixed).item()
    assert np.isfinite(before) and after < before
    model.eval()
    model.prepare_eval()
    assert torch.isfinite(model.score_all(torch.arange(30))).all()


@pytest.mark.parametrize("name", NAMES)
def test_eval_cache_is_dropped_when_training_resumes(name, data):
    model = build(name, data)
    model.eval()
    model.prepare_eval()
    cached = model.score_all(torch.arange(4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    model.loss(first_batch(model, data)).backward()
    opt.step()
    on_the_fly = model.score_all(torch.arange(4)).detach()
    assert not torch.allclose(on_the_fly, cached)  # no stale cache after a training step
    model.eval()
    model.prepare_eval()
    torch.testing.assert_close(model.score_all(torch.arange(4)), on_the_fly)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_numbers(name, data):
    losses = []
    for _ in range(2):
        model = build(name, data)
        losses.append(model.loss(first_batch(model, data, seed=3)).item())
    assert losses[0] == losses[1]


@pytest.mark.parametrize("name", NAMES)
def test_item_features_respect_the_mask(name):
    data = make_dataset(features=True)
    model = build(name, data, use_features=True)
    model.loss(first_batch(model, data)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.content.proj["image"].weight.grad.abs().sum() > 0
    model.eval()
    model.prepare_eval()
    before = model.score_all(torch.arange(30))
    assert torch.isfinite(before).all()
    # A masked row contributes nothing: changing it changes no score.
    model.content.source.feat_image[0] = 123.0
    model.prepare_eval()
    torch.testing.assert_close(model.score_all(torch.arange(30)), before)
    with pytest.raises(ConfigError):
        build(name, make_dataset(), use_features=True)  # asked for features the data lacks


# -- LightGCN ---------------------------------------------------------------------------
def three_user_graph() -> Dataset:
    #   u0 - i0, u0 - i1, u1 - i1, u2 - i1, u2 - i2 (all "buy"); one view u1 - i2
    U, I, B = [0, 0, 1, 2, 2, 1], [0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 0]
    return Dataset("three", ["view", "buy"], "buy", np.array(["a", "b", "c"]), np.array(["x", "y", "z"]),
                   Interactions(np.array(U), np.array(I), np.array(B)))


def test_lightgcn_propagation_matches_dense_and_torch_geometric():
    data = three_user_graph()
    model = create_model("lightgcn", data, {"dim": 4, "layers": 3})
    e0 = torch.cat([model.user_emb.weight, model.item_emb.weight]).detach().double()
    a_hat = torch.from_numpy(sym_norm(dense_bipartite(data.matrix())))
    # hand check of one entry: u0 has 2 items, i0 one user -> 1/sqrt(2*1)
    assert a_hat[0, 3].item() == pytest.approx(1 / np.sqrt(2))
    e, x = e0 / 4, e0
    for _ in range(3):
        x = a_hat @ x
        e = e + x / 4
    users, items = model.compute_representations()
    torch.testing.assert_close(torch.cat([users, items]).double(), e, rtol=1e-5, atol=1e-6)

    from torch_geometric.nn.models import LightGCN as PyGLightGCN
    pyg = PyGLightGCN(6, 4, 3)
    pyg.embedding.weight.data.copy_(torch.cat([model.user_emb.weight, model.item_emb.weight]).detach())
    edge_index = torch.from_numpy(np.array(np.nonzero(dense_bipartite(data.matrix())))).long()
    torch.testing.assert_close(torch.cat([users, items]), pyg.get_embedding(edge_index), rtol=1e-5, atol=1e-6)


def test_lightgcn_bpr_sgd_step_matches_dense_reference():
    data = three_user_graph()
    reg, lr = 0.1, 0.5
    model = create_model("lightgcn", data, {"dim": 3, "layers": 2, "reg": reg})
    batch = {"user": torch.tensor([0, 2, 1]), "pos": torch.tensor([1, 2, 1]), "neg": torch.tensor([2, 0, 0])}
    e0 = torch.cat([model.user_emb.weight, model.item_emb.weight]).detach().double().requires_grad_()
    a_hat = torch.from_numpy(sym_norm(dense_bipartite(data.matrix())))
    e = (e0 + a_hat @ e0 + a_hat @ a_hat @ e0) / 3
    u, i, j = e[batch["user"]], e[3 + batch["pos"]], e[3 + batch["neg"]]
    ref_loss = -F.logsigmoid((u * i).sum(1) - (u * j).sum(1)).mean() + reg * 0.5 * (
        e0[batch["user"]].pow(2).sum() + e0[3 + batch["pos"]].pow(2).sum() + e0[3 + batch["neg"]].pow(2).sum()) / 3
    ref_loss.backward()
    expected = e0.detach() - lr * e0.grad

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = model.loss(batch)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    loss.backward()
    opt.step()
    torch.testing.assert_close(torch.cat([model.user_emb.weight, model.item_emb.weight]).detach().double(),
                               expected, rtol=1e-5, atol=1e-6)


def test_lightgcn_layer_weights_and_graphs(data):
    model = build("lightgcn", data)
    assert model.encoder.alpha.sum().item() == pytest.approx(1.0)
    assert torch.allclose(model.encoder.alpha, torch.full((3,), 1 / 3))
    assert model.graph.adj_t(0)._nnz() == 2 * data.matrix().nnz            # target behavior only
    mb = build("lightgcn-mb", data)
    assert isinstance(mb, LightGCNMB) and not isinstance(model, LightGCNMB) and isinstance(model, LightGCN)
    assert mb.graph.adj_t(0)._nnz() == 2 * data.merged_matrix().nnz         # every behavior merged
    rows = [first_batch(mb, data, seed=s) for s in range(3)]
    merged = data.merged_matrix().toarray()
    for batch in rows:
        assert merged[batch["user"], batch["pos"]].all() and not merged[batch["user"], batch["neg"]].any()
    with pytest.raises(ConfigError):
        build("lightgcn-mb", data, train_on="views")


# -- CIGF -------------------------------------------------------------------------------
def test_cigf_behavior_weights_are_a_softmax_across_behaviors(data):
    model = build("cigf", data)
    w = model.behavior_weights()
    assert w.shape == (3, 2, data.n_users + data.n_items, 3)   # branches x layers 2..L x nodes x behaviors
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert (w > 0).all()
    assert w[0, 0].std(0).sum() > 0                            # node-specific, not one global weight
    code_variant = build("cigf", data, weight_norm="leakyrelu").behavior_weights()
    assert not torch.allclose(code_variant.sum(-1), torch.ones(code_variant.shape[:-1]))
    with pytest.raises(ConfigError):
        build("cigf", data, weight_norm="sigmoid")


def test_cigf_mesi_gates_are_behavior_specific_and_normalised(data):
    model = build("cigf", data)
    x = torch.randn(5, 8)
    gates = [model.head.gate(torch.full((5,), t), x, x) for t in range(3)]
    for g in gates:
        torch.testing.assert_close(g.sum(-1), torch.ones(5))
    assert not torch.allclose(gates[0], gates[1])               # one gate per task
    shared = build("cigf", data, shared_gate=True)
    assert len(shared.head.gates) == 1


def test_cigf_matches_dense_reference(data):
    model = build("cigf", data, layers=3)
    ego = model.ego_embeddings().detach().double()
    mats = [torch.from_numpy(left_norm(dense_bipartite(data.matrix(b)))) for b in range(3)]
    alphas = model.behavior_weights().detach().double()          # [branch, layer, node, behavior]
    expected = []
    for t in range(3):
        m = mats[t] @ ego
        h = ego + m
        total = ego + h
        for layer in range(2):
            m = sum(alphas[t, layer][:, k:k + 1] * (mats[k] @ m) for k in range(3))
            h = h + m
            total = total + h
        expected.append(total)
    expected = torch.stack(expected)
    (reps,) = model.compute_representations()
    torch.testing.assert_close(reps.double(), expected, rtol=1e-5, atol=1e-6)
    # MESI score of (user 2, item 5) for the target task, by hand
    u, i = expected[:, 2], expected[:, 30 + 5]
    gate = model.head.gates[2]
    g = torch.softmax(torch.cat([u[2], i[2]]) @ gate.weight.detach().double().T + gate.bias.detach().double(), 0)
    by_hand = model.config.mult * sum(g[k] * (u[k] * i[k]).sum() for k in range(3))
    model.eval()
    model.prepare_eval()
    assert model.score(torch.tensor([2]), torch.tensor([[5]])).item() == pytest.approx(by_hand.item(), rel=1e-4)


def test_cigf_loss_is_a_weighted_sum_of_per_behavior_bpr(data):
    model = build("cigf", data, reg=0.0, loss_weights=[0.0, 0.0, 1.0])
    batch = first_batch(model, data)
    only_buy = {k: v[batch["behavior"] == 2] for k, v in batch.items()}
    torch.testing.assert_close(model.loss(batch), model.loss(only_buy))
    with pytest.raises(ConfigError):
        build("cigf", data, loss_weights=[1.0, 1.0])


# -- MB-GMN -----------------------------------------------------------------------------
def test_mbgmn_attention_is_normalised_over_behaviors(data):
    model = build("mbgmn", data)
    atts = model.behavior_attention()
    assert len(atts) == 2
    for att in atts:
        assert att.shape == (data.n_users + data.n_items, 2, 3, 3)  # nodes x heads x query x key
        torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]))
        assert (att >= 0).all()


def test_mbgmn_matches_dense_reference(data):
    model = build("mbgmn", data)
    enc = model.encoder
    n_u = data.n_users
    ego = model.ego_embeddings().detach()
    mats = [torch.from_numpy(sym_norm(dense_bipartite(data.matrix(b)))).float() for b in range(3)]
    act = lambda x: F.leaky_relu(x, 0.1)  # noqa: E731

    def specialise(neigh, beh):  # meta-knowledge -> per-node low-rank transform, written per node
        meta = act(torch.cat([beh.expand_as(ego), ego, neigh], -1) @ enc.meta.meta.weight.T + enc.meta.meta.bias)
        out = []
        for v in range(ego.shape[0]):
            gen = enc.meta.user_gen if v < n_u else enc.meta.item_gen
            w1 = (gen.first.weight @ meta[v] + gen.first.bias).view(8, 2)
            w2 = (gen.second.weight @ meta[v] + gen.second.bias).view(2, 8)
            out.append(torch.cat([ego[v] @ w1 @ w2, ego[v]]))
        return torch.stack(out)

    def attend(att, msgs):  # msgs [K, D] of one node; 2 heads
        q = msgs @ att.Q
        out = []
        for h in range(2):
            s = slice(8 * h, 8 * h + 8)
            a = torch.softmax(q[:, s] @ q[:, s].T / np.sqrt(8), dim=1)
            out.append(a @ msgs[:, s])
        return torch.cat(out, 1) + msgs

    with torch.no_grad():
        expected = []
        for k in range(3):
            h = specialise(mats[k] @ ego, enc.behavior_emb[k])
            total = h
            for _ in range(2):
                h = act(mats[k] @ h) + h
                total = total + h
            expected.append(total)
        h = specialise(sum(m @ ego for m in mats), enc.behavior_emb[3])
        total = h
        for layer in range(2):
            msgs = torch.stack([act(m @ h) for m in mats], 1)
            h = torch.stack([attend(enc.user_att[layer] if v < n_u else enc.item_att[layer], msgs[v]).sum(0)
                             for v in range(msgs.shape[0])])
            total = total + h
        expected.append(total)
        expected = torch.stack(expected)
        (reps,) = model.compute_representations()
        torch.testing.assert_close(reps, expected, rtol=1e-4, atol=1e-5)

        # meta prediction network for (user 3, item 7), target behavior from the multi-behavior branch
        p = model.predictor
        su, si, tu, ti = expected[3, 3], expected[3, n_u + 7], expected[2, 3], expected[2, n_u + 7]
        x = torch.cat([su * si, su, si])
        zs, zt = act(p.pair(x)), act(p.pair(torch.cat([tu * ti, tu, ti])))
        m = act(p.meta(torch.cat([zs * zt, zs, zt])))
        w1, b1, w2 = p.gen_w1(m).view(48, 16), p.gen_b1(m), p.gen_w2(m)
        by_hand = model.config.mult * (w2 @ act(x @ w1 + b1))
        model.eval()
        model.prepare_eval()
        assert model.score(torch.tensor([3]), torch.tensor([[7]])).item() == pytest.approx(by_hand.item(), rel=1e-4)


def test_mbgmn_hinge_loss_over_sources_and_targets(data):
    model = build("mbgmn", data, reg=0.0, mult=1.0)
    batch = first_batch(model, data)
    (reps,) = model.compute_representations()
    total = 0.0
    for tgt in range(3):
        rows = batch["behavior"] == tgt
        u, i, j = batch["user"][rows], batch["pos"][rows], batch["neg"][rows]
        for src in range(4):
            s, t = torch.full_like(u, src), torch.full_like(u, tgt)
            diff = model._predict(reps, s, t, u, i) - model._predict(reps, s, t, u, j)
            total = total + F.relu(1.0 - diff).mean()
    torch.testing.assert_close(model.loss(batch), total)


# -- sampling ---------------------------------------------------------------------------
def test_multibehavior_batches_draw_valid_triples(data):
    mats = [data.matrix(b) for b in range(3)]
    batches = list(multibehavior_batches(mats, 8, 3, np.random.default_rng(0)))
    users = torch.cat([b["user"] for b in batches])
    assert set(users.tolist()) == set(range(data.n_users))          # one epoch covers every user
    for batch in batches:
        assert set(batch["behavior"].tolist()) == {0, 1, 2}
        for b, m in enumerate(mats):
            sel = batch["behavior"] == b
            dense = m.toarray()
            assert dense[batch["user"][sel], batch["pos"][sel]].all()
            assert not dense[batch["user"][sel], batch["neg"][sel]].any()
            counts = np.bincount(batch["user"][sel].numpy(), minlength=data.n_users)
            degree = np.diff(m.indptr)
            in_batch = np.unique(batch["user"].numpy())
            assert (counts[in_batch] == np.minimum(degree[in_batch], 3)).all()
    capped = list(multibehavior_batches(mats, 8, 3, np.random.default_rng(0), users_per_epoch=10))
    assert len(set(torch.cat([b["user"] for b in capped]).tolist())) == 10


def test_graphs_stay_out_of_the_state_dict_and_follow_dtype(data):
    model = build("cigf", data)
    assert not any("adj" in k for k in model.state_dict())
    assert isinstance(model.graphs, SparseGraphs) and len(model.graphs) == 3
    clone = copy.deepcopy(model).double()   # trainers keep best-model copies
    assert clone.graphs.adj_t(0).dtype == torch.float64 and model.graphs.adj_t(0).dtype == torch.float32
    (reps,) = clone.compute_representations()
    assert reps.dtype == torch.float64


def test_registry_builds_the_right_classes(data):
    assert isinstance(create_model("cigf", data, {"dim": 4}), CIGF)
    assert isinstance(create_model("mbgmn", data, {"dim": 4}), MBGMN)
    with pytest.raises(ConfigError):
        create_model("cigf", data, {"layers": 0})


@pytest.mark.parametrize("name", NAMES)
def test_recipes_build_the_model_with_the_papers_settings(name, data):
    from pathlib import Path

    from mmrec.config import load_yaml

    raw = load_yaml(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    section = dict(raw["model"])
    assert section.pop("name") == name
    model = create_model(name, data, section)
    assert model.config.dim == {"lightgcn": 64, "lightgcn-mb": 64, "cigf": 16, "mbgmn": 16}[name]
    assert raw["train"]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("norm", ["sym", "left", "none"])
def test_sparse_propagation_gradient_is_exact(norm, data):
    """The cached-transpose backward equals the true Jacobian (left norm is not symmetric)."""
    graphs = SparseGraphs([data.matrix(0)[:6, :5]], norm).double()
    x = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: graphs.propagate(0, v), (x,))
    dense = {"sym": sym_norm, "left": left_norm, "none": lambda a: a}[norm](dense_bipartite(data.matrix(0)[:6, :5]))
    torch.testing.assert_close(graphs.propagate(0, x), torch.from_numpy(dense) @ x)


# -- speed paths equal their reference computations --------------------------------------
def _pairs(n_groups: int, n_pairs: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(n_groups, dim, generator=g, dtype=torch.float64)
    group = torch.randint(0, n_groups, (n_pairs,), generator=g)
    group[: n_pairs // 3] = 1  # one large group: split into pieces when max_rows is small
    si, tu, ti = (torch.randn(n_pairs, dim, generator=g, dtype=torch.float64) for _ in range(3))
    return users, group, si, tu, ti


def test_group_buckets_cover_every_pair_once():
    from mmrec.graph.mbgmn import group_buckets

    group = torch.tensor([3, 0, 3, 3, 1, 3, 0, 3, 3])  # group 2 empty, group 3 larger than max_rows
    buckets = group_buckets(group, 4, max_rows=4, max_groups=2)
    seen = []
    for gids, idx in buckets:
        assert idx.shape[0] == len(gids) <= 2 and idx.numel() <= 4 or len(gids) == 1
        for g, row in zip(gids.tolist(), idx.tolist()):
            pairs = [p for p in row if p != len(group)]
            assert pairs and all(group[p] == g for p in pairs)
            assert row[: len(pairs)] == pairs                  # padding only at the end
            seen += pairs
    assert sorted(seen) == list(range(len(group)))


@pytest.mark.parametrize("max_rows", [4096, 5])
def test_mbgmn_factorised_predictor_equals_the_reference_computation(max_rows):
    """The generated first layer without per-pair W₁ equals the literal per-pair product, values and grads."""
    from mmrec.graph.mbgmn import MetaPredictionNetwork, reference_predict

    torch.manual_seed(0)
    net = MetaPredictionNetwork(6, max_rows=max_rows).double()
    users, group, si, tu, ti = _pairs(5, 40, 6)
    for t in (users, si, tu, ti):
        t.requires_grad_()
    fast = net(users, group, si, net.pair_embedding(tu, ti))
    ref = reference_predict(net, users[group], si, tu, ti)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    assert ref.std() > 0
    weights = torch.randn(len(ref), dtype=torch.float64)
    inputs = [users, si, tu, ti, *net.parameters()]
    for got, want in zip(torch.autograd.grad(fast, inputs, weights), torch.autograd.grad(ref, inputs, weights)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mbgmn_generated_layer_gradcheck():
    from mmrec.graph.mbgmn import _GeneratedLayer, group_buckets

    g = torch.Generator().manual_seed(1)
    d, n_pairs = 2, 9
    group = torch.tensor([0, 1, 0, 2, 2, 2, 0, 1, 2])
    buckets = group_buckets(group, 3, max_rows=2)
    args = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
            for shape in ((n_pairs, 3 * d), (n_pairs, d), (3, d), (3 * d + 1, 3 * d, d))]
    assert torch.autograd.gradcheck(lambda m, i, u, w: _GeneratedLayer.apply(m, i, u, w, buckets), args)


def test_mbgmn_loss_equals_the_reference_predictor_loss(data):
    """The model's (grouped, shared-target) loss equals the previous per-pair formulation."""
    from mmrec.graph.mbgmn import reference_predict

    model = build("mbgmn", data).double()
    batch = first_batch(model, data)
    (reps,) = model.compute_representations()
    u, i, j, b = batch["user"], batch["pos"], batch["neg"], batch["behavior"]
    n = data.n_users
    total = model.config.reg * model.regularizer()
    for tgt in range(3):
        rows = b == tgt
        for src in range(4):
            def pred(items):
                uu = u[rows]
                return model.config.mult * reference_predict(model.predictor, reps[src, uu], reps[src, items + n],
                                                             reps[tgt, uu], reps[tgt, items + n])
            total = total + F.relu(1.0 - (pred(i[rows]) - pred(j[rows]))).mean()
    torch.testing.assert_close(model.loss(batch), total, rtol=1e-10, atol=1e-10)


def test_cigf_blockwise_score_all_equals_the_whole_batch_softmax(data):
    model = build("cigf", data).double()
    model.eval()
    model.prepare_eval()
    (reps,) = model.representations()
    users = torch.arange(7)
    u, items = reps[:, users], reps[:, data.n_users:]
    gate = model.head.gates[model.target]
    logits = torch.cat([u[model.target].unsqueeze(1).expand(-1, data.n_items, -1),
                        items[model.target].unsqueeze(0).expand(7, -1, -1)], -1) @ gate.weight.T + gate.bias
    expected = model.config.mult * (logits.softmax(-1) * torch.einsum("kbd,kid->bik", u, items)).sum(-1)
    torch.testing.assert_close(model.head.score_all(model.target, u, items), expected, rtol=1e-10, atol=1e-10)
    # gates so sharp that α·γ underflows for some pairs: those take the softmax path, in any block size
    with torch.no_grad():
        gate.weight.mul_(1e4)
    logits = torch.cat([u[model.target].unsqueeze(1).expand(-1, data.n_items, -1),
                        items[model.target].unsqueeze(0).expand(7, -1, -1)], -1) @ gate.weight.T + gate.bias
    expected = model.config.mult * (logits.softmax(-1) * torch.einsum("kbd,kid->bik", u, items)).sum(-1)
    calls = []
    real = model.head._score_all_softmax
    model.head._score_all_softmax = lambda gu, *a: calls.append(gu.size(1)) or real(gu, *a)
    for block in (1, 50, 1 << 18):  # one user per block, a few users, everything at once
        torch.testing.assert_close(model.head.score_all(model.target, u, items, block=block), expected,
                                   rtol=1e-8, atol=1e-8)
    assert calls and all(c == calls[0] for c in calls), calls  # the same underflowing users each time
