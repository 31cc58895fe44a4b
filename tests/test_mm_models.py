"""Multimodal recommenders: VBPR, LATTICE, MICRO, FREEDOM and the ``edge-prune`` filtration.

A hand-made dataset (30 users x 40 items, image 6-d and text 5-d features) for unit checks;
dense references written out here from the official codes' formulas (LATTICE/MICRO
``build_sim`` + ``build_knn_neighbourhood`` + ``compute_normalized_laplacian``, FREEDOM's
``get_knn_adj_mat``, MICRO's ``batched_contrastive_loss``), independent of the sparse code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmrec.datasets.schema import Dataset, FeatureTable, Interactions, ItemContent
from mmrec.errors import ConfigError
from mmrec.fusion.edge_filtration import DegreeSensitivePruning, degree_weights
from mmrec.fusion.models.lattice import infonce
from mmrec.models.base import create_model
from mmrec.registry import FILTRATIONS

NAMES = ["vbpr", "lattice", "micro", "freedom"]
SMALL = {
    "vbpr": {"dim": 8, "content_dim": 8},
    "lattice": {"dim": 8, "feat_dim": 8, "knn_k": 4},
    "micro": {"dim": 8, "feat_dim": 8, "knn_k": 4, "cl_block": 16},  # > 1 InfoNCE block
    "freedom": {"dim": 8, "knn_k": 4},
}
N_USERS, N_ITEMS = 30, 40


def make_dataset(item_perm: np.ndarray | None = None, masked: bool = True, cold: int = 4, seed: int = 0) -> Dataset:
    """30 users x 40 items; the last ``cold`` items have no interaction; with ``masked``
    every 5th item lacks an image (NaN placeholder that must never leak).
    Item i becomes item ``item_perm[i]`` when a permutation is given."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(N_USERS):
        chosen = rng.choice(N_ITEMS - cold, size=int(rng.integers(3, 8)), replace=False)
        users += [u] * len(chosen)
        items += [int(i) for i in chosen]
    pi = np.arange(N_ITEMS) if item_perm is None else item_perm
    g = torch.Generator().manual_seed(seed)
    image, text = torch.randn(N_ITEMS, 6, generator=g), torch.randn(N_ITEMS, 5, generator=g)
    image_mask = torch.ones(N_ITEMS, dtype=torch.bool)
    if masked:
        image_mask[::5] = False
        image[~image_mask] = float("nan")
    inv = torch.from_numpy(np.argsort(pi))
    features = {"image": FeatureTable(image[inv], image_mask[inv]),
                "text": FeatureTable(text[inv], torch.ones(N_ITEMS, dtype=torch.bool))}
    item_ids = np.empty(N_ITEMS, dtype=object)
    item_ids[pi] = [f"i{i}" for i in range(N_ITEMS)]
    return Dataset("mm-tiny", ["buy"], "buy", np.array([f"u{u}" for u in range(N_USERS)], dtype=object), item_ids,
                   Interactions(np.array(users), pi[np.array(items)], np.zeros(len(users), dtype=np.int64)),
                   items=ItemContent(features=features))


@pytest.fixture(scope="module")
def data() -> Dataset:
    return make_dataset()


def build(name: str, data: Dataset, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, data, {**SMALL[name], **overrides})


def first_batch(model, data: Dataset, seed: int = 0) -> dict:
    """The first batch of an epoch (LATTICE/MICRO learn their graph at that step)."""
    return next(iter(model.training_batches(data, 64, np.random.default_rng(seed))))


# -- every model ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name, data):
    model = build(name, data)
    model.train()
    loss = model.loss(first_batch(model, data))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"{name}: parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name,extra", [("micro", {"filtration": "gate"}), ("lattice", {"fusion": "gated"}),
                                        ("vbpr", {"fusion": "attention", "filtration": "gate"}),
                                        ("freedom", {"fusion": "attention", "filtration": "gate"})])
