"""Leakage guards for every registered model (issue 17).

For each model in ``MODELS`` (tiny config, one epoch, ``synthetic:tiny``):

(a) the batches the trainer sees never hold a held-out pair as a positive: every
    positive (keys ``pos``/``item``/``items``/``target``/``seq``, and ``history``'s
    ``ev_pos``) is a training row of the user, and a positive of the target behavior
    is never a valid/test target pair;
(b) the real :class:`~mmrec.train.trainer.Trainer` asks the evaluator for the
    ``valid`` split only (selection never reads test);
(c) after fit, the full-ranking evaluator's top-K lists for the test split never hold
    one of the user's training (or validation) target positives.

synthetic:tiny has timestamps (sasrec, nova), view/cart/buy (history, mbgmn, cigf,
lightgcn-mb) and image/text features (vbpr, lattice, micro, freedom). Every user's
test buy is also one of their training views there, so a multi-behavior model that
trains on views legitimately sees those pairs as *view* positives; the check then
keys on the batch's ``behavior`` when it has one, and on the train matrix the model
trains on otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.eval import protocols
from mmrec.models.base import create_model, import_all_models, model_config
from mmrec.registry import MODELS
from mmrec.train.config import RunConfig, TrainSection
from mmrec.train.run import make_evaluator, model_args, prepare_data
from mmrec.train.trainer import Trainer
from tests.conftest import capture_top_lists

import_all_models()
NAMES = MODELS.names()
POS_KEYS = ("pos", "item", "items", "target", "seq", "ev_pos")
SEQUENCE_MODELS = {"sasrec", "nova"}  # item ids shifted by one, 0 = padding
# models whose BPR batches (without a ``behavior`` key) merge every behavior: lightgcn-mb,
# and history's default backbone (lightgcn-mb); history's own ``ev_pos`` are target pairs
MERGED_BEHAVIORS = {"lightgcn-mb", "history"}


def _cfg(name: str, out: Path) -> RunConfig:
    fields = {f.name for f in dataclasses.fields(model_config(name, {}))}
    small = {k: v for k, v in {"dim": 8, "max_len": 20, "n_layers": 1}.items() if k in fields}
    return RunConfig(model=name, data="synthetic:tiny", out=str(out), seed=0, model_args=small,
                     train=TrainSection(epochs=1, batch_size=512, eval_batch_size=256, progress=False,
                                        patience=5))


@pytest.fixture(scope="module")
def data():
    return prepare_data(_cfg("bprmf", Path("unused")))


def _pairs(data, split: str, target_only: bool = True) -> set[tuple[int, int]]:
    rows = data.split_rows(split)
    sel = rows.behavior == data.target_index if target_only else np.ones(len(rows.user), dtype=bool)
    return set(zip(rows.user[sel].tolist(), rows.item[sel].tolist()))


def _positives(batch: dict, sequence: bool) -> list[tuple[int, int, int | None, str]]:
    """(user, item, behavior or None, key) of every positive in one batch."""
    out = []
    for key in POS_KEYS:
        v = batch.get(key)
        if not torch.is_tensor(v):
            continue
        user = batch.get("ev_user" if key == "ev_pos" else "user")
        assert torch.is_tensor(user), f"batch key '{key}' without its users"
        items = v.reshape(len(user), -1).long()
        users = user.long().view(-1, 1).expand_as(items)
        beh = batch.get("behavior") if key != "ev_pos" else None
        behs = beh.long().view(-1, 1).expand_as(items) if torch.is_tensor(beh) else None
        keep = items > 0 if sequence else items >= 0
        items = items - 1 if sequence else items
        out += [(int(u), int(i), None if behs is None else int(b), key) for u, i, b in
                zip(users[keep].tolist(), items[keep].tolist(),
                    behs[keep].tolist() if behs is not None else [None] * int(keep.sum()))]
    return out


def _violations(name: str, seen: list[tuple[int, int, int | None, str]], data) -> list[str]:
    """Why each recorded positive breaks (a); empty when none does."""
    held = _pairs(data, "valid") | _pairs(data, "test")
    train_target, train_any = _pairs(data, "train"), _pairs(data, "train", target_only=False)
    rows = data.split_rows("train")
    train_triples = set(zip(rows.user.tolist(), rows.item.tolist(), rows.behavior.tolist()))
    bad = []
    for u, i, b, key in seen:
        if b is not None:
            if (u, i, b) not in train_triples:
                bad.append(f"{key} {(u, i, b)} is not a training row")
            elif b == data.target_index and (u, i) in held:
                bad.append(f"{key} {(u, i)} is a held-out target pair")
        elif name in MERGED_BEHAVIORS and key != "ev_pos":
            if (u, i) not in train_any:
                bad.append(f"{key} {(u, i)} is in no training behavior")
        elif (u, i) in held:
            bad.append(f"{key} {(u, i)} is a held-out target pair")
        elif (u, i) not in train_target:
            bad.append(f"{key} {(u, i)} is not a training target pair")
    return bad


def _record(model, name: str, monkeypatch, inject=None) -> list[tuple[int, int, int | None, str]]:
    """Wrap ``model.training_batches`` to record every positive (``inject`` may edit a batch first)."""
    seen: list[tuple[int, int, int | None, str]] = []
    real_batches = model.training_batches

    def recording(d, batch_size, rng):
        for batch in real_batches(d, batch_size, rng):
            if inject is not None:
                batch = inject(batch)
            seen.extend(_positives(batch, name in SEQUENCE_MODELS))
            yield batch

    monkeypatch.setattr(model, "training_batches", recording)
    return seen


def _ranked_known(model, data, evaluator, monkeypatch, **kw) -> list[tuple[int, int]]:
    """(user, item) pairs of the test split's top-K lists that are train / valid target positives."""
    top = capture_top_lists(monkeypatch, lambda: evaluator(model, data, "test", **kw)).cpu().numpy()
    users = np.unique(protocols._target_keys(data, "test") // data.n_items)
    assert len(top) == len(users) > 0
    known = (_pairs(data, "train") | _pairs(data, "valid")) - _pairs(data, "test")
    assert any(u in set(users.tolist()) for u, _ in known)  # there is something for the mask to remove
    return [(int(u), int(i)) for u, row in zip(users, top) for i in row if (int(u), int(i)) in known]


@pytest.mark.parametrize("name", NAMES)
def test_training_never_sees_heldout_selection_reads_valid_and_eval_masks_train(name, data, tmp_path, monkeypatch):
    cfg = _cfg(name, tmp_path / name)
    model = create_model(name, data, model_args(cfg))
    seen = _record(model, name, monkeypatch)  # (a)

    splits: list[str] = []  # (b) the real trainer with an evaluator spy
    evaluator = make_evaluator(cfg)

    def spy(m, d, split, **kw):
        splits.append(split)
        return evaluator(m, d, split, **kw)

    Trainer(cfg, tmp_path / name, spy).fit(model, data)

    if model.trainable:  # pop / behavior-prior are fitted in closed form: no batches to record
        assert seen, f"{name}: no positives recorded (batch keys changed?)"
    bad = _violations(name, seen, data)
    assert not bad, f"{name}: {len(bad)} leaking positives, e.g. {bad[:3]}"
    assert splits and set(splits) == {"valid"}, f"{name}: evaluator called with {splits}"

    leaked = _ranked_known(model, data, evaluator, monkeypatch)  # (c)
    assert not leaked, f"{name}: test ranked lists hold known positives, e.g. {leaked[:3]}"


# -- the checks can fail -------------------------------------------------------------

def test_a_heldout_pair_injected_into_a_batch_is_caught(data, tmp_path, monkeypatch):
    cfg = _cfg("bprmf", tmp_path)
    model = create_model("bprmf", data, model_args(cfg))
    u, i = sorted(_pairs(data, "test"))[0]

    def leak(batch):
        batch = dict(batch)
        batch["user"], batch["pos"] = batch["user"].clone(), batch["pos"].clone()
        batch["user"][0], batch["pos"][0] = u, i
        return batch

    seen = _record(model, "bprmf", monkeypatch, inject=leak)
    Trainer(cfg, tmp_path, make_evaluator(cfg)).fit(model, data)
    bad = _violations("bprmf", seen, data)
    assert bad and all(f"{(u, i)} is a held-out target pair" in b for b in bad)


def test_without_the_mask_the_ranked_lists_hold_training_positives(data, tmp_path, monkeypatch):
    cfg = _cfg("bprmf", tmp_path)
    model = create_model("bprmf", data, model_args(cfg))
    Trainer(cfg, tmp_path, make_evaluator(cfg)).fit(model, data)
    evaluator = make_evaluator(cfg)
    assert not _ranked_known(model, data, evaluator, monkeypatch)
    assert _ranked_known(model, data, evaluator, monkeypatch, mask_splits=())
