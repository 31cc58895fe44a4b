"""Filtration ``modality-gate`` and modality dropout (issue 18): a model can learn to ignore a modality.

Unit checks on random tensors (formula, gradients, masks, dropout, the catalogue norm);
every content model accepts them; VBPR's content bias goes through the gate and
``gate_holdout`` trains the weights on simulated cold items only; ``metrics.json`` reports
the learned weights; and on the synthetic world whose audio features are pure noise,
VBPR gives the noise the smallest weight and loses (almost) nothing by having it. Ten
seeds, the controls and ml100k-mm: docs/models/fusion.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.datasets.schema import Dataset, FeatureTable, Interactions, ItemContent
from mmrec.errors import ConfigError
from mmrec.fusion.content import FrozenFeatures, ItemContentEncoder, import_all_fusions
from mmrec.fusion.modality_gate import ModalityGate, drop_modalities
from mmrec.models.base import create_model
from mmrec.registry import FILTRATIONS

from tests.conftest import MODALITIES, modality_masks, modality_parts, random_content_encoder  # noqa: E402

MODS = MODALITIES
DIM = 8


def _parts(n: int = 12, seed: int = 0, grad: bool = False) -> dict[str, torch.Tensor]:
    return modality_parts(n, seed, grad, DIM)


def _masks(n: int = 12) -> dict[str, torch.Tensor]:
    return modality_masks(n)


def _gate(logits=(0.0, 0.0, 0.0), norm: str = "global") -> ModalityGate:
    gate = ModalityGate(MODS, DIM, norm=norm)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor(logits))
    return gate


def _encoder(fusion: str = "sum", filtration: str | None = "modality-gate", p: float = 0.0,
             n: int = 12, seed: int = 0) -> ItemContentEncoder:
    return random_content_encoder(n, seed, 5, DIM, fusion=fusion, filtration=filtration, modality_dropout=p)


# -- the filtration as a plain module ------------------------------------------------------

def test_registered_as_a_feature_filtration_that_ignores_the_id_embedding():
    import_all_fusions()
    assert FILTRATIONS.get("modality-gate") is ModalityGate
    assert ModalityGate.kind == "features" and ModalityGate.uses_id is False
    gate, parts = _gate((0.3, -0.2, 0.5)), _parts()
    a = gate(parts, torch.randn(12, DIM), _masks())
    b = gate(parts, None, _masks())          # a cold item's untrained ID embedding changes nothing
    for m in MODS:
        torch.testing.assert_close(a[m], b[m])


def test_formula_softmax_over_present_modalities_of_unit_rows():
    logits = torch.tensor([0.3, -0.2, 0.5])
    gate, parts, masks = _gate(logits.tolist(), norm="item"), _parts(), _masks()
    with torch.no_grad():
        gate.scale.fill_(2.0)
    out = gate(parts, None, masks)
    for i in range(12):
        have = [k for k, m in enumerate(MODS) if masks[m][i]]
        w = torch.zeros(3)
        if have:
            w[have] = torch.softmax(logits[have], 0)
        for k, m in enumerate(MODS):
            expected = 2.0 * w[k] * parts[m][i] / parts[m][i].norm() if masks[m][i] else torch.zeros(DIM)
            torch.testing.assert_close(out[m][i], expected)
            torch.testing.assert_close(out[m][i].norm(), 2.0 * w[k])   # the weight is the row's size
        torch.testing.assert_close(gate.last_weights[i], w)
    assert torch.equal(gate.last_weights[1], torch.tensor([0.0, 0.0, 1.0]))  # text only: all of it


def test_formula_global_norm_keeps_per_item_sizes():
    # default: divide by the modality's RMS row norm over the (catalogue's) present items
    logits = torch.tensor([0.3, -0.2, 0.5])
    gate, parts, masks = _gate(logits.tolist()), _parts(), _masks()
    with torch.no_grad():
        gate.scale.fill_(2.0)
    out = gate(parts, None, masks)
    for k, m in enumerate(MODS):
        rms = parts[m][masks[m]].pow(2).sum(1).mean().sqrt()
        w = gate.last_weights[:, k]
        torch.testing.assert_close(out[m], 2.0 * w.unsqueeze(1) * parts[m] / rms * masks[m].unsqueeze(1))
        # the weight is the modality's RMS size where every item has the same modalities
        full = masks["audio"] & masks["image"] & masks["text"]
        torch.testing.assert_close(out[m][full].pow(2).sum(1).mean().sqrt(),
                                   2.0 * w[full][0] * parts[m][full].pow(2).sum(1).mean().sqrt() / rms)
    given = {m: torch.tensor(3.0) for m in MODS}       # scales handed in by the content encoder
    out = gate(parts, None, masks, scales=given)
    expected = 2.0 * gate.last_weights[:, 2:3] * parts["text"] / 3.0 * masks["text"].unsqueeze(1)
    torch.testing.assert_close(out["text"], expected)


@pytest.mark.parametrize("n_items", [6, 40])   # fewer items than dimensions, and more
def test_catalogue_rms_without_projecting_the_catalogue(n_items):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n_items, dtype=torch.bool)
    mask[::3] = False
    x = torch.randn(n_items, 10, generator=g) * 3 + 1
    source = FrozenFeatures({"image": FeatureTable(x, mask)}, norm="none")
    w = torch.randn(DIM, 10, generator=g, requires_grad=True)
    rms = source.projection_rms("image", w)
    direct = (x[mask] @ w.T).pow(2).sum(1).mean().sqrt()
    torch.testing.assert_close(rms, direct)
    (g1,) = torch.autograd.grad(rms, w)
    (g2,) = torch.autograd.grad(direct, w)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    enc = _encoder()                                    # the encoder hands these to the gate
    feats, masks = enc.source()
    for m, v in enc.projection_rms().items():
        torch.testing.assert_close(v, enc.proj[m](feats[m][masks[m]]).pow(2).sum(1).mean().sqrt())


@pytest.mark.parametrize("norm", ["global", "item"])
def test_the_projection_cannot_absorb_the_weight(norm):
    # the reason for the normalisation: rescaling a modality before the gate changes nothing
    gate, parts, masks = _gate((0.0, 1.0, -1.0), norm=norm), _parts(), _masks()
    base = gate(parts, None, masks)
    scaled = gate({m: parts[m] * (10.0 if m == "audio" else 0.1) for m in MODS}, None, masks)
    for m in MODS:
        torch.testing.assert_close(base[m], scaled[m])


def test_gradient_reaches_logits_scale_and_inputs():
    gate, parts, masks = _gate(), _parts(grad=True), _masks()
    target = torch.randn(12, DIM, generator=torch.Generator().manual_seed(1))
    out = gate(parts, None, masks)
    (sum(out.values()) * target).sum().backward()
    assert gate.logits.grad is not None and bool(gate.logits.grad.abs().gt(0).all())
    assert gate.scale.grad is not None and float(gate.scale.grad.abs()) > 0
    for m in MODS:
        g = parts[m].grad
        assert torch.isfinite(g).all()
        assert bool(g[masks[m]].abs().sum(1).gt(0).all())   # present rows learn
        assert bool(g[~masks[m]].eq(0).all())               # absent rows get exactly nothing


def test_a_switched_off_modality_stays_zero():
    gate, parts, masks = _gate((-1e4, 0.0, 0.0)), _parts(grad=True), _masks()
    out = gate(parts, None, masks)
    has_other = masks["image"] | masks["text"]
    assert float(out["audio"][has_other].detach().abs().max()) == 0.0
    assert bool(gate.last_weights[has_other, 0].eq(0).all())
    (sum(out.values())).sum().backward()
    assert float(parts["audio"].grad[has_other].abs().max()) == 0.0   # no signal through a closed gate
    # an all-zero row (an absent modality the caller zeroed) stays zero even without masks
    zeroed = _parts()
    zeroed["image"][3] = 0.0
    out = _gate()(zeroed, None)
    assert float(out["image"][3].detach().abs().max()) == 0.0 and float(out["text"][3].detach().norm()) > 0


def test_missing_modalities_nan_placeholders_and_empty_items():
    gate, parts, masks = _gate((0.2, 0.1, -0.3)), _parts(), _masks()
    for m in MODS:
        parts[m][~masks[m]] = float("nan")                # placeholders must not leak
    parts = {m: p.requires_grad_(True) for m, p in parts.items()}
    out = gate(parts, None, masks)
    for m in MODS:
        assert torch.isfinite(out[m]).all() and bool(out[m][~masks[m]].eq(0).all())
    assert bool(gate.last_weights[0].eq(0).all())           # item 0 has nothing: weight 0, output 0
    torch.testing.assert_close(gate.last_weights[1:].sum(1), torch.ones(11))  # renormalised over present
    sum(o.sum() for o in out.values()).backward()
    assert all(torch.isfinite(parts[m].grad).all() for m in MODS) and torch.isfinite(gate.logits.grad).all()


def test_modality_weights_report():
    masks = _masks()
    report = _gate((1.0, 0.0, 0.0)).modality_weights(masks)
    assert set(report) == set(MODS)
    assert [report[m]["n_items"] for m in MODS] == [10, 9, 11]   # item 0 none, 1 text only, 2 no image
    w_full = torch.softmax(torch.tensor([1.0, 0.0, 0.0]), 0)
    assert report["image"]["all_present"] == pytest.approx(float(w_full[1]))
    assert report["image"]["mean"] == pytest.approx(float(w_full[1]))   # every image item has all three
    assert report["image"]["std"] == pytest.approx(0.0, abs=1e-7)
    # text: 9 items with all three, item 2 (audio + text) and item 1 (text only) weigh it more
    expected = [float(w_full[2])] * 9 + [float(torch.softmax(torch.tensor([1.0, 0.0]), 0)[1]), 1.0]
    assert report["text"]["mean"] == pytest.approx(np.mean(expected))
    assert report["text"]["std"] == pytest.approx(np.std(expected))
    none = {m: torch.zeros(4, dtype=torch.bool) for m in MODS}
    assert _gate().modality_weights(none)["audio"]["mean"] is None      # JSON null, not NaN


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="init_norm"):
        ModalityGate(MODS, DIM, init_norm=0.0)
    with pytest.raises(ConfigError, match="modality_dropout"):
        drop_modalities(_masks(), 1.0)
    with pytest.raises(ConfigError, match="modality_dropout"):
        _encoder(p=-0.1)
    with pytest.raises(ConfigError, match="no input"):
        _gate()({"audio": torch.zeros(3, DIM)}, None)


# -- modality dropout ------------------------------------------------------------------------

def test_drop_modalities_rate_never_empties_an_item_and_is_seeded():
    n = 4000
    masks = {m: torch.ones(n, dtype=torch.bool) for m in MODS}
    masks["image"][: n // 2] = False
    kept = drop_modalities(masks, 0.3, torch.Generator().manual_seed(0))
    again = drop_modalities(masks, 0.3, torch.Generator().manual_seed(0))
    other = drop_modalities(masks, 0.3, torch.Generator().manual_seed(1))
    assert all(torch.equal(kept[m], again[m]) for m in MODS)
    assert not all(torch.equal(kept[m], other[m]) for m in MODS)
    stack = torch.stack([kept[m] for m in MODS], 1)
    assert bool(stack.any(1).all())                        # every item keeps some content
    assert not bool(kept["image"][: n // 2].any())         # never invents a modality
    rate = 1 - float(kept["audio"][n // 2:].float().mean())
    assert 0.2 < rate < 0.3                                # p, less the all-dropped rows given back (p^3)
    torch.manual_seed(5)
    a = drop_modalities(masks, 0.3)
    torch.manual_seed(5)
    b = drop_modalities(masks, 0.3)                        # the global generator: torch.manual_seed
    assert all(torch.equal(a[m], b[m]) for m in MODS)
    assert drop_modalities(masks, 0.0) is masks


@pytest.mark.parametrize("fusion", ["sum", "attention"])
def test_encoder_dropout_only_in_training_and_deterministic(fusion):
    enc, plain = _encoder(fusion, p=0.5), _encoder(fusion, p=0.0)
    plain.load_state_dict(enc.state_dict())
    enc.eval(), plain.eval()
    torch.testing.assert_close(enc(), plain())             # off in evaluation
    enc.train()
    torch.manual_seed(3)
    a = enc()
    torch.manual_seed(3)
    b = enc()
    torch.testing.assert_close(a, b)                       # same seed, same drop
    assert not torch.allclose(a, plain())
    rows = torch.tensor([3, 5, 7])
    torch.manual_seed(4)
    parts = enc.encode_rows(rows, fuse=False)
    assert all(torch.isfinite(p).all() for p in parts.values())


def test_inverted_scaling_for_sums_and_none_for_softmax_fusions():
    # sum without a filtration: kept parts scaled by |present| / |kept|; attention renormalises itself
    for fusion, rescaled in (("sum", True), ("attention", False)):
        enc = _encoder(fusion, filtration=None, p=0.5)
        feats, masks = enc.source()
        torch.manual_seed(0)
        parts, kept = enc._project(feats, masks, None)
        torch.manual_seed(0)
        assert all(torch.equal(kept[m], k) for m, k in drop_modalities(masks, 0.5).items())
        n_present = sum(masks[m].float() for m in MODS)
        n_kept = sum(kept[m].float() for m in MODS).clamp_min(1)
        factor = n_present / n_kept if rescaled else torch.ones_like(n_present)
        for m in MODS:
            expected = enc.proj[m](feats[m]) * factor.unsqueeze(1) * kept[m].unsqueeze(1)
            torch.testing.assert_close(parts[m], expected)


# -- every content model takes them ----------------------------------------------------------

N_USERS, N_ITEMS = 30, 40


@pytest.fixture(scope="module")
def data() -> Dataset:
    """30 users x 40 items, the last 4 cold; every 5th item lacks an image (NaN placeholder)."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(N_USERS):
        chosen = rng.choice(N_ITEMS - 4, size=int(rng.integers(3, 8)), replace=False)
        users += [u] * len(chosen)
        items += [int(i) for i in chosen]
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(N_ITEMS, 6, generator=g), torch.randn(N_ITEMS, 5, generator=g)
    image_mask = torch.ones(N_ITEMS, dtype=torch.bool)
    image_mask[::5] = False
    image[~image_mask] = float("nan")
    features = {"image": FeatureTable(image, image_mask),
                "text": FeatureTable(text, torch.ones(N_ITEMS, dtype=torch.bool))}
    return Dataset("mm-tiny", ["buy"], "buy", np.array([f"u{u}" for u in range(N_USERS)], dtype=object),
                   np.array([f"i{i}" for i in range(N_ITEMS)], dtype=object),
                   Interactions(np.array(users), np.array(items), np.zeros(len(users), dtype=np.int64)),
                   items=ItemContent(features=features))