def test_composes_with_fusions_and_filtrations(name, extra, data):
    model = build(name, data, **extra)
    model.train()
    model.loss(first_batch(model, data)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"{name} {extra}: parameters without gradient: {missing}"
    if extra.get("filtration") == "gate":
        assert model.content.filtration is not None


@pytest.mark.parametrize("name", NAMES)
def test_permuting_item_ids_permutes_scores(name, data):
    perm = np.random.default_rng(3).permutation(N_ITEMS)
    a, b = build(name, data), build(name, make_dataset(item_perm=perm))
    inv = torch.from_numpy(np.argsort(perm))
    state = {k: (v[inv] if v.dim() > 0 and v.shape[0] == N_ITEMS else v) for k, v in a.state_dict().items()}
    b.load_state_dict(state)
    for m in (a, b):
        m.eval()
        m.prepare_eval()
    users = torch.arange(N_USERS)
    torch.testing.assert_close(b.score_all(users)[:, torch.from_numpy(perm)], a.score_all(users),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_scores_are_finite_and_score_matches_score_all(name, data):
    model = build(name, data)
    model.eval()
    model.prepare_eval()
    users = torch.arange(6)
    scores = model.score_all(users)
    assert scores.shape == (6, N_ITEMS) and torch.isfinite(scores).all()   # NaN image placeholders never leak
    items = torch.randint(0, N_ITEMS, (6, 5))
    torch.testing.assert_close(model.score(users, items), scores.gather(1, items), rtol=1e-5, atol=1e-5)
    assert model.content_aware and model.item_embeddings().shape[0] == N_ITEMS


@pytest.mark.parametrize("name", NAMES)
def test_cold_items_are_scored_from_content_alone(name, data):
    """An item without training interactions: its ID rows have no influence on any score."""
    model = build(name, data)
    model.eval()
    cold = torch.arange(N_ITEMS - 4, N_ITEMS)
    before = model.score_all(torch.arange(N_USERS))
    table = model.gamma_item if name == "vbpr" else model.item_emb
    with torch.no_grad():
        table.weight[cold] += 5.0
        if name == "vbpr":
            model.item_bias.weight[cold] += 5.0
    model._cache = None
    after = model.score_all(torch.arange(N_USERS))
    torch.testing.assert_close(after, before)
    assert before[:, cold].std() > 0  # and they are not all the same: content tells them apart


def test_same_seed_same_numbers(data):
    losses = []
    for _ in range(2):
        model = build("freedom", data)
        rng = np.random.default_rng(5)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(2):
            for batch in model.training_batches(data, 32, rng):
                opt.zero_grad()
                loss = model.loss(batch)
                loss.backward()
                opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] == losses[1]


# -- VBPR -----------------------------------------------------------------------------------------

def test_vbpr_score_is_the_paper_formula(data):
    model = build("vbpr", data)
    model.eval()
    u, i = torch.tensor([0, 3]), torch.tensor([[1, 2], [7, 5]])
    feats, masks = model.content.source()
    ef = sum(model.content.proj[m](feats[m]) * masks[m].unsqueeze(1) for m in feats)   # E f_i (sum = concat)
    beta_f = sum(model.feature_bias[m](feats[m]).squeeze(1) * masks[m] for m in feats)  # β'ᵀ f_i
    with torch.no_grad():
        model.item_bias.weight.normal_()
    model._cache = None
    expected = ((model.gamma_user(u).unsqueeze(1) * model.gamma_item(i)).sum(-1)
                + (model.theta_user(u).unsqueeze(1) * ef[i]).sum(-1) + model.item_bias(i).squeeze(-1) + beta_f[i])
    torch.testing.assert_close(model.score(u, i), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"fusion": "attention", "filtration": "gate"}])
