"""Images of items: a shape in a colour with a texture, on a background whose tone is z1.

Pure functions of per-item parameters, so a lazy sequence can render any item
at any time and always produce the same PNG bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 215, 40),
           (140, 60, 190), (245, 140, 30), (40, 200, 210), (240, 120, 190)]  # order of VOCAB["color"]


def _polygon(shape: int, cx: float, cy: float, r: float, angle: float) -> list[list[tuple[float, float]]]:
    """Vertex lists (one or more polygons) of a shape index, rotated by ``angle`` radians."""

    def ring(k: int, radii: list[float], offset: float, aspect: float = 1.0) -> list[tuple[float, float]]:
        pts = []
        for j in range(k):
            a = offset + angle + 2 * math.pi * j / k
            rr = radii[j % len(radii)]
            pts.append((cx + aspect * rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape == 1:  # square
        return [ring(4, [r], math.pi / 4)]
    if shape == 2:  # triangle
        return [ring(3, [r * 1.1], -math.pi / 2)]
    if shape == 3:  # diamond: a narrow rhombus
        return [ring(4, [r * 1.1], 0.0, aspect=0.6)]
    if shape == 4:  # star
        return [ring(10, [r * 1.1, r * 0.45], -math.pi / 2)]
    if shape == 5:  # cross: two bars
        w = r * 0.35
        bars = []
        for rot in (0.0, math.pi / 2):
            a = angle + rot
            c, s = math.cos(a), math.sin(a)
            corners = [(-r, -w), (r, -w), (r, w), (-r, w)]
            bars.append([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners])
        return bars
    return []  # circle: drawn as an ellipse


def _texture(size: int, color: tuple[int, int, int], texture: int, phase: int) -> Image.Image:
    """A full-size tile in ``color`` carrying the texture pattern in a darker shade."""
    img = Image.new("RGB", (size, size), color)
    dark = tuple(int(c * 0.5) for c in color)
    draw = ImageDraw.Draw(img)
    step = max(4, size // 8)
    if texture == 1:  # stripes
        for y in range(phase % step - step, size, step):
            draw.rectangle([0, y, size, y + step // 2 - 1], fill=dark)
    elif texture == 2:  # dots
        rad = max(1, step // 4)
        for y in range(phase % step, size, step):
            for x in range((phase * 3) % step, size, step):
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=dark)
    elif texture == 3:  # checker
        for y in range(0, size, step):
            for x in range(0, size, step):
                if ((x + y) // step + phase) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    elif texture == 4:  # grid lines
        for v in range(phase % step, size, step):
            draw.line([(v, 0), (v, size)], fill=dark, width=1)
            draw.line([(0, v), (size, v)], fill=dark, width=1)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def render_image(shape: int, color: int, texture: int, z0: float, z1: float, size: int,
                 dx: float, dy: float, angle: float, phase: int) -> bytes:
    """PNG bytes of one item; ``z0`` sets the object's size, ``z1`` the background tone."""
    bg = int(round(128 + 100 * math.tanh(z1 / 1.5)))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    r = size * (0.26 + 0.1 * math.tanh(z0 / 1.5))
    cx, cy = size / 2 + dx * size, size / 2 + dy * size
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    for poly in _polygon(shape, cx, cy, r, angle):
        draw.polygon(poly, fill=255)
    img.paste(_texture(size, PALETTE[color], texture, phase), (0, 0), mask)
    return _png(img)


def render_noise_image(size: int, rng: np.random.Generator) -> bytes:
    """Uniform RGB noise: carries no information about the item."""
    return _png(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB"))
