"""How each domain looks: the rendered (game-like) source and the photo-like target.

``render_source`` paints flat per-class colours with a small per-instance jitter and clean
edges; ``render_target`` a shifted palette (``target_palette``), per-class textures, white
balance, saturation and contrast, lighting, vignetting, blur, exposure and sensor noise.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cpsl_jax.synthetic.geometry import Canvas, Rng

# Rendered (game-like) palette: saturated and clean. Rows: 19 classes then the extra keys.
_SOURCE_PALETTE = np.array([
    (80, 80, 86), (175, 162, 148), (152, 108, 84), (190, 178, 150), (125, 92, 62),
    (105, 105, 112), (45, 45, 38), (225, 190, 35), (55, 145, 40), (150, 175, 75),
    (105, 165, 240), (175, 70, 65), (200, 95, 45), (35, 70, 170), (175, 175, 188),
    (215, 125, 35), (95, 120, 160), (85, 40, 105), (150, 35, 45),
    (55, 80, 115), (235, 235, 228), (25, 25, 25), (215, 170, 140), (30, 30, 34),
], np.float32)
# Photo-like class colours at full domain shift (before ``render_target``'s photometric
# change). After that change several of them land on another class's source colour (sky on
# truck, people on fence): at full shift a source model is confidently wrong.
_PHOTO_PALETTE = np.array([
    (104, 100, 98), (160, 156, 160), (128, 112, 104), (170, 160, 140), (104, 96, 74),
    (120, 118, 112), (50, 50, 42), (200, 170, 70), (70, 122, 52), (140, 150, 88),
    (150, 182, 228), (120, 76, 80), (150, 86, 64), (58, 76, 130), (160, 160, 164),
    (190, 130, 60), (100, 116, 140), (78, 50, 90), (130, 58, 56),
    (66, 80, 100), (205, 205, 196), (30, 30, 30), (196, 156, 132), (22, 22, 26),
], np.float32)
# The photometric change of ``render_target``: white-balance gain (times U(0.95, 1.05) per
# channel), then saturation and contrast factors drawn uniformly from these ranges.
_GAIN = (1.04, 1.0, 0.93)
_SATURATION = (0.7, 0.85)
_CONTRAST = (0.8, 0.92)
DEFAULT_DOMAIN_SHIFT = 0.35


def target_palette(shift: float = DEFAULT_DOMAIN_SHIFT) -> np.ndarray:
    """The target's class colours before ``render_target``'s photometric change, (24, 3).

    After the mean photometric change each colour lands at ``source + shift * (tone - source)``:
    0 keeps the source colours (only the photometric change, textures, lighting and noise
    differ), 1 puts every class on its photo-like tone. At the default third of the way every
    class stays nearer its own source colour than any other class's (wall excepted, which
    lands near the source's sidewalk): a source model is uncertain on the target rather than
    confidently wrong, which is what self-training can correct.
    """
    # The mean photometric change as an affine map c -> c A^T + b (gain, then saturation
    # toward the grey level, then contrast toward 118).
    gain, sat, con = np.array(_GAIN), np.mean(_SATURATION), np.mean(_CONTRAST)
    a = con * (sat * np.diag(gain) + (1 - sat) * np.outer(np.ones(3), gain) / 3)
    b = 118.0 * (1 - con)
    source = _SOURCE_PALETTE.astype(np.float64)
    aim = source + float(shift) * (_PHOTO_PALETTE @ a.T + b - source)
    colours = np.linalg.solve(a, (aim - b).T).T
    return np.clip(np.round(colours), 0, 255).astype(np.float32)


# Target textures, per class (index 19 = ignore): amplitude of smooth luminance noise,
# of fine grain and of horizontal streaks (grey levels).
_TARGET_TEXTURE = np.array([
    (10, 6, 2), (10, 5, 6), (14, 5, 8), (10, 4, 3), (8, 10, 2), (6, 3, 0), (4, 3, 0),
    (6, 2, 0), (26, 18, 0), (18, 12, 0), (8, 1, 0), (14, 6, 0), (12, 6, 0), (8, 3, 0),
    (8, 3, 4), (8, 3, 4), (8, 3, 6), (8, 4, 0), (6, 4, 0), (4, 2, 0),
], np.float32)


def smooth_noise(h: int, w: int, cell: int, rng: Rng, channels: int = 1) -> np.ndarray:
    """Roughly unit-variance noise, smooth over ``cell`` pixels: (h, w, channels) float32.

    A coarse grid of normal draws, quantised to uint8 and upsampled by PIL bilinear.
    """
    grid = rng.standard_normal((h // cell + 2, w // cell + 2, channels), dtype=np.float32)
    grid = np.clip(128.0 + 40.0 * grid, 0, 255).astype(np.uint8)
    mode = 'RGB' if channels == 3 else 'L'
    img = Image.fromarray(grid if channels == 3 else grid[..., 0], mode)
    out = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32)
    return ((out - 128.0) / 40.0).reshape(h, w, channels)


def _blur3(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication: (h, w, c) -> (h, w, c)."""
    for axis in (0, 1):
        a = np.moveaxis(img, axis, 0)
        out = 0.5 * a
        out[1:] += 0.25 * a[:-1]
        out[:-1] += 0.25 * a[1:]
        out[0] += 0.25 * a[0]
        out[-1] += 0.25 * a[-1]
        img = np.moveaxis(out, 0, axis)
    return img