def test_batch_row_losses_equal_the_whole_catalogue_formulas(extra, data):
    """VBPR and FREEDOM project only the batch's items in loss(); the numbers are the full-table ones."""
    batch = first_batch(build("vbpr", data), data)
    u, i, j = batch["user"], batch["pos"], batch["neg"]
    bpr = lambda p, q: F.softplus(q - p).mean()  # noqa: E731

    vbpr = build("vbpr", data, reg=0.3, **extra)
    users, items = vbpr.compute_representations()
    warm = vbpr.warm.squeeze(1)
    l2 = (vbpr.gamma_user(u).pow(2).sum() + vbpr.theta_user(u).pow(2).sum()
          + sum((vbpr.gamma_item(x).pow(2).sum(1) * warm[x]).sum()
                + (vbpr.item_bias(x).squeeze(1).pow(2) * warm[x]).sum() for x in (i, j)))
    expected = bpr((users[u] * items[i]).sum(-1), (users[u] * items[j]).sum(-1)) + 0.3 * 0.5 * l2 / len(u)
    torch.testing.assert_close(vbpr.loss(batch), expected, rtol=1e-5, atol=1e-6)

    freedom = build("freedom", data, prune_ratio=0.0, feature_weight=0.5, **extra)
    users, items = freedom.compute_representations()
    if extra:
        feats = {"fused": freedom.content(id_emb=freedom.item_id_weight())}
    else:
        feats = freedom.content.modality_embeddings(freedom.item_id_weight())[0]
    expected = bpr((users[u] * items[i]).sum(-1), (users[u] * items[j]).sum(-1)) + 0.5 * sum(
        bpr((users[u] * x[i]).sum(-1), (users[u] * x[j]).sum(-1)) for x in feats.values())
    torch.testing.assert_close(freedom.loss(batch), expected, rtol=1e-5, atol=1e-6)


def test_vbpr_id_dropout_scores_dropped_items_as_cold_in_training_only(data):
    """DropoutNet-style ID dropout: a dropped item's loss terms are those of a cold item; scoring is unchanged."""
    batch = first_batch(build("vbpr", data), data)
    dropped = build("vbpr", data, reg=0.3, id_dropout=1 - 1e-7)   # every row dropped (with prob. 1 - 1e-7)
    as_cold = build("vbpr", data, reg=0.3)
    as_cold.warm.zero_()                                          # the same items, all treated as cold
    torch.testing.assert_close(dropped.loss(batch), as_cold.loss(batch), rtol=1e-6, atol=1e-7)
    plain = build("vbpr", data, reg=0.3)
    assert not torch.allclose(plain.loss(batch), as_cold.loss(batch))  # dropping changes the training signal
    for m in (dropped, plain):
        m.eval()
    users = torch.arange(N_USERS)
    torch.testing.assert_close(dropped.score_all(users), plain.score_all(users))
    with pytest.raises(ConfigError, match="id_dropout"):
        build("vbpr", data, id_dropout=1.0)


def test_vbpr_refuses_edge_filtration(data):
    with pytest.raises(ConfigError, match="no graph"):
        build("vbpr", data, filtration="edge-prune")


# -- LATTICE / MICRO: sparse learned graphs equal the dense formulas -----------------------------

def dense_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """build_sim + build_knn_neighbourhood of the official code (dense N x N)."""
    xn = x / x.norm(dim=-1, keepdim=True)
    sim = xn @ xn.T
    val, ind = torch.topk(sim, k, dim=-1)
    return torch.zeros_like(sim).scatter(-1, ind, val)


def dense_laplacian(adj: torch.Tensor) -> torch.Tensor:
    """compute_normalized_laplacian of the official code."""
    d = adj.sum(-1).pow(-0.5)
    d = torch.where(torch.isinf(d), torch.zeros_like(d), d)
    return torch.diagflat(d) @ adj @ torch.diagflat(d)


