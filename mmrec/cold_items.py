"""Cold items that rank: an aligned content vector stands in for a missing ID embedding.

A recommender scored by ``⟨e_u, e_i⟩`` (LightGCN, BPR-MF, VBPR, ...) cannot rank an item that
had no training interaction: its ID row was never trained. Pre-training
(``mmrec pretrain --set behavior.run=RUN behavior.head=identity loss.regression_weight=1``)
maps each item's content *into that run's item space* — the content heads are trained, on
warm items only, to reproduce the run's item embeddings (direction by InfoNCE, size by the
regression term) — so for an item without interactions the content vector ``c_i`` can take
the ID row's place (the CLCRec / DropoutNet idea: Wei et al., MM 2021; Volkovs et al.,
NeurIPS 2017)::

    s(u, i) = ⟨e_u, e_i⟩   if i has training interactions
              ⟨e_u, c_i⟩   otherwise (and c_i exists)

The pre-training run writes ``RUN/aligned_items.safetensors`` (:data:`STANDIN_FILE`): the
table ``aligned`` (``c_i``: the unnormalised mean of the item's projected modality
embeddings) and the table ``behavior`` (the rows it was aligned to). ``--cold-items
aligned:PRETRAIN_RUN`` on ``mmrec evaluate`` / ``mmrec recommend`` attaches it to a model
(:func:`attach_cold_items`) after checking that the model's warm item embeddings *are* the
rows the content was aligned to: a vector aligned to one run means nothing in another run's
space, so any other model is refused with both names.

Content models (VBPR, FREEDOM, ...) take aligned features through ``mmrec extract --run``
instead: they learn their own map from content to score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmrec.datasets.schema import Dataset, FeatureTable
from mmrec.errors import ConfigError, DataError, MMRecError

STANDIN_FILE = "aligned_items.safetensors"
ALIGNED, BEHAVIOR = "aligned", "behavior"
#: How close the model's warm rows must be to the aligned-to rows (float32 round trips only).
MATCH_RTOL, MATCH_ATOL = 1e-4, 1e-5


def write_standins(path: str | Path, aligned: Tensor, has: Tensor, behavior: Tensor, item_ids: list[str],
                   meta: dict[str, str]) -> None:
    """``aligned`` [n, d] (rows of items without content are zero and masked) and the ``behavior``
    rows [n, d] they were aligned to, in one feature file (atomic write)."""
    from mmrec.datasets.features import write_feature_tables

    tables = {ALIGNED: FeatureTable(aligned.detach().float().cpu(), has.bool().cpu(), {}),
              BEHAVIOR: FeatureTable(behavior.detach().float().cpu(), torch.ones(len(behavior), dtype=torch.bool), {})}
    write_feature_tables(path, tables, item_ids, meta=meta)


def parse_spec(spec: str) -> Path:
    """``aligned:RUN`` (or ``aligned:FILE.safetensors``) -> the stand-in file."""
    kind, sep, where = str(spec).partition(":")
    if kind != "aligned" or not sep or not where:
        raise ConfigError(f"--cold-items must look like 'aligned:PRETRAIN_RUN', not '{spec}'")
    path = Path(where)
    if path.is_dir():
        path = path / STANDIN_FILE
    if not path.exists():
        raise MMRecError(f"--cold-items {spec}: {path} does not exist; it is written by `mmrec pretrain` runs "
                         f"with behavior.head=identity (see docs/pretraining.md, 'Cold items that rank')")
    return path


def cold_rows(data: Dataset) -> np.ndarray:
    """Items without any training interaction (of any behavior): their ID rows never trained."""
    if data.train is None:
        raise MMRecError("cold items need a split dataset (no training rows)")
    seen = np.zeros(data.n_items, dtype=bool)
    seen[np.asarray(data.train.item, dtype=np.int64)] = True
    return np.flatnonzero(~seen)


def load_standins(path: Path, data: Dataset) -> tuple[FeatureTable, FeatureTable]:
    """The file's ``aligned`` and ``behavior`` tables in the dataset's item order."""
    from mmrec.datasets.features import align_features, read_feature_tables

    tables, ids = read_feature_tables(path)
    missing = [t for t in (ALIGNED, BEHAVIOR) if t not in tables]
    if missing:
        raise DataError(f"not a cold-item stand-in file: no table(s) {missing} (has {sorted(tables)})", file=path)
    known = {str(x) for x in data.item_ids}
    if ids is None or not known & set(ids):
        raise DataError(f"its items do not match dataset '{data.name}' (no item id in common): "
                        f"aligned on other data?", file=path, field="item_ids")
    item_ids = list(map(str, data.item_ids))
    return (align_features(tables[ALIGNED], ids, item_ids, source=path, dataset=data.name),
            align_features(tables[BEHAVIOR], ids, item_ids, source=path, dataset=data.name))


def attach_cold_items(model: torch.nn.Module, data: Dataset, spec: str) -> dict[str, Any]:
    """Make ``model`` score its cold items with their aligned vectors; returns what was done.

    Refuses a model that does not score by an inner product, a file from other data, and a
    model whose warm item embeddings are not the rows the content was aligned to.
    """
    from mmrec.models.base import InnerProductScoring

    path = parse_spec(spec)
    name = type(model).__name__
    if not isinstance(model, InnerProductScoring):
        raise ConfigError(f"--cold-items: model {name} does not score by an inner product of user and item "
                          f"embeddings, so an aligned vector cannot take an item row's place")
    aligned, behavior = load_standins(path, data)
    model.set_cold_standins(None)
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        items = model.item_embeddings().detach().float().cpu()   # what RUN/item_embeddings.safetensors holds
        width = model.representations()[1].shape[1]               # what a stand-in replaces
    if items.shape[1] != aligned.dim or width != aligned.dim:
        raise DataError(f"aligned vectors are {aligned.dim}-d, model {name}'s item embeddings {items.shape[1]}-d: "
                        f"aligned to another model?", file=path)
    cold = cold_rows(data)
    warm = np.setdiff1d(np.flatnonzero(behavior.mask.numpy()), cold)
    if len(warm) == 0:
        raise DataError(f"no warm item of dataset '{data.name}' has a behavior row in the file", file=path)
    w = torch.as_tensor(warm)
    if not torch.allclose(items[w], behavior.features[w], rtol=MATCH_RTOL, atol=MATCH_ATOL):
        gap = float((items[w] - behavior.features[w]).abs().max())
        from mmrec.datasets.features import feature_file_metadata
        source = feature_file_metadata(path).get("behavior_run") or "another run"
        raise MMRecError(f"--cold-items {spec}: the content in {path} was aligned to the item embeddings of "
                         f"{source}, but this model's differ (max |diff| {gap:.3g} over {len(warm)} warm items); "
                         f"use it with the run that pre-training aligned to")
    usable = cold[aligned.mask.numpy()[cold]]
    rows = torch.as_tensor(usable, dtype=torch.long)
    model.set_cold_standins(rows, aligned.features[rows])
    _check_scores_use_standins(model, rows, aligned.features[rows], name)
    return {"source": str(path), "cold_items": int(len(cold)), "with_aligned_vector": int(len(usable)),
            "without_content": int(len(cold) - len(usable))}


def _check_scores_use_standins(model: Any, rows: Tensor, vectors: Tensor, name: str) -> None:
    """A model that overrides ``score_all`` past ``scoring_tables`` would silently ignore the
    stand-ins: probe a few users and refuse it instead."""
    if len(rows) == 0:
        return
    with torch.no_grad():
        users = model.representations()[0]
        probe = torch.arange(min(8, users.shape[0]), device=users.device)
        got = model.score_all(probe)[:, rows.to(users.device)].float().cpu()
        want = users[probe].float().cpu() @ vectors.T
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        model.set_cold_standins(None)
        raise ConfigError(f"--cold-items: model {name} scores items past its embedding tables, so it cannot "
                          f"take aligned vectors for cold items")


__all__ = ["STANDIN_FILE", "attach_cold_items", "cold_rows", "load_standins", "parse_spec", "write_standins"]
