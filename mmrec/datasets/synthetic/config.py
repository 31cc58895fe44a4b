"""World configuration: one dataclass, four presets, overrides checked by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmrec.config import from_dict
from mmrec.errors import ConfigError

MODALITY_NAMES = ("image", "text", "audio")


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of the synthetic world.

    Sizes and rates are per preset; the generative model is the same for all.
    ``score(u, i, s) = attr_weight * q_u . x_i + latent_weight * p_u . z_i / sqrt(d)
    + pop_weight * b_i + scenario_weight * delta_s . x_i`` where ``x_i`` is the
    one-hot of the item's categorical attributes and ``z_i`` its continuous latent.
    """

    n_users: int = 300
    n_items: int = 200
    # categorical factors (sizes are capped by the vocabularies in factors.py)
    n_shapes: int = 4
    n_colors: int = 6
    n_textures: int = 4
    n_categories: int = 5
    latent_dim: int = 8  # continuous item latent; dims 0 and 1 are shown in content
    # preference model
    attr_weight: float = 1.0
    latent_weight: float = 1.0
    pop_weight: float = 0.7  # std of the item popularity bias (log scale)
    taste_share: float = 0.3  # share of attribute taste common to all users (content-driven popularity)
    scenario_weight: float = 1.0
    scenarios: tuple[str, ...] = ("home", "search", "promo")
    scenario_concentration: float = 1.0  # Dirichlet alpha of each user's scenario mix
    # behaviors
    mean_views: float = 15.0  # per user, on top of min_views
    min_views: int = 6
    activity_skew: float = 0.5  # lognormal sigma of user activity
    cart_rate: float = 0.35  # share of views that are carted
    buy_rate: float = 0.5  # share of carts that are bought
    min_buys: int = 3  # every user with this many views buys at least this many items
    cascade_noise: float = 1.0  # logistic noise on the cart / buy utilities
    direct_buy_share: float = 0.0  # share of buys with no logged view or cart (the cascade prior misses them)
    sequence_drift: float = 2.0  # how strongly a user's view order follows a taste drift
    time_start: int = 1_600_000_000
    # exposures (click / convert labels for joint-task heads, ESMM structure)
    exposures_per_user: int = 20
    click_bias: float = -1.5
    click_slope: float = 1.5
    convert_bias: float = -1.0
    convert_slope: float = 1.5
    # cold items: no training interactions at all; their rows go to ground truth
    cold_share: float = 0.0
    # noise on one modality
    noisy_modality: str | None = None
    noisy_share: float = 0.0
    # content
    image_size: int = 64
    sample_rate: int = 16_000
    audio_seconds: float = 0.5
    features: bool = True
    feature_dim: int = 32
    feature_noise: float = 0.3
    # ground truth: keep a dense float32 affinity matrix when users*items is at most this
    dense_affinity_max_cells: int = 4_000_000
    block_users: int = 1024  # users scored per block (memory bound for medium)

    def __post_init__(self) -> None:
        checks = [
            (self.n_users > 0 and self.n_items > 0, "n_users and n_items must be positive"),
            (self.latent_dim >= 2, "latent_dim must be at least 2 (dims 0 and 1 are rendered)"),
            (0.0 <= self.cold_share < 1.0, "cold_share must be in [0, 1)"),
            (0.0 <= self.noisy_share <= 1.0, "noisy_share must be in [0, 1]"),
            (self.noisy_share == 0.0 or self.noisy_modality is not None,
             "noisy_share > 0 needs noisy_modality (image, text or audio)"),
            (0.0 <= self.taste_share <= 1.0, "taste_share must be in [0, 1]"),
            (0.0 <= self.direct_buy_share <= 1.0, "direct_buy_share must be in [0, 1]"),
            (self.mean_views >= 0 and self.exposures_per_user >= 0, "mean_views and exposures_per_user must be >= 0"),
            (self.noisy_modality is None or self.noisy_modality in MODALITY_NAMES,
             f"noisy_modality must be one of {MODALITY_NAMES} or None"),
            (0.0 < self.cart_rate <= 1.0 and 0.0 < self.buy_rate <= 1.0, "cart_rate and buy_rate must be in (0, 1]"),
            (self.min_views >= 1 and self.min_buys >= 0, "min_views >= 1 and min_buys >= 0"),
            (len(self.scenarios) >= 1, "at least one scenario"),
            (self.image_size >= 16, "image_size must be at least 16"),
            (self.audio_seconds > 0 and self.sample_rate >= 4000, "audio_seconds > 0, sample_rate >= 4000"),
            (self.feature_dim > 0, "feature_dim must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"WorldConfig: {msg}")

    @property
    def n_scenarios(self) -> int:
        return len(self.scenarios)


PRESETS: dict[str, WorldConfig] = {
    # tests build this constantly: must stay well under a second or two
    "tiny": WorldConfig(),
    "small": WorldConfig(n_users=2000, n_items=1000, n_shapes=5, n_colors=7, n_textures=4, n_categories=6,
                         mean_views=24.0, exposures_per_user=30),
    # `mmrec demo`'s world: as small as tiny allows for a few minutes on a CPU, but realistic
    # where tiny is not. 40% of buys have no logged view / cart (the behavior prior is no oracle);
    # item attributes, which every modality shows, drive most of the taste and the hidden
    # popularity bias and shared taste less, so content predicts preference on cold items and
    # popularity is a baseline to beat, not the ceiling.
    "demo": WorldConfig(n_users=500, n_items=300, attr_weight=1.5, latent_weight=0.5, pop_weight=0.5,
                        taste_share=0.2, direct_buy_share=0.4),
    "medium": WorldConfig(n_users=20_000, n_items=10_000, n_shapes=6, n_colors=8, n_textures=5,
                          n_categories=8, latent_dim=16, mean_views=30.0, exposures_per_user=30),
}


def resolve_config(preset: str, overrides: dict) -> WorldConfig:
    """The preset's config with ``overrides`` applied; unknown names are a ConfigError."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic preset '{preset}'; known: {', '.join(PRESETS)}")
    base = dataclasses.asdict(PRESETS[preset])
    names = {f.name for f in dataclasses.fields(WorldConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown synthetic world option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    base.update(overrides)
    if isinstance(base.get("scenarios"), list):
        base["scenarios"] = tuple(base["scenarios"])
    return from_dict(WorldConfig, base)
