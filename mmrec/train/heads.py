"""``mmrec train --head H``: build a :class:`~mmrec.heads.model.HeadModel` and evaluate it.

Kept apart from :mod:`mmrec.train.run` so the ranking path does not change for models
without a head: ``run.build_model`` and ``run.make_evaluator`` dispatch here when the
run has a head.

Metrics (written under the ``metrics.json`` contract names), on the valid / test
exposures of :mod:`mmrec.heads.tasks`:

- ``<task>/AUC``, ``<task>/GAUC`` (per-user AUC weighted by impressions), ``<task>/LogLoss``;
- ``AUC``, ``GAUC``, ``LogLoss``: the mean over tasks (``AUC`` selects on valid);
- with more than one scenario: ``scenario=<name>/<task>/AUC`` and ``scenario=<name>/AUC``
  (the mean over that scenario's tasks). A metric whose labels are all of one class in a
  part (e.g. no conversion in a small scenario) is left out rather than reported as 0.5.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrec.config import from_dict
from mmrec.datasets.schema import Dataset
from mmrec.errors import MMRecError
from mmrec.eval.metrics import auc, binary_metrics
from mmrec.heads.model import (HeadModel, HeadModelConfig, backbone_representations, check_head_config,
                               split_head_args)
from mmrec.heads.tasks import derive_tasks
from mmrec.models.base import Recommender
from mmrec.train.config import RunConfig

BACKBONE_DIR = "backbone"


def head_config(cfg: RunConfig) -> tuple[HeadModelConfig, dict[str, Any]]:
    """(the run's :class:`HeadModelConfig`, the head's own config) from ``head_args``."""
    own, head_cfg = split_head_args(dict(cfg.head_args))
    own["mode"] = cfg.mode
    return from_dict(HeadModelConfig, own, path="head_args"), head_cfg


def user_side_features(data: Dataset, columns: list[str]) -> torch.Tensor | None:
    """One-hot users.tsv columns (``age`` in bands) as a [n_users, F] float tensor."""
    if not columns:
        return None
    from mmrec.datasets.users import read_users
    from mmrec.heads.tasks import user_column
    table = read_users(data.root, list(data.user_ids))
    blocks = []
    for col in columns:
        ids, names = user_column(table, col)  # a bad value: DataError at its users.tsv line
        blocks.append(np.eye(len(names), dtype=np.float32)[ids])
    return torch.from_numpy(np.concatenate(blocks, axis=1))


def build_head_model(cfg: RunConfig, data: Dataset, device: torch.device, train_backbone: bool = True) -> HeadModel:
    """Backbone (trained first in two-step mode, or loaded from ``backbone_run``) + head.

    ``train_backbone=False`` (``mmrec evaluate``): the backbone's weights come with the run's.
    """
    from mmrec.models.base import create_model
    from mmrec.train.run import make_evaluator, model_args

    hc, head_cfg = head_config(cfg)
    table = derive_tasks(data, hc, seed=cfg.seed)
    check_head_config(cfg.head, head_cfg, table.tasks)   # before any training
    for part in ("train", "valid"):
        if len(table.rows(part)) == 0:
            raise MMRecError(f"no {part} exposures for the head (rule '{table.rule}'); check the split")
    data.report["head_exposures"] = table.summary()
    backbone = create_model(cfg.model, data, model_args(cfg)).to(device)
    if not callable(getattr(backbone, "representations", None)):   # before spending time on its training
        backbone_representations(backbone)
    if hc.mode == "two-step" and train_backbone:
        if hc.backbone_run:
            from mmrec.train.checkpoint import load_weights
            backbone.fit(data)
            load_weights(backbone, Path(hc.backbone_run))
        else:
            from mmrec.train.trainer import Trainer
            bcfg = copy.deepcopy(cfg)
            bcfg.head, bcfg.head_args = None, {}
            if hc.backbone_epochs is not None:
                bcfg.train.epochs = int(hc.backbone_epochs)
            if bcfg.train.select in ("AUC", "GAUC", "LogLoss") or (bcfg.train.select or "").count("/"):
                bcfg.train.select = None   # the backbone selects on its ranking metric
            Trainer(bcfg, Path(cfg.out) / BACKBONE_DIR, make_evaluator(bcfg)).fit(backbone, data)
    side = user_side_features(data, hc.user_features)
    model = HeadModel.build(backbone, table, cfg.head, hc, head_cfg, side)
    return model.to(device)


def evaluate_head(model: HeadModel, split: str, batch_size: int = 8192) -> dict[str, float]:
    """Per-task and per-scenario AUC / GAUC / LogLoss on the ``split`` exposures."""
    t = model.table
    rows = t.rows(split)
    if len(rows) == 0:
        raise MMRecError(f"no {split} exposures to evaluate the head on")
    model.eval()
    model.prepare_eval()
    probs = model.predict(rows, batch_size)
    labels, users, scen = t.labels[rows], t.user[rows], t.scenario[rows]
    out: dict[str, float] = {}
    means: dict[str, list[float]] = {"AUC": [], "GAUC": [], "LogLoss": []}
    for k, task in enumerate(t.tasks):
        y = labels[:, k]
        if y.min() == y.max():
            continue
        try:
            m = binary_metrics(y, probs[:, k], users)
        except ValueError:   # GAUC undefined: no user with both classes
            m = binary_metrics(y, probs[:, k])
        for name, v in m.items():
            out[f"{task}/{name}"] = v
            means[name].append(v)
    if not means["AUC"]:
        raise MMRecError(f"every task's {split} labels are of one class; AUC is undefined "
                         f"(tasks {', '.join(t.tasks)}, {len(rows)} exposures)")
    out.update({name: float(np.mean(v)) for name, v in means.items() if v})
    if len(t.scenarios) > 1:
        for s, sname in enumerate(t.scenarios):
            sel = scen == s
            vals = []
            for k, task in enumerate(t.tasks):
                y = labels[sel, k]
                if len(y) and y.min() != y.max():
                    v = auc(y, probs[sel, k])
                    out[f"scenario={sname}/{task}/AUC"] = v
                    vals.append(v)
            if vals:
                out[f"scenario={sname}/AUC"] = float(np.mean(vals))
    return out


def is_head_model(model: Recommender) -> bool:
    return isinstance(model, HeadModel)


__all__ = ["build_head_model", "evaluate_head", "head_config", "is_head_model", "BACKBONE_DIR"]
