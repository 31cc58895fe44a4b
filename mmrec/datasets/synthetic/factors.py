"""Latent factors of the world: item attributes, user tastes, scenario shifts.

Everything downstream (content rendering, behaviors, exposures, ground truth)
reads these arrays, so the relation between what an item *shows* and who buys
it is known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmrec.datasets.synthetic.config import WorldConfig
from mmrec.errors import ConfigError

ATTRIBUTES = ("shape", "color", "texture", "category")

# Value names (first word is the canonical one); synonyms keep text models honest.
VOCAB: dict[str, list[tuple[str, ...]]] = {
    "shape": [("circle", "disc", "round"), ("square", "box", "block"), ("triangle", "wedge", "pyramid"),
              ("diamond", "rhombus", "lozenge"), ("star", "starburst", "spark"), ("cross", "plus", "crossmark")],
    "color": [("red", "crimson", "scarlet"), ("green", "emerald", "jade"), ("blue", "navy", "azure"),
              ("yellow", "golden", "lemon"), ("purple", "violet", "lilac"), ("orange", "amber", "tangerine"),
              ("cyan", "teal", "turquoise"), ("pink", "rose", "magenta")],
    "texture": [("solid", "plain", "smooth"), ("striped", "lined", "banded"), ("dotted", "spotted", "speckled"),
                ("checkered", "chequered", "plaid"), ("gridded", "meshed", "latticed")],
    "category": [("jazz", "swing", "bebop"), ("rock", "grunge", "punk"), ("folk", "acoustic", "country"),
                 ("classical", "orchestral", "baroque"), ("electronic", "techno", "synth"),
                 ("ambient", "chillout", "drone"), ("blues", "soul", "gospel"), ("pop", "disco", "chart")],
}

# Which factors each modality shows (z0 = size/decay, z1 = background tone).
VISIBLE: dict[str, tuple[str, ...]] = {
    "image": ("shape", "color", "texture", "z0", "z1"),
    "text": ("shape", "color", "texture", "category", "z0", "z1"),
    "audio": ("shape", "texture", "category", "z0"),
}


def attribute_sizes(cfg: WorldConfig) -> dict[str, int]:
    fields = {"shape": "n_shapes", "color": "n_colors", "texture": "n_textures", "category": "n_categories"}
    sizes = {a: int(getattr(cfg, f)) for a, f in fields.items()}
    for a, n in sizes.items():
        if not 1 <= n <= len(VOCAB[a]):
            raise ConfigError(f"WorldConfig: {fields[a]} must be in [1, {len(VOCAB[a])}], got {n}")
    return sizes


def stream(seed: int, name: str) -> np.random.Generator:
    """An independent generator per component, so one knob does not reshuffle the rest."""
    tag = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng([seed, tag])


@dataclass
class Factors:
    """The world's latent state (all float32 / int64 numpy)."""

    attributes: dict[str, np.ndarray]  # name -> [n_items] value index
    item_latent: np.ndarray  # [n_items, d]
    item_bias: np.ndarray  # [n_items] popularity (log scale)
    user_taste: dict[str, np.ndarray]  # name -> [n_users, n_values]
    user_latent: np.ndarray  # [n_users, d]
    scenario_shift: dict[str, np.ndarray]  # name -> [n_scenarios, n_values]
    scenario_mix: np.ndarray  # [n_users, n_scenarios] each user's share of time per scenario

    def onehot(self, attrs: tuple[str, ...] = ATTRIBUTES) -> np.ndarray:
        """Concatenated one-hot of the chosen attributes, [n_items, sum of sizes] float32."""
        blocks = []
        for a in attrs:
            k = self.scenario_shift[a].shape[1]
            blocks.append(np.eye(k, dtype=np.float32)[self.attributes[a]])
        return np.concatenate(blocks, axis=1)


