"""Feature enhancement after the fusion (issue 13, item 4): ``mdr`` (shared / specific split) and
``ghmfc`` (cross-modal contrastive training), selectable by name; docs/models/fusion.md.

Plain-module checks on random tensors (gradients, aligned vs shuffled pairs, the shared parts
drawn together by training, missing modalities), the encoder's bookkeeping of the step's
items, the models the loss reaches and those that refuse it, and short ``mmrec train`` runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mmrec.datasets.schema import FeatureTable
from mmrec.errors import ConfigError, MMRecError
from mmrec.fusion.content import FrozenFeatures, ItemContentEncoder, import_all_fusions
from mmrec.fusion.enhancement import (ContrastiveEnhancement, DisentangledEnhancement, decorrelation,
                                      masked_mean)
from mmrec.models.base import create_model
from mmrec.registry import ENHANCEMENTS

from tests.conftest import MODALITIES, modality_masks, modality_parts, random_content_encoder

DIM = 8
ENHANCEMENTS_UNDER_TEST = ("mdr", "ghmfc")


def _encoder(enhancement: str | None, n: int = 24, seed: int = 0, fusion: str = "sum",
             enhance_items: int = 512) -> ItemContentEncoder:
    """Three modalities of random features; item 0 has nothing, 1 only text, 2 lacks image."""
    return random_content_encoder(n, seed, 6, DIM, fusion=fusion, enhancement=enhancement,
                                  enhance_items=enhance_items)


@pytest.fixture(scope="module")
def tiny():
    from mmrec.datasets.loading import load_dataset
    return load_dataset("synthetic:tiny", None, seed=0)


# -- registry and configuration --------------------------------------------------------------

def test_registered_and_unknown_names_fail_with_the_choices(tiny):
    import_all_fusions()
    assert {"mdr", "ghmfc"} <= set(ENHANCEMENTS.names())
    assert ENHANCEMENTS.get("mdr") is DisentangledEnhancement and ENHANCEMENTS.get("GHMFC") is ContrastiveEnhancement
    with pytest.raises(ConfigError, match=r"unknown enhancement 'mdrr'; did you mean 'mdr'\?.*known: ghmfc, mdr"):
        _encoder("mdrr")
    with pytest.raises(ConfigError, match="unknown enhancement 'ghmf'.*known: ghmfc, mdr"):
        create_model("vbpr", tiny, {"dim": 8, "content_dim": 8, "enhancement": "ghmf"})


def test_bad_settings_are_refused():
    one = {"image": FeatureTable(torch.randn(6, 3), torch.ones(6, dtype=torch.bool))}
    for name in ENHANCEMENTS_UNDER_TEST:
        with pytest.raises(ConfigError, match="at least 2"):
            ItemContentEncoder(FrozenFeatures(one, norm="none"), DIM, enhancement=name)
        with pytest.raises(ConfigError, match="enhance_temperature"):
            ENHANCEMENTS.get(name)(MODALITIES, DIM, temperature=0.0)
    with pytest.raises(ConfigError, match="enhance_items"):
        _encoder("mdr", enhance_items=1)


def test_models_that_cannot_apply_it_refuse(tiny):
    for name in ("lattice", "micro"):   # they fuse the modality embeddings themselves
        with pytest.raises(ConfigError, match="fuses its modalities itself"):
            create_model(name, tiny, {"dim": 8, "feat_dim": 8, "knn_k": 4, "enhancement": "mdr"})
    with pytest.raises(ConfigError, match="use_features=true"):
        create_model("lightgcn", tiny, {"dim": 8, "enhancement": "ghmfc"})
    with pytest.raises(ConfigError, match="enhance_weight"):
        create_model("vbpr", tiny, {"dim": 8, "content_dim": 8, "enhancement": "mdr", "enhance_weight": -1.0})
    nova = create_model("nova", tiny, {"dim": 8, "enhancement": "ghmfc"})   # reads the parts, not the fusion
    nova.train()
    with pytest.raises(ConfigError, match="fuses the modality embeddings itself"):
        nova.loss(next(iter(nova.training_batches(tiny, 16, np.random.default_rng(0)))))


# -- the modules ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ENHANCEMENTS_UNDER_TEST)
def test_gradient_reaches_every_new_parameter_and_the_projections(name):
    enc = _encoder(name)
    enc.train()
    rows = torch.arange(3, 20)
    out = enc.encode_rows(rows)
    rec = out.pow(2).sum()                   # stands for the recommendation loss on the fused vector
    loss = enc.enhancement_loss()
    assert loss is not None and torch.isfinite(loss) and float(loss.detach()) > 0
    (rec + loss).backward()
    params = dict(enc.enhancement.named_parameters())
    assert bool(params) == (name == "mdr")   # ghmfc is a loss only
    for pname, p in params.items():
        assert p.grad is not None and bool(p.grad.ne(0).any()), pname
    enc.zero_grad()
    enc.encode_rows(rows)
    enc.enhancement_loss().backward()        # the enhancement loss alone reaches every projection
    for m, lin in enc.proj.items():
        assert lin.weight.grad is not None and bool(lin.weight.grad.ne(0).any()), m


def test_ghmfc_loss_is_lower_for_aligned_than_for_shuffled_pairs():
    g = torch.Generator().manual_seed(0)
    n = 32
    base = torch.randn(n, DIM, generator=g)
    aligned = {m: base + 0.3 * torch.randn(n, DIM, generator=g) for m in MODALITIES}
    perm = torch.randperm(n, generator=g)
    shuffled = dict(aligned, text=aligned["text"][perm])
    masks = {m: torch.ones(n, dtype=torch.bool) for m in MODALITIES}
    module = ContrastiveEnhancement(MODALITIES, DIM, temperature=0.2)
    good, bad = module.loss(aligned, masks), module.loss(shuffled, masks)
    assert float(good) < float(bad) - 1.0
    # the two directions of one pair: text->image and image->text (cross-entropy over rows and columns)
    two = ContrastiveEnhancement(["image", "text"], DIM, temperature=0.5)
    a, b = F.normalize(aligned["image"], dim=1), F.normalize(aligned["text"], dim=1)
    logits = a @ b.T / 0.5
    labels = torch.arange(n)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(two.loss({"image": aligned["image"], "text": aligned["text"]},
                                        {"image": masks["image"], "text": masks["text"]}), expected)


def _shared_agreement(module: DisentangledEnhancement, parts, masks) -> float:
    """Mean cosine between the shared parts of the same item over every pair of modalities it has."""
    with torch.no_grad():
        shared, _ = module.split(parts)
        sims = []
        for i, a in enumerate(MODALITIES):
            for b in MODALITIES[i + 1:]:
                both = masks[a] & masks[b]
                sims.append(F.cosine_similarity(shared[a][both], shared[b][both], dim=1))
        return float(torch.cat(sims).mean())


def test_mdr_training_draws_the_shared_parts_of_an_item_together():
    torch.manual_seed(0)
    n = 48
    parts, masks = modality_parts(n, seed=1, dim=DIM), modality_masks(n)
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(n, DIM, generator=g)
    parts = {m: parts[m] + 2.0 * latent @ torch.randn(DIM, DIM, generator=g) for m in MODALITIES}  # common content
    module = DisentangledEnhancement(MODALITIES, DIM, temperature=0.2)
    before_loss = float(module.loss(parts, masks).detach())
    before = _shared_agreement(module, parts, masks)
    opt = torch.optim.Adam(module.parameters(), lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        module.loss(parts, masks).backward()
        opt.step()
    after = _shared_agreement(module, parts, masks)
    assert after > before + 0.5 and after > 0.6, (before, after)
    assert float(module.loss(parts, masks).detach()) < before_loss / 2
    with torch.no_grad():   # the specific parts stay a real part of the split (reconstruction)
        _, specific = module.split(parts)
        for m in MODALITIES:
            rel = specific[m][masks[m]].norm(dim=1) / parts[m][masks[m]].norm(dim=1)
            assert float(rel.mean()) > 0.3, m


def test_decorrelation_is_bounded_and_ignores_scale():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, DIM, generator=g)
    same = decorrelation(a, a)
    indep = decorrelation(a, torch.randn(200, DIM, generator=g))
    assert 0 <= float(indep) < 0.05 < float(same) <= 1.0
    torch.testing.assert_close(decorrelation(a, 1e-3 * a), same)   # shrinking a view does not satisfy it


@pytest.mark.parametrize("name", ENHANCEMENTS_UNDER_TEST)
def test_an_item_lacking_a_modality_drops_out(name):
    n = 12
    parts, masks = modality_parts(n, seed=0, dim=DIM), modality_masks(n)
    module = ENHANCEMENTS.get(name)(MODALITIES, DIM)
    if name == "mdr":
        torch.nn.init.normal_(module.out.weight)    # so the forward reads the parts
    poisoned = {m: torch.where(masks[m].unsqueeze(1), parts[m], torch.full_like(parts[m], float("nan")))
                for m in MODALITIES}
    zeroed = {m: torch.where(masks[m].unsqueeze(1), parts[m], torch.zeros_like(parts[m])) for m in MODALITIES}
    fused = torch.randn(n, DIM)
    loss = module.loss(poisoned, masks)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, module.loss(zeroed, masks))
    out = module(fused, poisoned, masks)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, module(fused, zeroed, masks))
    # item 0 has no modality: untouched; no two items share a pair: a zero loss, no NaN
    torch.testing.assert_close(out[0], fused[0])
    lonely = {m: torch.zeros(n, dtype=torch.bool) for m in MODALITIES}
    lonely["text"][:] = True
    alone = module.loss({m: parts[m] if m == "text" else torch.full_like(parts[m], float("nan"))
                         for m in MODALITIES}, lonely)
    assert torch.isfinite(alone)
    if name == "ghmfc":
        assert float(alone) == 0.0
    # through the encoder: rows with missing modalities, finite loss and gradients
    enc = _encoder(name)
    enc.train()
    enc.encode_rows(torch.arange(0, 8))
    term = enc.enhancement_loss()
    term.backward()
    assert torch.isfinite(term) and all(bool(torch.isfinite(p.grad).all()) for p in enc.parameters()
                                        if p.grad is not None)


def test_masked_mean_averages_present_modalities_only():
    views = {"image": torch.tensor([[2.0], [4.0]]), "text": torch.tensor([[6.0], [float("nan")]])}
    masks = {"image": torch.tensor([True, True]), "text": torch.tensor([True, False])}
    torch.testing.assert_close(masked_mean(views, masks), torch.tensor([[4.0], [4.0]]))


def test_untrained_mdr_leaves_the_fusion_output_and_ghmfc_never_changes_it():
    for fusion in ("sum", "attention"):
        plain, mdr, ghmfc = _encoder(None, fusion=fusion), _encoder("mdr", fusion=fusion), \
            _encoder("ghmfc", fusion=fusion)
        with torch.no_grad():
            for enc in (mdr, ghmfc):
                enc.proj.load_state_dict(plain.proj.state_dict())
                enc.fusion.load_state_dict(plain.fusion.state_dict())
            torch.testing.assert_close(mdr(), plain())
            torch.testing.assert_close(ghmfc(), plain())
            torch.nn.init.normal_(mdr.enhancement.out.weight)
            assert not torch.allclose(mdr(), plain())
            torch.testing.assert_close(mdr.encode_rows(torch.arange(5, 9)), mdr()[5:9])   # cold items included


# -- the encoder's bookkeeping -----------------------------------------------------------------

def test_the_loss_covers_the_steps_items_not_the_catalogue():
    enc = _encoder("ghmfc", n=40)
    enc.train()
    active = torch.tensor([3, 5, 5, 9, 11, 17, 30])
    enc.set_active(active)
    enc()                                         # catalogue-wide forward (graph models)
    got = enc.enhancement_loss()
    parts, masks = enc._modality_embeddings()
    rows = torch.unique(active)
    want = enc.enhancement.loss({m: p[rows] for m, p in parts.items()}, {m: k[rows] for m, k in masks.items()})
    torch.testing.assert_close(got, want)
    assert enc.enhancement_loss() is None         # released: one term per step
    enc.eval()
    enc()
    assert enc.enhancement_loss() is None         # evaluation keeps nothing
    enc.train()
    with torch.no_grad():
        enc.encode_rows(rows)
    assert enc.enhancement_loss() is None         # nothing to train without a graph


def test_at_most_enhance_items_and_same_seed_same_loss():
    def run(seed: int) -> float:
        enc = _encoder("mdr", n=40, enhance_items=6)
        enc.train()
        torch.manual_seed(seed)
        enc.encode_rows(torch.arange(3, 40))
        return float(enc.enhancement_loss())

    assert run(0) == run(0)
    assert run(0) != run(1)                       # a different subset of the 37 rows
    enc = _encoder("mdr", n=40, enhance_items=6)
    enc.train()
    rows = torch.arange(3, 40)
    torch.manual_seed(0)
    parts = enc.encode_rows(rows, fuse=False)
    got = enc.enhancement_loss()
    torch.manual_seed(0)
    pick = torch.randperm(len(rows))[:6]
    masks = {m: k[rows][pick] for m, k in enc.source.masks().items()}
    torch.testing.assert_close(got, enc.enhancement.loss({m: p[pick] for m, p in parts.items()}, masks))


# -- the models the loss reaches -----------------------------------------------------------------

MODELS = {
    "vbpr": {"dim": 8, "content_dim": 8},
    "freedom": {"dim": 8, "knn_k": 4},                      # fusion None: one BPR term per modality
    "lightgcn": {"dim": 8, "use_features": True, "fusion": "attention"},
    "cigf": {"dim": 8, "use_features": True},
}


@pytest.mark.parametrize("enhancement", ENHANCEMENTS_UNDER_TEST)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_auxiliary_loss_carries_the_term_to_the_models(name, enhancement, tiny):
    args = {**MODELS[name], "enhancement": enhancement, "enhance_weight": 0.5}

    def step(seed: int = 0):
        torch.manual_seed(seed)
        model = create_model(name, tiny, args)
        model.train()
        batch = next(iter(model.training_batches(tiny, 64, np.random.default_rng(0))))
        model.on_batch(batch)
        loss = model.loss(batch)
        aux = model.auxiliary_loss()
        return model, loss, aux

    model, loss, aux = step()
    assert model.content.enhancement_name == enhancement and aux is not None and torch.isfinite(aux)
    assert float(aux) > 0
    model.zero_grad()
    aux.backward()
    assert any(p.grad is not None and bool(p.grad.ne(0).any()) for p in model.content.proj.parameters())
    assert model.auxiliary_loss() is None                      # one term per step
    _, loss2, aux2 = step()
    assert float(loss2) == float(loss) and float(aux2) == float(aux)   # same seed, same numbers
    torch.manual_seed(0)
    without = create_model(name, tiny, MODELS[name])
    without.train()
    batch = next(iter(without.training_batches(tiny, 64, np.random.default_rng(0))))
    without.on_batch(batch)
    without.loss(batch)
    assert without.auxiliary_loss() is None                    # default: no enhancement, no term


# -- mmrec train ---------------------------------------------------------------------------------

def _config(tmp_path: Path, model: str, enhancement: str | None = None, sets: tuple[str, ...] = ()):
    from mmrec.train.config import build_run_config

    base = ["train.progress=false", "model.dim=16"] + (["model.content_dim=16"] if model == "vbpr" else []) \
        + (["model.layers=1"] if model == "lightgcn" else [])
    return build_run_config(None, {"model": model, "data": "synthetic:tiny", "epochs": 2, "protocol": "full",
                                   "out": str(tmp_path / f"{model}-{enhancement}"), "enhancement": enhancement},
                            base + list(sets))


@pytest.mark.parametrize("enhancement", ENHANCEMENTS_UNDER_TEST)
@pytest.mark.parametrize("model", ["vbpr", "lightgcn"])
def test_train_runs_with_each_enhancement(tmp_path: Path, model: str, enhancement: str):
    from mmrec.train.run import train

    cfg = _config(tmp_path, model, enhancement)
    assert cfg.enhancement == enhancement
    metrics = train(cfg)
    on_disk = json.loads((Path(cfg.out) / "metrics.json").read_text())
    assert on_disk["model"] == model and on_disk["epochs"] == 2
    assert all(np.isfinite(v) for v in on_disk["metrics"].values()) and on_disk["metrics"] == metrics["metrics"]
    saved = (Path(cfg.out) / "config.yaml").read_text()
    assert f"enhancement: {enhancement}" in saved               # evaluate / recommend rebuild the same model


def test_cli_flag_and_set_override(tmp_path: Path, capsys):
    from mmrec.cli import build_parser, main
    from mmrec.train.run import train

    args = build_parser().parse_args(["train", "--model", "vbpr", "--enhancement", "ghmfc"])
    assert args.enhancement == "ghmfc"
    out = tmp_path / "cli"
    rc = main(["train", "--data", "synthetic:tiny", "--model", "lightgcn", "--enhancement", "mdr", "--out", str(out),
               "--epochs", "1", "--set", "train.progress=false", "--set", "model.dim=8", "--set", "model.layers=1"])
    assert rc == 0 and (out / "metrics.json").exists()
    cfg = _config(tmp_path, "vbpr", None, ("model.enhancement=ghmfc", "model.enhance_temperature=0.5"))
    assert cfg.model_args["enhancement"] == "ghmfc" and cfg.enhancement is None
    train(cfg)
    assert (Path(cfg.out) / "metrics.json").exists()
    assert "enhancement: ghmfc" in (Path(cfg.out) / "config.yaml").read_text()
    with pytest.raises(MMRecError, match="takes no --enhancement"):
        train(_config(tmp_path, "bprmf", "mdr"))