@pytest.mark.parametrize("name", ["lattice", "micro"])
def test_learned_graph_equals_the_dense_formulas_values_and_gradients(name):
    data = make_dataset(masked=False)
    model = build(name, data)
    model.train()
    model.start_epoch()
    k, lam = model.config.knn_k, model.config.lambda_coeff
    h_sparse, parts = model.item_side()
    feats, _ = model.content.source()
    e = model.item_id_weight()
    proj = {m: model.content.proj[m](feats[m]) for m in feats}
    frozen = {m: dense_laplacian(dense_knn(feats[m], k)) for m in feats}
    if name == "lattice":   # Eqs. 5-7 as in LATTICE's Models.py
        w = torch.softmax(model.item_graphs.modal_logits, 0)
        mods = model.item_graphs.modalities
        learned = dense_laplacian(sum(w[j] * dense_knn(proj[m], k) for j, m in enumerate(mods)))
        original = sum(w[j] * frozen[m] for j, m in enumerate(mods))
        h_dense = ((1 - lam) * learned + lam * original) @ e
        targets = [(h_sparse, h_dense)]
    else:                   # MICRO: one graph per modality
        targets = [(parts[m], ((1 - lam) * dense_laplacian(dense_knn(proj[m], k)) + lam * frozen[m]) @ e)
                   for m in feats]
    r = torch.randn_like(e)
    for sparse, dense in targets:
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
        params = [model.content.proj[m].weight for m in feats] + [model.item_emb.weight]
        if name == "lattice":
            params.append(model.item_graphs.modal_logits)
        g_sparse = torch.autograd.grad((sparse * r).sum(), params, retain_graph=True, allow_unused=True)
        g_dense = torch.autograd.grad((dense * r).sum(), params, retain_graph=True, allow_unused=True)
        for gs, gd in zip(g_sparse, g_dense):
            if gd is None:
                assert gs is None or not torch.any(gs != 0)
            else:
                torch.testing.assert_close(gs, gd, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["lattice", "micro"])
def test_learned_graph_never_densifies(name, data):
    model = build(name, data, knn_k=3)
    model.train()
    model.start_epoch()
    graphs = model.item_graph_list()
    k, n, mods = 3, N_ITEMS, model.item_graphs.modalities
    present = {m: int(model.content.source.masks()[m].sum()) for m in mods}
    for m in mods:   # learned kNN: at most k edges per item that has the modality
        assert model.item_graphs.last_nnz[m] <= present[m] * k
    bound = 2 * len(mods) * n * k if name == "lattice" else 2 * n * k   # learned ∪ frozen (∪ modalities)
    assert all(g.nnz <= bound < n * n for g in graphs)
    masks = model.content.source.masks()
    if name == "micro":  # a missing image: no edge in or out of the image graph
        absent = (~masks["image"]).nonzero().squeeze(1)
        ei = graphs[mods.index("image")].edge_index
        assert not torch.isin(ei, absent).any()
    # later steps of the epoch reuse the detached graph; the next epoch learns again
    assert model.item_graph_list()[0].weight.requires_grad is False
    model.start_epoch()
    assert model.item_graph_list()[0].weight.requires_grad


def test_lattice_rejects_contrastive_without_modality_embeddings(data):
    with pytest.raises(ConfigError, match="cl_weight"):
        build("lattice", data, cl_weight=0.1)
    with pytest.raises(ConfigError, match="fusion"):
        build("micro", data, fusion="graph")