MODELS = {
    "vbpr": {"dim": 8, "content_dim": 6},   # no ID in the gate: the sizes may differ
    "freedom": {"dim": 8, "knn_k": 4, "fusion": "sum"},
    "lightgcn": {"dim": 8, "use_features": True, "fusion": "attention"},
    "lightgcn-mb": {"dim": 8, "use_features": True, "fusion": "gated"},
    "cigf": {"dim": 8, "use_features": True, "fusion": "concat"},
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_content_models_train_with_the_gate_and_dropout(name, data):
    torch.manual_seed(0)
    model = create_model(name, data, {**MODELS[name], "filtration": "modality-gate", "modality_dropout": 0.3})
    gate = model.content.filtration
    assert isinstance(gate, ModalityGate) and model.content.modality_dropout == 0.3
    model.train()
    batch = next(iter(model.training_batches(data, 64, np.random.default_rng(0))))
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and gate.logits.grad is not None and bool(gate.logits.grad.ne(0).any())
    report = model.content.modality_weights()
    assert set(report) == {"image", "text"} and report["image"]["n_items"] == 32
    assert report["image"]["mean"] == pytest.approx(0.5)   # untrained: equal shares where both are present


def test_lattice_and_micro_reject_a_scale_only_gate_but_take_dropout(data):
    for name in ("lattice", "micro"):
        with pytest.raises(ConfigError, match="cosine"):
            create_model(name, data, {"dim": 8, "feat_dim": 8, "knn_k": 4, "filtration": "modality-gate"})
    torch.manual_seed(0)
    model = create_model("micro", data, {"dim": 8, "feat_dim": 8, "knn_k": 4, "modality_dropout": 0.3})
    model.train()
    loss = model.loss(next(iter(model.training_batches(data, 64, np.random.default_rng(0)))))
    assert torch.isfinite(loss) and model.content.modality_dropout == 0.3
    assert model.content.modality_weights() is None        # no weighting: nothing to report


def test_defaults_unchanged(data):
    torch.manual_seed(0)
    model = create_model("vbpr", data, {"dim": 8, "content_dim": 8})
    assert model.content.modality_dropout == 0.0 and model.content.filtration is None


def test_vbpr_gate_weighs_the_content_bias_too(data):
    torch.manual_seed(0)
    model = create_model("vbpr", data, {"dim": 8, "content_dim": 8, "filtration": "modality-gate"})
    assert model.gated_bias and model.feature_bias is None and model.content.dim == 9   # E gets β' as a row
    model.eval()
    users, items = model.representations()
    assert users.shape[1] == items.shape[1] == 8 + 8 + 2 and bool(users[:, -2:].eq(1).all())
    assert model.item_embeddings().shape == (N_ITEMS, 16)
    with torch.no_grad():
        model.content.filtration.logits.copy_(torch.tensor([-1e4, 0.0]))   # image off
        model._clear_cache()
        before = model.score_all(torch.arange(N_USERS))
        model.content.source.feat_image.mul_(-3.0).add_(1.0)               # change every image feature
        model.content.source.__dict__.pop("_rms_factors", None)
        model._clear_cache()
        after = model.score_all(torch.arange(N_USERS))
    torch.testing.assert_close(before, after)       # a switched-off modality adds nothing, bias included
    plain = create_model("vbpr", data, {"dim": 8, "content_dim": 8, "filtration": "modality-gate",
                                        "content_bias": False})
    assert not plain.gated_bias and plain.content.dim == 8 and plain.feature_bias is None


def test_vbpr_gate_holdout_trains_only_the_weights_on_simulated_cold_items(data):
    args = {"dim": 8, "content_dim": 8, "filtration": "modality-gate", "gate_holdout": 0.25}
    torch.manual_seed(0)
    model = create_model("vbpr", data, args)
    torch.manual_seed(0)
    again = create_model("vbpr", data, args)
    held = model.holdout
    assert torch.equal(held, again.holdout)                        # seeded
    warm = torch.zeros(N_ITEMS, dtype=torch.bool)
    warm[: N_ITEMS - 4] = True
    assert int(held.sum()) == 9 and not bool(held[~warm].any())   # 25% of the 36 warm items
    assert bool(model.id_mask().squeeze(1)[held].eq(0).all())     # scored as cold items
    assert torch.equal(model.state_dict()["holdout"], held)        # saved: a re-evaluation scores the same
    torch.manual_seed(1)
    other = create_model("vbpr", data, args)
    assert not torch.equal(other.holdout, held)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.holdout, held) and torch.equal(other.id_mask(), model.id_mask())
    assert "holdout" not in create_model("vbpr", data, {"dim": 8, "content_dim": 8}).state_dict()
    gate = model.content.filtration
    users = torch.arange(6)
    model.train()

    def grads(pos, neg):
        model.zero_grad()
        model.loss({"user": users, "pos": pos, "neg": neg}).backward()
        proj = sum(float(p.grad.abs().sum()) for p in model.content.proj.parameters() if p.grad is not None)
        logits = float(gate.logits.grad.abs().sum()) if gate.logits.grad is not None else 0.0
        return proj, logits

    free = (warm & ~held).nonzero().squeeze(1)
    hidden = held.nonzero().squeeze(1)
    proj, logits = grads(free[:6], free[6:12])        # ordinary pairs: no signal to the weights
    assert proj > 0 and logits == 0
    proj, logits = grads(hidden[:6], free[:6])        # held-out positives: the weights only
    assert proj == 0 and logits > 0
    with pytest.raises(ConfigError, match="gate_holdout"):
        create_model("vbpr", data, {"dim": 8, "content_dim": 8, "gate_holdout": 0.1})
    with pytest.raises(ConfigError, match="gate_holdout"):
        create_model("vbpr", data, {"dim": 8, "content_dim": 8, "filtration": "modality-gate", "gate_holdout": 1.0})


