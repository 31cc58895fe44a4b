r"""Labelled exposures for joint-task and multi-scenario heads, with the ground truth.

The synthetic world (:mod:`mmrec.datasets.synthetic`) draws click and convert from the
same true score, so its two tasks are perfectly correlated and its scenarios shift
the item score only. Heads need two more knobs, so this small generator is separate
(and leaves the world's defaults alone):

- ``task_correlation`` ρ: the click and the convert logits are functions of
  projections of ``x`` on unit directions with cosine exactly ρ (the MMoE paper's
  synthetic-data construction: :math:`y_t = w_t^\top x + \sum_i \sin(\alpha_i w_t^\top x + \beta_i)`);
- ``scenario_shift`` λ ∈ [0, 1]: in scenario s the directions are
  :math:`\sqrt{1-λ}\,w_t + \sqrt{λ}\,v^{(s)}_t` with :math:`v^{(s)}` orthogonal to the shared
  :math:`w` and to the other scenarios' (when ``dim`` allows), still with cosine ρ between the
  tasks; λ = 0: one preference everywhere, λ = 1: unrelated preferences per scenario.

Click ~ Bernoulli(p_click), and ``convert_if_clicked`` ~ Bernoulli(p_convert | click) is
drawn for *every* exposure (the potential outcome), so a CVR model can be scored on the
whole exposure space; the observed ``convert`` = click · convert_if_clicked (ESMM's structure).
Deterministic from ``seed``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmrec.errors import ConfigError


@dataclasses.dataclass
class ExposureConfig:
    n: int = 20000
    dim: int = 16
    n_scenarios: int = 3
    task_correlation: float = 0.5
    scenario_shift: float = 0.0
    n_sin: int = 4            # sine terms of the MMoE construction (0: logits linear in x)
    frequency: float = 1.0    # std of the sine frequencies α_i: higher = wigglier logits, harder to share
    logit_scale: float = 2.0  # logit = bias + scale · standardised score
    click_bias: float = -1.0
    convert_bias: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [(self.n >= 1, "n must be >= 1"), (self.dim >= 2, "dim must be >= 2"),
                  (self.n_scenarios >= 1, "n_scenarios must be >= 1"),
                  (-1.0 <= self.task_correlation <= 1.0, "task_correlation must be in [-1, 1]"),
                  (0.0 <= self.scenario_shift <= 1.0, "scenario_shift must be in [0, 1]"),
                  (self.n_sin >= 0, "n_sin must be >= 0"), (self.frequency >= 0, "frequency must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"exposure generator: {msg}")


@dataclasses.dataclass
class LabelledExposures:
    """Rows of exposures; every array has ``n`` rows."""

    x: np.ndarray                      # float32 [n, dim] features (the backbone's representation)
    scenario: np.ndarray               # int64 [n]
    click: np.ndarray                  # float32 [n]
    convert: np.ndarray                # float32 [n], = click * convert_if_clicked
    convert_if_clicked: np.ndarray     # float32 [n], the potential outcome (ground truth)
    p_click: np.ndarray                # float32 [n] true p(click | x, s)
    p_convert_given_click: np.ndarray  # float32 [n] true p(convert | click, x, s)
    directions: np.ndarray             # float32 [n_scenarios, 2, dim] true task directions
    n_scenarios: int

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labels(self) -> dict[str, np.ndarray]:
        """Task labels in cascade order (the lookup :func:`mmrec.heads.task_labels` reads)."""
        return {"click": self.click, "convert": self.convert}

    def features(self, scenario_one_hot: bool = False) -> np.ndarray:
        """``x``, optionally with the scenario's one-hot appended (what a scenario-agnostic model sees)."""
        if not scenario_one_hot:
            return self.x
        return np.concatenate([self.x, np.eye(self.n_scenarios, dtype=np.float32)[self.scenario]], axis=1)

    def select(self, index: np.ndarray | slice) -> "LabelledExposures":
        f = {k.name: getattr(self, k.name) for k in dataclasses.fields(self)}
        for k in ("x", "scenario", "click", "convert", "convert_if_clicked", "p_click", "p_convert_given_click"):
            f[k] = f[k][index]
        return LabelledExposures(**f)

    def split(self, train_fraction: float = 0.8) -> tuple["LabelledExposures", "LabelledExposures"]:
        """First ``train_fraction`` of the (already shuffled) rows, and the rest."""
        cut = int(round(len(self) * train_fraction))
        return self.select(slice(0, cut)), self.select(slice(cut, None))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def make_exposures(config: ExposureConfig | None = None, **overrides) -> LabelledExposures:
    """Draw labelled exposures (see the module docstring for the construction)."""
    cfg = dataclasses.replace(config or ExposureConfig(), **overrides)
    rng = np.random.default_rng(cfg.seed)
    d, S, rho, lam = cfg.dim, cfg.n_scenarios, cfg.task_correlation, cfg.scenario_shift
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))            # orthonormal columns
    cols = basis.T
    w = np.stack([cols[0], rho * cols[0] + np.sqrt(1 - rho ** 2) * cols[1]])   # [2, d], cos = ρ
    dirs = np.empty((S, 2, d))
    for s in range(S):
        if 2 + 2 * (s + 1) <= d:
            a, b = cols[2 + 2 * s], cols[3 + 2 * s]
        else:  # not enough room for orthogonal shifts: random unit directions
            a, b = (v / np.linalg.norm(v) for v in rng.standard_normal((2, d)))
        v = np.stack([a, rho * a + np.sqrt(1 - rho ** 2) * b])
        dirs[s] = np.sqrt(1 - lam) * w + np.sqrt(lam) * v
    alpha = rng.normal(size=cfg.n_sin) * cfg.frequency
    beta = rng.normal(size=cfg.n_sin)

    x = rng.standard_normal((cfg.n, d))
    scenario = rng.integers(0, S, cfg.n)
    proj = np.einsum("nd,ntd->nt", x, dirs[scenario])                 # [n, 2]
    score = proj + sum(np.sin(a * proj + b) for a, b in zip(alpha, beta)) if cfg.n_sin else proj
    score = (score - score.mean(0)) / np.maximum(score.std(0), 1e-6)
    p_click = _sigmoid(cfg.click_bias + cfg.logit_scale * score[:, 0])
    p_conv = _sigmoid(cfg.convert_bias + cfg.logit_scale * score[:, 1])
    click = rng.random(cfg.n) < p_click
    cic = rng.random(cfg.n) < p_conv
    f32 = np.float32
    return LabelledExposures(
        x=x.astype(f32), scenario=scenario.astype(np.int64), click=click.astype(f32),
        convert=(click & cic).astype(f32), convert_if_clicked=cic.astype(f32),
        p_click=p_click.astype(f32), p_convert_given_click=p_conv.astype(f32),
        directions=dirs.astype(f32), n_scenarios=S)
