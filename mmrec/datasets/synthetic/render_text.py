"""Text of items: templated titles and descriptions of attribute words (with synonyms) plus distractors.

Synonyms mean a model must learn that "crimson" and "scarlet" are "red";
distractor words carry no signal. Choices are drawn vectorised from one stream.
"""

from __future__ import annotations

import numpy as np

from mmrec.datasets.synthetic.factors import VOCAB

DISTRACTORS = ["premium", "classic", "everyday", "limited", "edition", "new", "vintage", "handmade",
               "bestseller", "gift", "durable", "lightweight", "eco", "original", "deluxe", "authentic",
               "portable", "modern", "signature", "exclusive", "favourite", "quality", "trusted", "bundle"]
FILLER = ["item", "thing", "product", "stuff", "widget", "gadget", "object", "piece", "unit", "lot",
          "misc", "assorted", "various", "generic", "standard", "model", "series", "version"]
SIZE_WORDS = [("small", "compact", "little"), ("medium", "midsize", "regular"), ("large", "big", "oversized")]
BACKDROP = [" on a dark backdrop", "", " on a light backdrop"]
TEMPLATES = [
    "A {size} {color} {shape} with a {texture} pattern{bg}. Pairs well with {category} music. {extra}.",
    "{Extra} {texture} {shape} in {color}, {size}{bg}; a {category} favourite.",
    "This {size} {shape} comes in {color} with a {texture} finish{bg}. Think {category}. {Extra}.",
    "{Color} and {texture}: a {size} {shape} for {category} lovers{bg}. {Extra}.",
]


def _bin(z: np.ndarray) -> np.ndarray:
    """-0.5 / +0.5 thresholds: 0 low, 1 middle, 2 high."""
    return np.digitize(z, [-0.5, 0.5])


def render_texts(attributes: dict[str, np.ndarray], z0: np.ndarray, z1: np.ndarray,
                 rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Titles and descriptions for every item."""
    n = len(z0)
    syn = {a: rng.integers(0, 3, (n, 2)) for a in ("shape", "color", "texture", "category")}
    size_syn = rng.integers(0, 3, n)
    template = rng.integers(0, len(TEMPLATES), n)
    extra = rng.integers(0, len(DISTRACTORS), (n, 3))
    n_extra = rng.integers(1, 4, n)
    size_bin, bg_bin = _bin(z0), _bin(z1)
    titles, descriptions = [], []
    for i in range(n):
        word = {a: VOCAB[a][attributes[a][i]] for a in syn}
        titles.append(f"{word['color'][syn['color'][i, 0]].capitalize()} {word['texture'][syn['texture'][i, 0]]} "
                      f"{word['shape'][syn['shape'][i, 0]]}")
        fields = {a: word[a][syn[a][i, 1]] for a in syn}
        extra_words = " ".join(DISTRACTORS[j] for j in extra[i, : n_extra[i]])
        descriptions.append(TEMPLATES[template[i]].format(
            size=SIZE_WORDS[size_bin[i]][size_syn[i]], bg=BACKDROP[bg_bin[i]], extra=extra_words,
            Extra=extra_words.capitalize(), Color=fields["color"].capitalize(), **fields))
    return titles, descriptions


def render_noise_text(rng: np.random.Generator) -> tuple[str, str]:
    """Random neutral words: no attribute word, no size, no backdrop."""
    words = DISTRACTORS + FILLER
    title = " ".join(words[j] for j in rng.integers(0, len(words), 3)).capitalize()
    desc = " ".join(words[j] for j in rng.integers(0, len(words), 12)).capitalize() + "."
    return title, desc
