"""Textured, camera-like test images, generated in a fraction of a second.

Smooth gradients compress and resample forgivingly; real photos do not. These images
carry what makes downscaling differ between methods: per-pixel sensor noise, texture at
every scale from 2 px up, fine lines (hair, wires), fabric-like gratings with periods
of 3-10 px, and large sharp-edged objects. A 1024x768 textured patch is mirrored into a
seamless tile that covers the frame, and the objects are drawn over the whole frame.
Used by the preprocessing fidelity test and by ``bench/bench_fidelity.py``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in rng.integers(0, 256, 3))
    return r, g, b


def _patch(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    acc = np.zeros((h, w, 3), np.int16)
    for cell, amp in ((96, 60), (24, 36), (6, 24), (2, 14)):  # texture at every scale
        small = rng.integers(0, 256, (h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
        up = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        acc += ((np.asarray(up, np.int16) - 128) * amp) // 128
    img = Image.fromarray(np.clip(acc + 128, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(60):  # hair, wires, the edges of small things
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        dx, dy = int(rng.integers(-w // 3, w // 3)), int(rng.integers(-h // 3, h // 3))
        draw.line((x0, y0, x0 + dx, y0 + dy), fill=_colour(rng), width=int(rng.integers(1, 4)))
    arr = np.asarray(img, np.int16).copy()
    for _ in range(3):  # fabric-like gratings
        pw, ph = w // 3, h // 3
        x0, y0 = int(rng.integers(0, w - pw)), int(rng.integers(0, h - ph))
        period, angle = rng.uniform(3, 10), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
        wave = 50 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        arr[y0 : y0 + ph, x0 : x0 + pw] += wave.astype(np.int16)[..., None]
    arr += rng.integers(-14, 15, arr.shape, dtype=np.int16)  # sensor noise
    return np.clip(arr, 0, 255).astype(np.uint8)


def camera_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of ``width`` x ``height`` with noise and fine detail everywhere."""
    rng = np.random.default_rng(seed)
    tile = _patch(1024, 768, rng)
    tile = np.concatenate([tile, tile[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)  # mirrored: no seams
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    img = Image.fromarray(np.ascontiguousarray(np.tile(tile, reps)[:height, :width]))
    draw = ImageDraw.Draw(img)
    for _ in range(60):  # large sharp-edged objects across the frame
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(width // 60 + 1, width // 4 + 2))
        y1 = y0 + int(rng.integers(height // 60 + 1, height // 4 + 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=_colour(rng))
    return img
