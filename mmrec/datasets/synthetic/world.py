"""``make_world``: the synthetic world as a :class:`~mmrec.datasets.schema.Dataset`.

The world is split-agnostic: ``train`` holds every warm interaction of every
behavior and ``valid`` / ``test`` are None until a split is applied. What the
world knows and a model must discover is in ``Dataset.ground_truth``:

=============================  ==============================================================
key                            content
=============================  ==============================================================
``config``, ``seed``           the :class:`WorldConfig` (as a dict) and the seed
``attributes``                 ``{"shape"|"color"|"texture"|"category": int64 [n_items]}``
``attribute_values``           value names per attribute (canonical word of each index)
``item_latent``                float32 [n_items, latent_dim]; dims 0 (size) and 1 (backdrop) are shown
``item_popularity``            float32 [n_items] popularity bias ``b_i`` (not shown in content)
``user_taste``                 ``{attribute: float32 [n_users, n_values]}`` preference per value
``user_latent``                float32 [n_users, latent_dim]
``scenario_shift``             ``{attribute: float32 [n_scenarios, n_values]}``
``scenario_mix``               float64 [n_users, n_scenarios], each user's time share per scenario
``affinity``                   :class:`TrueAffinity`: ``affinity(users, items, scenario)`` -> scores
``affinity_matrix``            float32 [n_users, n_items] base score (no scenario), small worlds only
``visible_factors``            ``{modality: factors it shows}``
``audio_pitch_hz``             float32 [n_items] fundamental of each clip (before noise)
``noisy_modality``             the noisy modality or None; ``noisy_items``: int64 item indices
``cold_items``                 int64 item indices with no training rows (also ``Dataset.cold_items``)
``cold_interactions``          :class:`Interactions` on cold items (all behaviors), withheld from train
``cold_exposures``             exposures on cold items, withheld from ``Dataset.exposures``
``exposure_p_click``           float32 per ``Dataset.exposures`` row: true p(click)
``exposure_p_convert_given_click``  float32 per row: true p(convert | click)
=============================  ==============================================================

Item content: ``items.text`` has ``title`` and ``description``; ``items.image``
and ``items.audio`` are :class:`LazyContent` sequences of **bytes** (PNG, WAV
16 kHz mono int16), not paths: the canonical writer writes them to files.
``items.features`` (when ``features=True``) holds per modality a random
projection of the factors that modality shows plus noise (see ``content.features``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmrec.datasets.schema import Dataset, ItemContent
from mmrec.datasets.synthetic import behaviors as beh
from mmrec.datasets.synthetic import content
from mmrec.datasets.synthetic.config import resolve_config
from mmrec.datasets.synthetic.factors import ATTRIBUTES, VISIBLE, VOCAB, TrueAffinity, sample_factors, stream
from mmrec.datasets.synthetic.render_audio import pitch_hz


def _choose(seed: int, name: str, n_items: int, share: float) -> np.ndarray:
    k = int(round(share * n_items))
    return np.sort(stream(seed, name).choice(n_items, size=k, replace=False)).astype(np.int64)


def make_world(preset: str = "tiny", seed: int = 0, **overrides) -> Dataset:
    """Build the synthetic world ``synthetic:<preset>``; same seed -> identical arrays and bytes.

    ``overrides`` are :class:`WorldConfig` fields (unknown names raise ConfigError).
    """
    cfg = resolve_config(preset, overrides)
    seed = int(seed)
    f = sample_factors(cfg, seed)
    aff = TrueAffinity.from_factors(f, cfg)

    views = beh.sample_views(aff, f, cfg, seed)
    rows = beh.behavior_rows(views, f, cfg, seed)
    exposures, p_click, p_conv = beh.exposures(aff, f, cfg, seed,
                                               (int(rows.timestamp.min()), int(rows.timestamp.max())))

    cold = _choose(seed, "cold", cfg.n_items, cfg.cold_share)
    noisy = _choose(seed, "noisy", cfg.n_items, cfg.noisy_share) if cfg.noisy_modality else np.zeros(0, np.int64)
    row_cold = np.isin(rows.item, cold)
    exp_cold = np.isin(exposures.item, cold)
    train, cold_rows = rows.select(~row_cold), rows.select(row_cold)

    items = ItemContent(
        text=content.texts(f, cfg, seed, noisy),
        image=content.images(f, cfg, seed, noisy),
        audio=content.audio(f, cfg, seed, noisy),  # bytes (WAV), see the module docstring
        features=content.features(f, cfg, seed, noisy) if cfg.features else {},
    )

    sizes = {a: len(f.user_taste[a][0]) for a in ATTRIBUTES}
    truth = {
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "attributes": f.attributes,
        "attribute_values": {a: [VOCAB[a][v][0] for v in range(sizes[a])] for a in ATTRIBUTES},
        "item_latent": f.item_latent,
        "item_popularity": f.item_bias,
        "user_taste": f.user_taste,
        "user_latent": f.user_latent,
        "scenario_shift": f.scenario_shift,
        "scenario_mix": f.scenario_mix,
        "affinity": aff,
        "visible_factors": {m: list(v) for m, v in VISIBLE.items()},
        "audio_pitch_hz": np.array([pitch_hz(c) for c in range(sizes["category"])],
                                   dtype=np.float32)[f.attributes["category"]],
        "noisy_modality": cfg.noisy_modality,
        "noisy_items": noisy,
        "cold_items": cold,
        "cold_interactions": cold_rows,
        "cold_exposures": exposures.select(exp_cold),
        "exposure_p_click": p_click[~exp_cold],
        "exposure_p_convert_given_click": p_conv[~exp_cold],
    }
    if cfg.n_users * cfg.n_items <= cfg.dense_affinity_max_cells:
        truth["affinity_matrix"] = aff()

    report = {}
    if len(cold):
        report = {"cold_items": int(len(cold)), "cold_rows_withheld": int(len(cold_rows)),
                  "cold_exposures_withheld": int(exp_cold.sum())}
    return Dataset(
        name=f"synthetic:{preset}",
        behaviors=list(beh.BEHAVIORS),
        target=beh.TARGET,
        user_ids=np.array([f"u{i}" for i in range(cfg.n_users)], dtype=object),
        item_ids=np.array([f"i{i}" for i in range(cfg.n_items)], dtype=object),
        train=train,
        scenarios=list(cfg.scenarios),
        items=items,
        exposures=exposures.select(~exp_cold),
        cold_items=cold if len(cold) else None,
        ground_truth=truth,
        report=report,
    )


__all__ = ["make_world"]