def render_source(cv: Canvas, rng: Rng) -> np.ndarray:
    """Game-like look: flat per-instance colours (palette + small jitter), clean edges."""
    n = len(cv.keys)
    keys = np.asarray(cv.keys)
    colours = _SOURCE_PALETTE[keys] * rng.uniform(0.9, 1.1, (n, 1))   # brightness jitter
    colours += rng.normal(0.0, 6.0, (n, 3))                           # hue jitter
    colours *= rng.uniform(0.92, 1.08)                                # time of day
    return np.clip(colours, 0, 255).astype(np.uint8)[cv.inst]


def render_target(cv: Canvas, label: np.ndarray, rng: Rng, palette: np.ndarray | None = None,
                  exposure: float = 1.0, texture: float = 1.0) -> np.ndarray:
    """Photo-like look: shifted palette, per-class textures, white balance, lower
    saturation and contrast, lighting gradient, vignetting, blur, exposure and sensor noise.

    ``palette``: the class colours (``target_palette()``); ``exposure`` scales every level
    before the sensor noise (< 1: darker photos than the rendered source); ``texture`` scales
    the per-class texture amplitudes (``_TARGET_TEXTURE``; 0: flat classes).
    """
    h, w = label.shape
    n = len(cv.keys)
    keys = np.asarray(cv.keys)
    palette = target_palette() if palette is None else palette
    colours = palette[keys] * rng.uniform(0.85, 1.15, (n, 1))
    colours += rng.normal(0.0, 9.0, (n, 3))
    img = colours.astype(np.float32)[cv.inst]
    # Per-class texture: smooth blotches, fine grain and horizontal streaks (grey levels).
    tex = np.float32(texture) * _TARGET_TEXTURE[np.minimum(label, 19)]  # (h, w, 3)
    lum = tex[..., 0] * smooth_noise(h, w, 6, rng)[..., 0]
    lum += tex[..., 1] * rng.standard_normal((h, w), dtype=np.float32)
    lum += tex[..., 2] * np.sin(np.arange(h, dtype=np.float32) * 2.1)[:, None]
    img += lum[..., None]
    img += 4.0 * smooth_noise(h, w, 24, rng, 3)
    # Global photometric change as one affine map per pixel: white balance (gain), then
    # saturation (towards the grey level), then contrast (towards 118).
    gain = np.array(_GAIN, np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    sat, con = np.float32(rng.uniform(*_SATURATION)), np.float32(rng.uniform(*_CONTRAST))
    img *= gain
    grey = img.mean(-1, keepdims=True)
    img *= con * sat
    img += con * (1 - sat) * grey + np.float32(118.0 * (1 - con))
    # Lighting: a linear gradient in a random direction and vignetting.
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h - 0.5
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w - 0.5
    ang = rng.uniform(0, 2 * np.pi)
    light = 1.0 + np.float32(0.25 * np.cos(ang)) * xx + np.float32(0.25 * np.sin(ang)) * yy
    light -= 0.35 * (xx * xx + yy * yy)
    img *= light[..., None]
    img = _blur3(img)
    if exposure != 1.0:  # the camera's exposure relative to the rendered look
        img *= np.float32(exposure)
    img += 3.0 * rng.standard_normal(img.shape, dtype=np.float32)    # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)