# -- metrics.json ----------------------------------------------------------------------------

def _config(tmp_path: Path, filtration: str | None):
    from mmrec.train.config import build_run_config

    sets = ["train.progress=false", "train.eval_every=1", "model.dim=16", "model.content_dim=16"]
    return build_run_config(None, {"model": "vbpr", "data": "synthetic:tiny", "out": str(tmp_path / str(filtration)),
                                   "filtration": filtration, "epochs": 2, "protocol": "full"}, sets)


def test_metrics_json_reports_the_learned_weights(tmp_path: Path):
    from mmrec.train.run import train

    metrics = train(_config(tmp_path, "modality-gate"))
    on_disk = json.loads((tmp_path / "modality-gate" / "metrics.json").read_text())
    weights = on_disk["modality_weights"]
    assert weights == metrics["modality_weights"] and set(weights) == {"audio", "image", "text"}
    for w in weights.values():
        assert 0 < w["mean"] < 1 and w["std"] >= 0 and w["n_items"] == 200
    assert sum(w["all_present"] for w in weights.values()) == pytest.approx(1.0)
    assert "modality_weights" not in train(_config(tmp_path, None))


# -- the synthetic world: a modality of pure noise -------------------------------------------
# synthetic:tiny whose audio features are Gaussian noise for every item (noisy_share=1,
# set through RunConfig.data_args as `mmrec train` does); VBPR with the gate on image +
# text and on image + text + audio, random split, seeds 0-2: six runs of about 1 s.
# Ten seeds, the controls and synthetic:small's cold split: docs/models/fusion.md.

