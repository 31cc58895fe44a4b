"""Audio of items: 16 kHz mono WAV clips whose pitch, tempo and timbre come from the factors.

pitch = category (notes three semitones apart from A3), tempo = texture (1..5
notes per clip), timbre = shape (harmonic profile; the fundamental always
dominates), note decay = z0.
"""

from __future__ import annotations

import io

import numpy as np
from scipy.io import wavfile

BASE_HZ = 220.0
SEMITONES_PER_CATEGORY = 3
# Harmonic amplitudes per shape index (fundamental first and largest).
TIMBRES = [
    [1.0],  # circle: pure tone
    [1.0, 0.0, 0.33, 0.0, 0.2, 0.0, 0.14],  # square: odd harmonics
    [1.0, 0.0, 0.11, 0.0, 0.04],  # triangle: soft odd harmonics
    [1.0, 0.5, 0.25, 0.12],  # diamond: decaying series
    [1.0, 0.7, 0.55, 0.45, 0.35, 0.25],  # star: bright
    [1.0, 0.0, 0.0, 0.6, 0.0, 0.0, 0.4],  # cross: hollow
]


def pitch_hz(category: int) -> float:
    """Fundamental frequency of a category (the ground truth a pitch test checks)."""
    return BASE_HZ * 2.0 ** (SEMITONES_PER_CATEGORY * category / 12.0)


def notes_per_clip(texture: int) -> int:
    return texture + 1


def _wav(signal: np.ndarray, sample_rate: int) -> bytes:
    pcm = np.clip(np.round(signal * 32767.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    wavfile.write(buf, sample_rate, pcm)
    return buf.getvalue()


def render_audio(category: int, texture: int, shape: int, z0: float, sample_rate: int, seconds: float,
                 detune: float, noise_seed: int) -> bytes:
    """WAV bytes (int16 PCM) of one item."""
    n = int(round(sample_rate * seconds))
    t = np.arange(n) / sample_rate
    f0 = pitch_hz(category) * (1.0 + detune)
    tone = np.zeros(n)
    for h, amp in enumerate(TIMBRES[shape % len(TIMBRES)], start=1):
        if amp and h * f0 < sample_rate / 2:
            tone += amp * np.sin(2 * np.pi * h * f0 * t)
    k = notes_per_clip(texture)
    note_len = max(1, n // k)
    local = (np.arange(n) % note_len) / sample_rate  # time since the current note's onset
    decay = 3.0 + 6.0 * (1.0 + np.tanh(z0 / 1.5))  # 1/s: long sustain .. plucky
    attack = np.minimum(1.0, local / 0.005)
    env = attack * np.exp(-decay * local)
    signal = tone * env
    signal = 0.8 * signal / max(float(np.abs(signal).max()), 1e-9)
    signal += 0.005 * np.random.default_rng(noise_seed).standard_normal(n)
    return _wav(signal, sample_rate)


def render_noise_audio(sample_rate: int, seconds: float, rng: np.random.Generator) -> bytes:
    """White noise of the same length: carries no information about the item."""
    n = int(round(sample_rate * seconds))
    return _wav(np.clip(0.3 * rng.standard_normal(n), -1.0, 1.0), sample_rate)
