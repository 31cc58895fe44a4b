"""What a pre-training run with an identity behavior head leaves for the recommenders.

* ``RUN/aligned_items.safetensors``: each item's content vector in the behavior model's item
  space (the content heads land in the aligned-to recommender's own space); ``--cold-items
  aligned:RUN`` reads it (mmrec/cold_items.py).
* ``RUN/item_features.safetensors``: the projected per-modality embeddings and their fused
  table, exactly what ``mmrec extract --run RUN`` writes for the same data; content models take
  it with ``--features``.

Both come from the embeddings the run's final evaluation already computed for every item
(``embed_items``): no further pass through the encoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmrec.cold_items import STANDIN_FILE, write_standins
from mmrec.datasets.features import write_feature_tables
from mmrec.datasets.schema import Dataset, FeatureTable
from mmrec.pretrain.config import PretrainConfig
from mmrec.pretrain.retrieval import content_mean


def write_aligned_items(embs: dict[str, Any], masks: dict[str, Any], data: Dataset, cfg: PretrainConfig,
                        modalities: list[str], run_dir: Path) -> dict[str, Any] | None:
    """Write both files (identity behavior head only) from ``embed_items``' ``embs`` / ``masks``
    (every content modality and ``behavior``); returns their summary for metrics.json."""
    if cfg.behavior.head != "identity":
        return None
    vectors, has = content_mean(embs, masks, modalities)
    meta = {"created_by": "mmrec pretrain", "dataset": str(data.name), "pretrain_run": str(run_dir),
            "behavior_kind": cfg.behavior_kind(), "behavior_run": str(cfg.behavior.run or ""),
            "regression_weight": str(cfg.loss.regression_weight)}
    ids = [str(x) for x in data.item_ids]
    write_standins(run_dir / STANDIN_FILE, vectors, has, embs["behavior"], ids, meta)
    write_item_features(embs, masks, modalities, data, run_dir)
    return {"file": STANDIN_FILE, "features": FEATURES_FILE, "items_with_content": int(has.sum()),
            "dim": int(vectors.shape[1])}


FEATURES_FILE = "item_features.safetensors"


def write_item_features(embs: dict[str, Any], masks: dict[str, Any], modalities: list[str], data: Dataset,
                        run_dir: Path) -> None:
    """``mmrec extract --run RUN``'s file (projected tables + fused), from embeddings already computed."""
    from mmrec.pretrain.extract import FUSED, fuse_tables

    tables = {m: FeatureTable(embs[m].detach().float().cpu(), masks[m].detach().bool().cpu(), {})
              for m in modalities}
    fused = fuse_tables(tables, "auto")
    all_tables = dict(tables)
    if fused is not None:
        all_tables[FUSED] = fused
    meta = {"created_by": "mmrec pretrain", "dataset": str(data.name), "n_items": str(data.n_items),
            "projected": "true", "run": str(run_dir)}
    write_feature_tables(run_dir / FEATURES_FILE, all_tables, [str(x) for x in data.item_ids], meta)