SEEDS = (0, 1, 2)
WORLD = {"noisy_modality": "audio", "noisy_share": 1.0}


def _train_vbpr(seed: int, features: list[str], out: Path) -> dict:
    from mmrec.train.config import RunConfig, TrainSection
    from mmrec.train.run import make_evaluator, model_args, prepare_data
    from mmrec.train.trainer import Trainer

    cfg = RunConfig(model="vbpr", seed=seed, out=str(out), split="random", protocol="full", data_args=dict(WORLD),
                    filtration="modality-gate", model_args={"features": features, "dim": 32, "content_dim": 32},
                    train=TrainSection(epochs=30, lr=0.01, batch_size=128, eval_every=5, patience=3, progress=False))
    torch.manual_seed(seed)
    data = prepare_data(cfg)
    model = create_model(cfg.model, data, model_args(cfg))
    evaluator = make_evaluator(cfg)
    Trainer(cfg, out, evaluator).fit(model, data)
    return {"recall": evaluator(model, data, "test")["Recall@20"],
            "weights": {m: w["mean"] for m, w in model.content.modality_weights().items()}}


@pytest.fixture(scope="module")
def noise_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("noise")
    return {(s, len(f)): _train_vbpr(s, f, root / f"{s}-{len(f)}")
            for s in SEEDS for f in (["image", "text"], ["audio", "image", "text"])}


def test_pure_noise_gets_the_smallest_weight(noise_runs: dict):
    # measured (seeds 0-9): .27 against .32 / .41, lowest in 7 of 10 seeds; seeds 0-2 (the
    # runs here) .28 against .31 / .41. Equal shares at the start: the gate learned it.
    mean = {m: float(np.mean([noise_runs[(s, 3)]["weights"][m] for s in SEEDS])) for m in MODS}
    assert mean["audio"] < min(mean["image"], mean["text"]), mean
    assert mean["audio"] < 1 / 3 - 0.03, mean
    clean = {m: float(np.mean([noise_runs[(s, 2)]["weights"][m] for s in SEEDS])) for m in ("image", "text")}
    assert clean["text"] > clean["image"], clean           # text shows every attribute in this world


def test_adding_the_noise_costs_little_recall(noise_runs: dict):
    # measured (seeds 0-9): 0.383 on image + text, 0.369 with the noise added; seeds 0-2:
    # 0.422 and 0.413
    clean = np.mean([noise_runs[(s, 2)]["recall"] for s in SEEDS])
    noisy = np.mean([noise_runs[(s, 3)]["recall"] for s in SEEDS])
    assert noisy >= clean - 0.03, (clean, noisy)
