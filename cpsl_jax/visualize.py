"""Colour-coded label maps and side-by-side panels (input | ground truth | predictions ...).

Class names and palettes are data: the 19 Cityscapes training classes and their official
colours; the 16- and 13-class sets (SYNTHIA -> Cityscapes) are the 19-class ones indexed by
the kept classes. Any label outside the palette (the ignore label 255 included) is black.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Names and colours are data of the label spaces, kept once in ``cpsl_jax.data.layouts``.
from cpsl_jax.data.layouts import CLASS_NAMES_19 as CITYSCAPES_CLASSES
from cpsl_jax.data.layouts import PALETTE_19 as CITYSCAPES_PALETTE
from cpsl_jax.data.layouts import class_names, palette  # noqa: F401  (re-exported)


def colorize(labels, colors: Optional[np.ndarray] = None) -> np.ndarray:
    """RGB image of a label map: (..., H, W) integers -> (..., H, W, 3) uint8.

    ``colors`` is an (N, 3) palette (default: the 19 Cityscapes colours); labels outside
    0..N-1, the ignore label among them, are black.
    """
    colors = CITYSCAPES_PALETTE if colors is None else np.asarray(colors, np.uint8)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'colorize: labels must be integers, got {labels.dtype}')
    lut = np.zeros((len(colors) + 1, 3), np.uint8)  # the last row is black for out-of-range
    lut[:len(colors)] = colors
    idx = np.where((labels >= 0) & (labels < len(colors)), labels, len(colors))
    return lut[idx]


def side_by_side(panels: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None,
                 gap: int = 4, title_height: int = 14) -> np.ndarray:
    """Panels (each (H, W, 3) or (H, W) uint8) next to each other on a white canvas.

    Panels of different heights are top-aligned; with ``titles`` a text strip is drawn above
    each panel.
    """
    if not panels:
        raise ValueError('side_by_side: no panels')
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f'side_by_side: {len(titles)} titles for {len(panels)} panels')
    rgb = []
    for p in panels:
        p = np.asarray(p)
        if p.ndim == 2:
            p = np.repeat(p[..., None], 3, axis=-1)
        if p.ndim != 3 or p.shape[-1] != 3:
            raise ValueError(f'side_by_side: panels must be (H, W, 3) or (H, W), got {p.shape}')
        rgb.append(p.astype(np.uint8))
    top = title_height if titles is not None else 0
    height = top + max(p.shape[0] for p in rgb)
    width = sum(p.shape[1] for p in rgb) + gap * (len(rgb) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for p in rgb:
        canvas[top:top + p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    if titles is None:
        return canvas
    # Titles are drawn on their own strip, so text never spills onto a panel.
    strip = Image.new('RGB', (width, top), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    x = 0
    for p, title in zip(rgb, titles):
        draw.text((x + 2, 1), str(title), fill=(0, 0, 0))
        x += p.shape[1] + gap
    canvas[:top] = np.asarray(strip)
    return canvas


def save_png(path: str, image: np.ndarray) -> None:
    """Writes an (H, W, 3) or (H, W) uint8 image as PNG, creating the folder."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f'save_png: {path}: expected uint8, got {image.dtype}')
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(path, format='PNG')
