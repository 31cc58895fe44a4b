"""Item content: lazy rendered images / audio, eager text, and cheap precomputed features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, overload

import numpy as np
import torch

from mmrec.datasets.schema import FeatureTable
from mmrec.datasets.synthetic.config import WorldConfig
from mmrec.datasets.synthetic.factors import ATTRIBUTES, VISIBLE, Factors, stream
from mmrec.datasets.synthetic.render_audio import render_audio, render_noise_audio
from mmrec.datasets.synthetic.render_image import render_image, render_noise_image
from mmrec.datasets.synthetic.render_text import render_noise_text, render_texts

_NOISE_TAG = {"image": 101, "audio": 102, "text": 103}


class LazyContent(Sequence[bytes]):
    """A read-only list of encoded files (PNG / WAV bytes) rendered on access.

    Rendering is a pure function of the item index, so ``seq[i]`` returns the
    same bytes every time and the medium world never holds 10k images in memory.
    Picklable (no closures), so DataLoader workers can use it.
    """

    def __init__(self, render: Callable[[int], bytes], n: int, kind: str) -> None:
        self._render = render
        self._n = n
        self.kind = kind

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> list[bytes]: ...

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._render(j) for j in range(*i.indices(self._n))]
        j = int(i)
        if j < 0:
            j += self._n
        if not 0 <= j < self._n:
            raise IndexError(f"item {i} out of range for {self._n} items")
        return self._render(j)

    def __iter__(self) -> Iterator[bytes]:
        return (self._render(j) for j in range(self._n))

    @property
    def n_present(self) -> int:
        """Entries that are not None (all of them): lets summaries count without rendering."""
        return self._n

    def __repr__(self) -> str:
        return f"LazyContent({self.kind}, n={self._n})"


@dataclass
class ImageRenderer:
    """Per-item drawing parameters; a dataclass (not a closure) so the sequence pickles."""

    shape: np.ndarray
    color: np.ndarray
    texture: np.ndarray
    z0: np.ndarray
    z1: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    angle: np.ndarray
    phase: np.ndarray
    noisy: np.ndarray  # bool [n_items]
    size: int
    seed: int

    def __call__(self, i: int) -> bytes:
        if self.noisy[i]:
            return render_noise_image(self.size, np.random.default_rng([self.seed, _NOISE_TAG["image"], i]))
        return render_image(int(self.shape[i]), int(self.color[i]), int(self.texture[i]), float(self.z0[i]),
                            float(self.z1[i]), self.size, float(self.dx[i]), float(self.dy[i]),
                            float(self.angle[i]), int(self.phase[i]))


@dataclass
class AudioRenderer:
    """Per-item synthesis parameters; a dataclass (not a closure) so the sequence pickles."""

    category: np.ndarray
    texture: np.ndarray
    shape: np.ndarray
    z0: np.ndarray
    detune: np.ndarray
    noisy: np.ndarray
    sample_rate: int
    seconds: float
    seed: int

    def __call__(self, i: int) -> bytes:
        if self.noisy[i]:
            return render_noise_audio(self.sample_rate, self.seconds,
                                      np.random.default_rng([self.seed, _NOISE_TAG["audio"], i]))
        return render_audio(int(self.category[i]), int(self.texture[i]), int(self.shape[i]), float(self.z0[i]),
                            self.sample_rate, self.seconds, float(self.detune[i]),
                            noise_seed=int(self.seed) * 1_000_003 + i)


def _noisy_mask(noisy_items: np.ndarray, modality: str, cfg: WorldConfig, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    if cfg.noisy_modality == modality:
        mask[noisy_items] = True
    return mask


def images(f: Factors, cfg: WorldConfig, seed: int, noisy_items: np.ndarray) -> LazyContent:
    rng = stream(seed, "img")
    n = len(f.item_bias)
    a = f.attributes
    r = ImageRenderer(a["shape"], a["color"], a["texture"], f.item_latent[:, 0], f.item_latent[:, 1],
                      dx=rng.uniform(-0.08, 0.08, n), dy=rng.uniform(-0.08, 0.08, n),
                      angle=rng.uniform(-0.3, 0.3, n), phase=rng.integers(0, 64, n),
                      noisy=_noisy_mask(noisy_items, "image", cfg, n), size=cfg.image_size, seed=seed)
    return LazyContent(r, n, "image/png")


def audio(f: Factors, cfg: WorldConfig, seed: int, noisy_items: np.ndarray) -> LazyContent:
    rng = stream(seed, "audio")
    n = len(f.item_bias)
    a = f.attributes
    r = AudioRenderer(a["category"], a["texture"], a["shape"], f.item_latent[:, 0],
                      detune=rng.uniform(-0.01, 0.01, n), noisy=_noisy_mask(noisy_items, "audio", cfg, n),
                      sample_rate=cfg.sample_rate, seconds=cfg.audio_seconds, seed=seed)
    return LazyContent(r, n, "audio/wav")


def texts(f: Factors, cfg: WorldConfig, seed: int, noisy_items: np.ndarray) -> dict[str, list[str]]:
    titles, descriptions = render_texts(f.attributes, f.item_latent[:, 0], f.item_latent[:, 1], stream(seed, "text"))
    if cfg.noisy_modality == "text":
        for i in noisy_items:
            titles[i], descriptions[i] = render_noise_text(np.random.default_rng([seed, _NOISE_TAG["text"], int(i)]))
    return {"title": titles, "description": descriptions}


def visible_matrix(f: Factors, modality: str) -> np.ndarray:
    """What a perfect encoder of this modality could see: one-hots and shown latent dims."""
    cols = []
    for name in VISIBLE[modality]:
        if name in ATTRIBUTES:
            cols.append(f.onehot((name,)))
        else:
            cols.append(f.item_latent[:, [int(name[1:])]])
    return np.concatenate(cols, axis=1).astype(np.float32)


def features(f: Factors, cfg: WorldConfig, seed: int, noisy_items: np.ndarray) -> dict[str, FeatureTable]:
    """Per modality: a fixed random projection of the factors that modality shows, plus noise.

    Stands in for a frozen encoder so two-step models run without one; rows of
    items whose modality is noisy are pure noise of the same scale.
    """
    rng = stream(seed, "features")
    out = {}
    n = len(f.item_bias)
    for m in ("image", "text", "audio"):
        x = visible_matrix(f, m)
        w = rng.standard_normal((x.shape[1], cfg.feature_dim)) / np.sqrt(len(VISIBLE[m]))
        feats = x @ w + cfg.feature_noise * rng.standard_normal((n, cfg.feature_dim))
        noise = rng.standard_normal((n, cfg.feature_dim)) * feats.std(axis=0, keepdims=True)
        noisy = _noisy_mask(noisy_items, m, cfg, n)
        feats[noisy] = noise[noisy]
        meta = {"source": "synthetic content generator",
                "what": f"random projection of {'+'.join(VISIBLE[m])} plus N(0, {cfg.feature_noise}^2) noise",
                "noisy_items": str(int(noisy.sum()))}
        out[m] = FeatureTable(torch.from_numpy(feats.astype(np.float32)), torch.ones(n, dtype=torch.bool), meta)
    return out