def sample_factors(cfg: WorldConfig, seed: int) -> Factors:
    sizes = attribute_sizes(cfg)
    ri, ru, rs = stream(seed, "items"), stream(seed, "users"), stream(seed, "scenes")
    attributes = {a: ri.integers(0, sizes[a], cfg.n_items).astype(np.int64) for a in ATTRIBUTES}
    item_latent = ri.standard_normal((cfg.n_items, cfg.latent_dim)).astype(np.float32)
    item_bias = ri.standard_normal(cfg.n_items).astype(np.float32)
    # taste = shared component (content-driven popularity) + personal component, unit variance
    share = cfg.taste_share
    user_taste = {}
    for a in ATTRIBUTES:
        common = ru.standard_normal(sizes[a])
        personal = ru.standard_normal((cfg.n_users, sizes[a]))
        user_taste[a] = (np.sqrt(share) * common + np.sqrt(1 - share) * personal).astype(np.float32)
    user_latent = ru.standard_normal((cfg.n_users, cfg.latent_dim)).astype(np.float32)
    # scenario shift: each attribute adds N(0, 1/4) so the whole shift has unit variance per item
    scenario_shift = {a: (rs.standard_normal((cfg.n_scenarios, sizes[a])) / 2.0).astype(np.float32)
                      for a in ATTRIBUTES}
    scenario_mix = rs.dirichlet(np.full(cfg.n_scenarios, cfg.scenario_concentration), cfg.n_users)
    return Factors(attributes, item_latent, item_bias, user_taste, user_latent, scenario_shift,
                   scenario_mix.astype(np.float64))


@dataclass
class TrueAffinity:
    """The exact preference score of the world, picklable and cheap to evaluate in blocks.

    ``score(u, i, s) = U[u] . V[i] + S[s, i]`` with
    ``U = [attr_weight * taste, latent_weight * p / sqrt(d), 1]``,
    ``V = [onehot(attributes), z, pop_weight * b]`` and
    ``S[s] = scenario_weight * onehot . shift_s``. Views are drawn from ``softmax_i(score)``.
    """

    user_matrix: np.ndarray  # [n_users, k] float32
    item_matrix: np.ndarray  # [n_items, k] float32
    scenario_item: np.ndarray  # [n_scenarios, n_items] float32

    @classmethod
    def from_factors(cls, f: Factors, cfg: WorldConfig) -> "TrueAffinity":
        taste = np.concatenate([f.user_taste[a] for a in ATTRIBUTES], axis=1)
        shift = np.concatenate([f.scenario_shift[a] for a in ATTRIBUTES], axis=1)
        onehot = f.onehot()
        d = f.item_latent.shape[1]
        n_users = taste.shape[0]
        user = np.concatenate([cfg.attr_weight * taste, cfg.latent_weight * f.user_latent / np.sqrt(d),
                               np.ones((n_users, 1), np.float32)], axis=1)
        item = np.concatenate([onehot, f.item_latent, cfg.pop_weight * f.item_bias[:, None]], axis=1)
        scen = cfg.scenario_weight * (shift @ onehot.T)
        return cls(user.astype(np.float32), item.astype(np.float32), scen.astype(np.float32))

    @property
    def n_users(self) -> int:
        return self.user_matrix.shape[0]

    @property
    def n_items(self) -> int:
        return self.item_matrix.shape[0]

    def __call__(self, users: np.ndarray | slice | None = None, items: np.ndarray | None = None,
                 scenario: int | None = None) -> np.ndarray:
        """Scores [len(users), len(items)] (float32); ``scenario=None`` is the base taste."""
        u = self.user_matrix if users is None else self.user_matrix[users]
        v = self.item_matrix if items is None else self.item_matrix[items]
        out = u @ v.T
        if scenario is not None:
            out += self.scenario_item[scenario] if items is None else self.scenario_item[scenario][items]
        return out

    def pairs(self, user: np.ndarray, item: np.ndarray, scenario: np.ndarray | None = None) -> np.ndarray:
        """Score of each (user, item[, scenario]) row, [n] float32."""
        out = np.einsum("nk,nk->n", self.user_matrix[user], self.item_matrix[item])
        if scenario is not None:
            out += self.scenario_item[scenario, item]
        return out.astype(np.float32)