def official_contrastive(z1: torch.Tensor, z2: torch.Tensor, tau: float, batch_size: int) -> torch.Tensor:
    """MICRO's batched_contrastive_loss, verbatim math."""
    f = lambda x: torch.exp(x / tau)  # noqa: E731
    sim = lambda a, b: F.normalize(a) @ F.normalize(b).T  # noqa: E731
    n, losses = z1.size(0), []
    for i in range((n - 1) // batch_size + 1):
        idx = torch.arange(i * batch_size, min(n, (i + 1) * batch_size))
        refl, between = f(sim(z1[idx], z1)), f(sim(z1[idx], z2))
        losses.append(-torch.log(between[:, i * batch_size:(i + 1) * batch_size].diag()
                                 / (refl.sum(1) + between.sum(1)
                                    - refl[:, i * batch_size:(i + 1) * batch_size].diag())))
    return torch.cat(losses).mean()


@pytest.mark.parametrize("block_bytes", [0, 2**20])   # blocks of 1 anchor row | of the block size
def test_infonce_equals_micro_batched_contrastive_loss_blockwise(block_bytes):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ref = official_contrastive(z1, z2, 0.5, 10)
    ours = infonce(z1, z2, 0.5, block=10, block_bytes=block_bytes)   # 4 blocks
    torch.testing.assert_close(ours, ref)
    w = torch.tensor(1.7, dtype=torch.float64)                     # a non-unit upstream gradient
    torch.testing.assert_close(torch.autograd.grad(w * ours, [z1, z2]), torch.autograd.grad(w * ref, [z1, z2]))
    assert torch.autograd.gradcheck(lambda a, b: infonce(a, b, 0.5, block=10, block_bytes=block_bytes),
                                    (z1[:12].detach().requires_grad_(), z2[:12].detach().requires_grad_()))


def test_micro_batch_contrastive_and_step_schedule_train(data):
    model = build("micro", data, cl_items="batch", learn_graph="step")
    model.train()
    batches = iter(model.training_batches(data, 32, np.random.default_rng(0)))
    model.loss(next(batches))
    second = model.loss(next(batches))
    second.backward()
    assert model.content.proj["text"].weight.grad is not None   # every step learns the graph


# -- FREEDOM and edge-prune -----------------------------------------------------------------

def test_freedom_frozen_graph_equals_official_construction():
    data = make_dataset(masked=False)
    model = build("freedom", data)
    feats, _ = model.content.source()
    k, n = model.config.knn_k, N_ITEMS
    dense = 0
    for m, w in model.modality_weights.items():   # get_knn_adj_mat: unweighted top-k (self included), D^-1/2 A D^-1/2
        xn = feats[m] / feats[m].norm(dim=-1, keepdim=True)
        _, ind = torch.topk(xn @ xn.T, k, dim=-1)
        adj = torch.zeros(n, n).scatter(-1, ind, 1.0)
        d = adj.sum(-1).pow(-0.5)
        dense = dense + w * d[:, None] * adj * d[None, :]
    assert model.modality_weights == pytest.approx({"image": 0.1, "text": 0.9})
    x = torch.randn(n, 3)
    torch.testing.assert_close(model.item_graph.propagate(0, x), dense @ x, rtol=1e-5, atol=1e-6)


def test_freedom_prunes_training_graph_every_epoch_and_evaluates_on_full(data):
    model = build("freedom", data, prune_ratio=0.75)
    n_edges = data.matrix().nnz
    rng = np.random.default_rng(0)
    kept = []
    for _ in range(2):
        list(model.training_batches(data, 64, rng))
        assert model.graph.kept_edges == int(n_edges * 0.25)
        kept.append(model.graph.adj_t_1.to_dense())
    assert model.graph.adj_t_0._nnz() == 2 * n_edges              # evaluation: the full graph
    assert not torch.equal(kept[0], kept[1])                       # re-sampled each epoch
    model.eval()
    full = model.score_all(torch.arange(3))
    model.graph.adj_t_1 = model.graph.adj_t_1 * 0                  # training graph is not used for scoring
    model._cache = None
    torch.testing.assert_close(model.score_all(torch.arange(3)), full)


def test_edge_prune_keeps_the_share_and_prefers_low_degree_edges():
    assert FILTRATIONS.get("edge-prune") is DegreeSensitivePruning and DegreeSensitivePruning.kind == "edges"
    # user 0 and item 0 are hubs; users 1.. each have one edge to their own item
    users = torch.tensor([0] * 10 + list(range(1, 11)) + list(range(1, 11)))
    items = torch.tensor(list(range(10)) + [0] * 10 + list(range(10, 20)))
    pruning = DegreeSensitivePruning(prune_ratio=0.7)
    g = torch.Generator().manual_seed(0)
    draws = 3000
    freq = torch.zeros(len(users))
    for _ in range(draws):
        keep = pruning.sample(users, items, 11, 20, g)
        assert len(keep) == int(len(users) * 0.3) and len(torch.unique(keep)) == len(keep)
        freq[keep] += 1
    freq /= draws
    hub_hub = freq[0]                       # (user 0, item 0): degrees 10 x 11
    low = freq[20:].mean()                  # (user u, own item): degrees 2 x 1
    assert low > 3 * hub_hub
    # the same inclusion probabilities as FREEDOM's torch.multinomial(1/sqrt(d_u d_i), n, replacement=False)
    w = degree_weights(users, items, 11, 20).float()
    ref = torch.zeros(len(users))
    for _ in range(draws):
        ref[torch.multinomial(w, int(len(users) * 0.3), replacement=False, generator=g)] += 1
    ref /= draws
    assert torch.allclose(freq, ref, atol=0.05)


def test_edge_prune_on_lattice_prunes_its_user_item_graph(data):
    model = build("lattice", data, filtration="edge-prune", prune_ratio=0.5)
    list(model.training_batches(data, 64, np.random.default_rng(0)))
    assert model.graph.kept_edges == int(data.matrix().nnz * 0.5)
    with pytest.raises(ConfigError, match="prune_ratio"):
        DegreeSensitivePruning(1.0)


# -- through the trainer and the CLI ----------------------------------------------------------

def test_content_models_beat_id_only_lightgcn_on_cold_items(tmp_path):
    from mmrec.train.config import build_run_config
    from mmrec.train.run import train

    def cold(name: str) -> dict:
        cfg = build_run_config(None, {"model": name, "data": "synthetic:tiny", "split": "cold", "epochs": 20,
                                      "out": str(tmp_path / name), "seed": 0},
                               ["train.progress=false", "train.eval_every=20", "train.batch_size=256",
                                "train.lr=0.01", "split_args.share=0.5"])
        metrics = train(cfg)
        assert metrics == json.loads((tmp_path / name / "metrics.json").read_text())
        return metrics["cold_start"]

    base = cold("lightgcn")
    for name in ("vbpr", "freedom"):
        ours = cold(name)
        assert ours["n_items"] == base["n_items"] >= 30
        assert ours["NDCG@10"] > base["NDCG@10"] + 0.03, (name, ours["NDCG@10"], base["NDCG@10"])


@pytest.mark.parametrize("name", NAMES)
def test_cli_trains_each_model_on_synthetic_tiny(name, tmp_path, capsys):
    from mmrec.cli import main

    out = tmp_path / name
    assert main(["train", "--model", name, "--data", "synthetic:tiny", "--epochs", "2", "--out", str(out),
                 "--set", "train.progress=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == name and metrics["epochs"] == 2
    assert np.isfinite(metrics["metrics"]["Recall@20"])


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("name", ["freedom", "lattice"])
def test_real_features_ml100k(name, tmp_path):
    """MiniLM text + EfficientNet image features (13 items lack an image): trains and ranks far above chance."""
    from conftest import shared_data_dir

    from mmrec.train.config import build_run_config
    from mmrec.train.run import train

    root = shared_data_dir("ml100k-mm")
    cfg = build_run_config(None, {"model": name, "data": str(root), "epochs": 2, "out": str(tmp_path / name),
                                  "seed": 0},
                           ["train.progress=false", "train.eval_every=2", "train.batch_size=2048", "train.lr=0.005"])
    metrics = train(cfg)
    assert metrics["n_items"] == 1682
    assert metrics["metrics"]["Recall@20"] > 10 * 20 / 1682   # chance: 20 of 1682 items
