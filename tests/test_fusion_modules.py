"""Fusions ``attention`` / ``gated`` and the feature filtration ``gate``.

Unit checks (formulas, masking, gradients, equivariance, registry) run on random
tensors; the behaviour checks train LightGCN with item content on the synthetic world
whose text is pure noise for half of the items, and CIGF end to end through
``mmrec.train.run.train``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.datasets.schema import FeatureTable
from mmrec.errors import ConfigError
from mmrec.fusion.attention import AttentionFusion, GatedFusion
from mmrec.fusion.content import FrozenFeatures, ItemContentEncoder, import_all_fusions
from mmrec.fusion.filtration import BehaviorGate
from mmrec.registry import FILTRATIONS, FUSIONS

from tests.conftest import MODALITIES, modality_masks, modality_parts  # noqa: E402

MODS = MODALITIES
DIM = 8


def _parts(n: int = 12, seed: int = 0, grad: bool = False) -> dict[str, torch.Tensor]:
    return modality_parts(n, seed, grad, DIM)


def _masks(n: int = 12) -> dict[str, torch.Tensor]:
    return modality_masks(n)


def _fusion(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return FUSIONS.get(name)(MODS, DIM)


# -- registry -------------------------------------------------------------------------

def test_registry_names_and_kinds():
    import_all_fusions()
    assert FUSIONS.get("attention") is AttentionFusion and FUSIONS.get("gated") is GatedFusion
    assert FILTRATIONS.get("gate") is BehaviorGate and BehaviorGate.kind == "features"
    for fusion in ("attention", "gated"):
        enc = ItemContentEncoder(_frozen(_tables(10)), DIM, fusion=fusion, filtration="gate")
        assert isinstance(enc.fusion, FUSIONS.get(fusion)) and isinstance(enc.filtration, BehaviorGate)


# -- formulas -------------------------------------------------------------------------

def test_attention_is_micro_formula():
    fusion = _fusion("attention")
    parts, masks = _parts(), {m: torch.ones(12, dtype=torch.bool) for m in MODS}
    out = fusion(parts, masks)
    e = torch.stack([parts[m] for m in MODS], 1)
    scores = torch.tanh(e @ fusion.proj.weight.T + fusion.proj.bias) @ fusion.query.weight.T  # qᵀ tanh(W e + b)
    alpha = torch.softmax(scores.squeeze(-1), dim=1)
    torch.testing.assert_close(out, (alpha.unsqueeze(-1) * e).sum(1))
    torch.testing.assert_close(fusion.last_weights, alpha)


def test_gated_is_gated_sum():
    fusion = _fusion("gated")
    parts, masks = _parts(), {m: torch.ones(12, dtype=torch.bool) for m in MODS}
    out = fusion(parts, masks)
    cat = torch.cat([parts[m] for m in MODS], 1)
    g = torch.sigmoid(cat @ fusion.gate.weight.T + fusion.gate.bias).view(12, 3, DIM)
    torch.testing.assert_close(out, sum(g[:, k] * parts[m] for k, m in enumerate(MODS)))
    torch.testing.assert_close(fusion.last_weights, g.mean(-1))


def test_gate_filtration_formula_and_modes():
    torch.manual_seed(0)
    gate = BehaviorGate(MODS, DIM)
    parts, id_emb = _parts(), torch.randn(12, DIM)
    out = gate(parts, id_emb)
    for m in MODS:
        lin = gate.gates[m]
        torch.testing.assert_close(out[m], parts[m] * torch.sigmoid(id_emb @ lin.weight.T + lin.bias))
    mgcn = BehaviorGate(MODS, DIM, mode="feature-gates-id")
    out = mgcn(parts, id_emb)
    for m in MODS:  # MGCN Eq. 2: E_id ⊙ σ(W Ė_m + b)
        lin = mgcn.gates[m]
        torch.testing.assert_close(out[m], id_emb * torch.sigmoid(parts[m] @ lin.weight.T + lin.bias))
    with pytest.raises(ConfigError, match="mode"):
        BehaviorGate(MODS, DIM, mode="nope")


# -- masking and gradients ------------------------------------------------------------

@pytest.mark.parametrize("name", ["attention", "gated"])
def test_absent_modality_contributes_nothing_also_to_gradients(name: str):
    fusion = _fusion(name)
    parts, masks = _parts(grad=True), _masks()
    out = fusion(parts, masks)
    assert out.shape == (12, DIM) and torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(DIM))                      # no modality at all -> 0
    w = fusion.last_weights
    assert torch.equal(w[~torch.stack([masks[m] for m in MODS], 1)], torch.zeros(int((~torch.stack(
        [masks[m] for m in MODS], 1)).sum())))
    if name == "attention":  # weights are a distribution over the present modalities
        torch.testing.assert_close(w[1:].sum(1), torch.ones(11))
        torch.testing.assert_close(w[1], torch.tensor([0.0, 0.0, 1.0]))
        torch.testing.assert_close(out[1], parts["text"][1])
    (out * torch.randn_like(out)).sum().backward()
    for m in MODS:
        absent = ~masks[m]
        assert torch.equal(parts[m].grad[absent], torch.zeros_like(parts[m].grad[absent])), m
        assert parts[m].grad[~absent].abs().sum() > 0, m
    for p in fusion.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()

    # garbage (NaN / inf) in absent rows changes nothing
    dirty = {m: parts[m].detach().clone() for m in MODS}
    for m in MODS:
        dirty[m][~masks[m]] = float("nan")
    dirty["image"][2] = float("inf")
    torch.testing.assert_close(fusion(dirty, masks), out.detach())


def test_gate_filtration_with_masks_zeroes_absent_rows_and_their_gradients():
    torch.manual_seed(0)
    gate = BehaviorGate(MODS, DIM)
    parts, masks, id_emb = _parts(grad=True), _masks(), torch.randn(12, DIM, requires_grad=True)
    out = gate(parts, id_emb, masks)
    sum((o * torch.randn_like(o)).sum() for o in out.values()).backward()
    for m in MODS:
        assert torch.equal(out[m][~masks[m]], torch.zeros_like(out[m][~masks[m]]))
        assert torch.equal(parts[m].grad[~masks[m]], torch.zeros_like(parts[m].grad[~masks[m]]))
    assert torch.equal(id_emb.grad[0], torch.zeros(DIM))  # item 0 has no modality: nothing to gate


def test_content_encoder_item_without_content_is_zero_and_gets_no_gradient():
    tables = _tables(10, absent={"image": [0, 3], "text": [0], "audio": [0, 5]})
    torch.manual_seed(0)
    enc = ItemContentEncoder(_frozen(tables), DIM, fusion="attention", filtration="gate")
    id_emb = torch.randn(10, DIM, requires_grad=True)
    out = enc(id_emb=id_emb)
    assert torch.equal(out[0], torch.zeros(DIM)) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.equal(id_emb.grad[0], torch.zeros(DIM))
    assert enc.fusion.last_weights[3, MODS.index("image")] == 0 and enc.fusion.last_weights[5, 0] == 0
    assert set(enc.filtration.mean_gates()) == set(MODS)


# -- equivariance ---------------------------------------------------------------------

@pytest.mark.parametrize("fusion", ["attention", "gated", "sum", "concat"])
@pytest.mark.parametrize("filtration", [None, "gate"])
def test_permutation_equivariance_over_items(fusion: str, filtration: str | None):
    n = 15
    tables = _tables(n, absent={"image": [1, 4], "audio": [2]})
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    permuted = {m: FeatureTable(t.features[perm], t.mask[perm], {}) for m, t in tables.items()}
    id_emb = torch.randn(n, DIM, generator=torch.Generator().manual_seed(2))
    outs = []
    for tabs, ids in ((tables, id_emb), (permuted, id_emb[perm])):
        torch.manual_seed(0)
        enc = ItemContentEncoder(_frozen(tabs), DIM, fusion=fusion, filtration=filtration)
        outs.append(enc(id_emb=ids))
    torch.testing.assert_close(outs[0][perm], outs[1], rtol=1e-5, atol=1e-6)


# -- errors and inspection ------------------------------------------------------------

def test_gate_needs_the_id_embedding():
    enc = ItemContentEncoder(_frozen(_tables(6)), DIM, fusion="sum", filtration="gate")
    with pytest.raises(ConfigError, match="id_emb=None"):
        enc()
    with pytest.raises(ConfigError, match=r"\[n_items, 8\]"):
        enc(id_emb=torch.randn(6, DIM + 1))
    with pytest.raises(ConfigError, match="not been called"):
        BehaviorGate(MODS, DIM).mean_gates()
    with pytest.raises(ConfigError, match="not been called"):
        AttentionFusion(MODS, DIM).mean_weights()
    with pytest.raises(ConfigError, match="no input"):
        AttentionFusion(MODS, DIM)({"text": torch.zeros(2, DIM)}, {"text": torch.ones(2, dtype=torch.bool)})


def test_mean_weights_average_over_items_that_have_the_modality():
    fusion = _fusion("attention")
    masks = _masks()
    masks["audio"][:] = False                    # no item has audio
    fusion(_parts(), masks)
    means = fusion.mean_weights()
    assert np.isnan(means["audio"])
    w, present = fusion.last_weights, torch.stack([masks[m] for m in MODS], 1)
    assert means["text"] == pytest.approx(float(w[present[:, 2], 2].mean()))
    assert means["text"] + means["image"] > 1.0  # item 1 has text only: weight 1 there


def test_means_over_a_subset_of_items():
    masks = _masks()
    subset = torch.zeros(12, dtype=torch.bool)
    subset[[1, 2, 5]] = True                    # 1: text only; 2: no image; 5: everything
    fusion = _fusion("attention")
    fusion(_parts(), masks)
    w = fusion.last_weights
    means = fusion.mean_weights(subset)
    assert means["text"] == pytest.approx(float(w[[1, 2, 5], 2].mean()))
    assert means["image"] == pytest.approx(float(w[5, 1]))       # only item 5 of the three has an image
    assert fusion.mean_weights(torch.tensor([1, 2, 5])) == pytest.approx(means)  # indices = mask
    assert all(np.isnan(v) for v in fusion.mean_weights(torch.tensor([0])).values())  # item 0 has nothing
    with pytest.raises(ConfigError, match="mask"):
        fusion.mean_weights(torch.ones(5, dtype=torch.bool))

    torch.manual_seed(0)
    gate = BehaviorGate(MODS, DIM)
    gate(_parts(), torch.randn(12, DIM), masks)
    g = gate.mean_gates(subset)
    assert g["audio"] == pytest.approx(float(gate.last_gates[[2, 5], 0].mean()))  # item 1 has no audio


# -- behaviour on the synthetic world with a noisy modality -----------------------------
# LightGCN + item content (attention fusion) on synthetic:tiny whose text features are
# pure noise for a random half of the items (noisy_share=0.5, set through
# RunConfig.data_args as `mmrec train` does), with and without the gate filtration, seeds
# 0-2: six runs of ~3 s shared by the tests below. Ten seeds, the all-noise and clean
# worlds and the controls: docs/models/fusion.md.

NOISY = "text"
SEEDS = (0, 1, 2)
WORLD = {"noisy_modality": NOISY, "noisy_share": 0.5}


def _train_noisy(seed: int, filtration: str | None, out: Path) -> dict:
    from mmrec.models.base import create_model
    from mmrec.train.config import RunConfig, TrainSection
    from mmrec.train.run import make_evaluator, model_args, prepare_data
    from mmrec.train.trainer import Trainer

    cfg = RunConfig(model="lightgcn", seed=seed, out=str(out), data_args=dict(WORLD), fusion="attention",
                    filtration=filtration, model_args={"dim": 32},
                    train=TrainSection(epochs=30, lr=0.01, batch_size=128, eval_every=5, patience=3,
                                       progress=False))
    torch.manual_seed(seed)
    data = prepare_data(cfg)
    model = create_model(cfg.model, data, model_args(cfg))
    evaluator = make_evaluator(cfg)
    Trainer(cfg, out, evaluator).fit(model, data)       # selects the best epoch on valid
    test = evaluator(model, data, "test")
    noisy = torch.zeros(data.n_items, dtype=torch.bool)
    noisy[torch.as_tensor(data.ground_truth["noisy_items"])] = True
    content = model.content
    with torch.no_grad():
        content(id_emb=model.item_emb.weight)
        feats, _ = content.source()
        proj_norm = {m: float(content.proj[m](feats[m]).norm(dim=1).mean()) for m in MODS}
    return {"recall": test["Recall@20"], "proj_norm": proj_norm, "n_noisy": int(noisy.sum()),
            "att_noisy": content.fusion.mean_weights(noisy), "att_clean": content.fusion.mean_weights(~noisy),
            "gates": content.filtration.mean_gates() if filtration else None}


@pytest.fixture(scope="module")
def noisy_runs(tmp_path_factory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the numbers in the docs were measured single-threaded
    try:
        root = tmp_path_factory.mktemp("noisy")
        return {(s, f): _train_noisy(s, f, root / f"{s}-{f}") for s in SEEDS for f in (None, "gate")}
    finally:
        torch.set_num_threads(threads)


def _mean(runs: list[dict], key: str) -> dict[str, float]:
    return {m: float(np.mean([r[key][m] for r in runs])) for m in MODS}


def test_noisy_items_get_the_lowest_attention_weight_on_their_noisy_modality(noisy_runs: dict):
    # MICRO's attention scores each item's projected modality, so it can tell a noise row
    # from an informative one; measured: lowest on the noisy items in 8-9 of 10 seeds
    runs = [noisy_runs[(s, "gate")] for s in SEEDS]
    assert all(r["n_noisy"] == 100 for r in runs)  # the option reached the world: half of 200 items
    on_noisy, on_clean = _mean(runs, "att_noisy"), _mean(runs, "att_clean")
    assert all(on_noisy[NOISY] < on_noisy[m] for m in MODS if m != NOISY), on_noisy
    assert on_noisy[NOISY] < 1 / len(MODS), on_noisy               # below a uniform share
    assert on_noisy[NOISY] < on_clean[NOISY], (on_noisy, on_clean)  # the same modality, informative rows
    for r in runs:  # the gates are reported and are proper sigmoid means
        assert all(0.0 < g < 1.0 for g in r["gates"].values())


def test_noisy_modality_gets_the_smallest_learned_projection(noisy_runs: dict):
    # the shared projection carries less of a modality that is noise for half the items
    # (measured: 19 of 20 runs, with or without the gate)
    for f in (None, "gate"):
        norms = _mean([noisy_runs[(s, f)] for s in SEEDS], "proj_norm")
        assert all(norms[NOISY] < norms[m] for m in MODS if m != NOISY), (f, norms)


def test_recall_with_filtration_at_least_without(noisy_runs: dict):
    # the claim, in this setting (8 of 10 seeds pairwise). What it does and does not
    # show (a constant 0.5 gate does as well): docs/models/fusion.md
    with_gate = np.mean([noisy_runs[(s, "gate")]["recall"] for s in SEEDS])
    without = np.mean([noisy_runs[(s, None)]["recall"] for s in SEEDS])
    assert with_gate >= without, (with_gate, without)


# -- CIGF end to end ------------------------------------------------------------------

def test_cigf_with_attention_and_gate_trains_end_to_end(tmp_path: Path):
    from safetensors.torch import load_file

    from mmrec.models.base import create_model
    from mmrec.train.config import build_run_config
    from mmrec.train.run import model_args, prepare_data, train

    def config(out: str, epochs: int):
        return build_run_config(None, {"model": "cigf", "data": "synthetic:tiny", "out": str(tmp_path / out),
                                       "fusion": "attention", "filtration": "gate", "epochs": epochs},
                                ["train.progress=false", "train.eval_every=1"])

    cfg = config("run", 2)
    metrics = train(cfg)
    assert metrics["epochs"] == 2 and all(np.isfinite(v) for v in metrics["metrics"].values())
    assert metrics["metrics"]["HR@10"] > 0.1  # random ranking among 100 items: 0.1

    # a fresh model built the way train() builds it: one step gives every content parameter a gradient
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg)
    model = create_model(cfg.model, data, model_args(cfg))
    assert isinstance(model.content.fusion, AttentionFusion) and isinstance(model.content.filtration, BehaviorGate)
    content = dict(model.content.named_parameters())
    assert {n.split(".")[0] for n in content} == {"proj", "filtration", "fusion"}
    batch = next(iter(model.training_batches(data, 256, np.random.default_rng(0))))
    model.loss(batch).backward()
    for name, p in content.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # and training moved every one of them from its initial value (epochs=0 saves the init;
    # Adam only moves a parameter that had a gradient)
    train(config("init", 0))
    init = load_file(tmp_path / "init" / "best.safetensors")
    trained = load_file(tmp_path / "run" / "best.safetensors")
    for name in content:
        key = f"content.{name}"
        assert key in trained and key in init, key
        assert not torch.equal(trained[key], init[key]), name


# -- helpers --------------------------------------------------------------------------

def _tables(n: int, absent: dict[str, list[int]] | None = None, dims: dict[str, int] | None = None):
    g = torch.Generator().manual_seed(n)
    dims = dims or {"audio": 5, "image": 7, "text": 6}
    tables = {}
    for m in MODS:
        mask = torch.ones(n, dtype=torch.bool)
        mask[(absent or {}).get(m, [])] = False
        feats = torch.randn(n, dims[m], generator=g)
        feats[~mask] = float("nan")  # placeholders of absent items must never leak
        tables[m] = FeatureTable(feats, mask, {})
    return tables


def _frozen(tables) -> FrozenFeatures:
    return FrozenFeatures(tables)
