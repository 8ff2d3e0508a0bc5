"""Pillow's 8-bit image operations in JAX, on one (H, W, 3) image of float32 levels 0..255.

The kernels of the strong view (``augment.py``): ``ImageEnhance`` (brightness, color,
contrast, sharpness), ``ImageOps`` (autocontrast, equalize, posterize, solarize),
torchvision's PIL hue shift, ``GaussianBlur``, ``transform(AFFINE, BILINEAR)`` and the
cutout rectangle. Each rounds or truncates where Pillow does; the agreement of each op
with Pillow is tabled in ``augment.py``'s docstring. The private helpers reproduce C's
float/double rounding where XLA would otherwise simplify it away.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def round_levels(x: jnp.ndarray) -> jnp.ndarray:
    """Round half up and clip to 0..255, as Pillow stores a resampled value."""
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def _blend(degenerate: jnp.ndarray, img: jnp.ndarray, alpha: jnp.ndarray) -> jnp.ndarray:
    """``Image.blend(degenerate, img, alpha)``: ``in1 + alpha (in2 - in1)``, clipped, truncated."""
    # Pillow rounds the product before the sum; XLA fuses the two into an FMA (one
    # rounding), so about 0.1% of values land one level off when compiled.
    return jnp.clip(jnp.floor(degenerate + alpha * (img - degenerate)), 0.0, 255.0)


def _luma(img: jnp.ndarray) -> jnp.ndarray:
    """``convert('L')``: (R 19595 + G 38470 + B 7471 + 2**15) >> 16, as (H, W, 1) levels."""
    q = img.astype(jnp.int32)
    lum = (q[..., 0] * 19595 + q[..., 1] * 38470 + q[..., 2] * 7471 + 32768) >> 16
    return lum.astype(jnp.float32)[..., None]


def brightness(img, f):
    """``ImageEnhance.Brightness(img).enhance(f)``: blend with black."""
    return _blend(jnp.zeros_like(img), img, f)


def color(img, f):
    """``ImageEnhance.Color(img).enhance(f)``: blend with the grey (L) image."""
    return _blend(_luma(img), img, f)


def contrast(img, f):
    """``ImageEnhance.Contrast(img).enhance(f)``: blend with the mean grey level."""
    # ImageEnhance.Contrast: degenerate = int(mean of the L image + 0.5), integer-exact here.
    lum = _luma(img).astype(jnp.int32)
    n = lum.size
    mean = (2 * jnp.sum(lum) + n) // (2 * n)
    return _blend(jnp.full_like(img, mean.astype(jnp.float32)), img, f)


def _smooth(img):
    """``ImageFilter.SMOOTH`` (3x3, centre 5, others 1, /13); border pixels copied."""
    pad = jnp.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    acc = jnp.zeros_like(img)
    for dy in range(3):
        for dx in range(3):
            wgt = 5.0 if (dy == 1 and dx == 1) else 1.0
            acc = acc + (wgt / 13.0) * pad[dy:dy + h, dx:dx + w]
    out = jnp.clip(jnp.floor(acc + 0.5), 0.0, 255.0)
    yy = jnp.arange(h)[:, None, None]
    xx = jnp.arange(w)[None, :, None]
    border = (yy == 0) | (yy == h - 1) | (xx == 0) | (xx == w - 1)
    return jnp.where(border, img, out)


def sharpness(img, f):
    """``ImageEnhance.Sharpness(img).enhance(f)``: blend with the SMOOTH-filtered image."""
    return _blend(_smooth(img), img, f)


def autocontrast(img):
    """``ImageOps.autocontrast`` (cutoff 0) per channel: LUT ``int(i * scale + offset)``."""
    lo = jnp.min(img, axis=(0, 1))
    hi = jnp.max(img, axis=(0, 1))
    # Exact rational LUT floor((i - lo) * 255 / (hi - lo)); Pillow's double arithmetic can
    # land just below an exact integer (about 0.4% of LUT entries one level lower).
    span = jnp.maximum(hi - lo, 1.0).astype(jnp.int32)
    out = (((img - lo).astype(jnp.int32) * 255) // span).astype(jnp.float32)
    out = jnp.clip(out, 0.0, 255.0)
    return jnp.where(hi > lo, out, img)


def _equalize_channel(ch: jnp.ndarray) -> jnp.ndarray:
    """``ImageOps.equalize`` on one (H, W) channel of levels."""
    q = ch.astype(jnp.int32)
    hist = jnp.zeros((256,), jnp.int32).at[q.reshape(-1)].add(1)
    nonzero = hist > 0
    last = jnp.max(jnp.where(nonzero, jnp.arange(256), -1))
    step = (q.size - hist[last]) // 255
    cum = jnp.cumsum(hist) - hist  # exclusive
    lut = (step // 2 + cum) // jnp.maximum(step, 1)
    lut = jnp.clip(lut, 0, 255)
    keep = (jnp.sum(nonzero) <= 1) | (step == 0)
    return jnp.where(keep, ch, lut[q].astype(jnp.float32))


def equalize(img):
    """``ImageOps.equalize``, channel by channel."""
    return jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(img)


def posterize(img, bits):
    """``ImageOps.posterize(img, bits)``: keep the top ``bits`` bits of each level."""
    div = jnp.left_shift(1, 8 - bits).astype(jnp.float32)
    return jnp.floor(img / div) * div


def solarize(img, threshold):
    """``ImageOps.solarize(img, threshold)``: invert the levels >= ``threshold``."""
    return jnp.where(img >= threshold.astype(jnp.float32), 255.0 - img, img)


def _div(a: jnp.ndarray, c: float) -> jnp.ndarray:
    """IEEE ``a / c``: XLA turns a division by a constant into a product with its
    reciprocal (not correctly rounded), which moves values across Pillow's truncations."""
    return a / lax.optimization_barrier(jnp.full_like(a, c))


def _two_sum(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Error-free ``a + b = s + e``; barriers stop XLA from simplifying ``(a + b) - a`` to ``b``."""
    s = lax.optimization_barrier(a + b)
    bb = lax.optimization_barrier(s - a)
    return s, (a - (s - bb)) + (b - bb)


def _sum3(c: float, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``float(c + a + b)`` as C's double sum of floats rounded once to float."""
    s, e1 = _two_sum(jnp.full_like(a, c), a)
    t, e2 = _two_sum(s, b)
    return t + (e1 + e2)


def _floor_times_255(x: jnp.ndarray) -> jnp.ndarray:
    """``floor(x * 255)`` of the exact product (as C's double product of a float), in float32.

    The float32 product may round up onto an integer; ``256 x - floor(p)`` is exact
    (Sterbenz), so the exact product ``256 x - x`` lies below ``floor(p)`` iff it is < x.
    """
    fp = lax.optimization_barrier(jnp.floor(x * 255.0))
    return jnp.where(x * 256.0 - fp < x, fp - 1.0, fp)


def _rgb_to_hsv_pil(img):
    """Pillow's RGB -> HSV (8-bit H, S, V), following its ``rgb2hsv_row``."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc = jnp.maximum(r, jnp.maximum(g, b))
    minc = jnp.minimum(r, jnp.minimum(g, b))
    cr = jnp.maximum(maxc - minc, 1.0)
    s = cr / jnp.maximum(maxc, 1.0)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    # C evaluates ``2.0 + rc - bc`` in double and stores a float: one rounding, kept here
    # with an error-free sum of the constant and the first term.
    h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, _sum3(2.0, rc, -bc), _sum3(4.0, gc, -rc)))
    # Pillow: fmod(h / 6.0 + 1.0, 1.0) in double, stored as float; (int)(h * 255.0) in double.
    q = _div(h, 6.0)
    q = lax.optimization_barrier(q)
    rem = (h - 4.0 * q) - 2.0 * q  # exact remainder of the float32 division (Sterbenz)
    h = jnp.where(q < 0.0, _sum3(1.0, q, _div(rem, 6.0)), q)
    grey = maxc == minc
    uh = jnp.where(grey, 0.0, jnp.clip(_floor_times_255(h), 0.0, 255.0))
    us = jnp.where(grey, 0.0, jnp.clip(_floor_times_255(s), 0.0, 255.0))
    return uh, us, maxc


def _hsv_to_rgb_pil(h, s, v):
    """Pillow's HSV -> RGB (``hsv2rgb``): C ``round`` (half away from zero) of p, q, t."""
    i = jnp.floor(_div(h * 6.0, 255.0))
    f = _div(h * 6.0, 255.0) - i
    fs = f * s
    p = jnp.clip(jnp.floor(_div(v * (255.0 - s), 255.0) + 0.5), 0.0, 255.0)
    q = jnp.clip(jnp.floor(_div(v * (255.0 - fs), 255.0) + 0.5), 0.0, 255.0)
    t = jnp.clip(jnp.floor(_div(v * (255.0 - s + fs), 255.0) + 0.5), 0.0, 255.0)
    sector = jnp.mod(i, 6.0).astype(jnp.int32)
    choices_r = jnp.stack([v, q, p, p, t, v])
    choices_g = jnp.stack([t, v, v, q, p, p])
    choices_b = jnp.stack([p, p, t, v, v, q])
    pick = lambda c: jnp.take_along_axis(c, sector[None], axis=0)[0]  # noqa: E731
    rgb = jnp.stack([pick(choices_r), pick(choices_g), pick(choices_b)], axis=-1)
    return jnp.where((s == 0)[..., None], v[..., None], rgb)


def hue(img, factor):
    """torchvision ``adjust_hue`` on a PIL image: HSV, H += uint8(factor * 255) mod 256, back."""
    h, s, v = _rgb_to_hsv_pil(img)
    shift = jnp.trunc(factor * 255.0)
    h = jnp.mod(h + shift, 256.0)
    return _hsv_to_rgb_pil(h, s, v)


def _box_blur_pass(x: jnp.ndarray, axis: int, ww: int, fw: int) -> jnp.ndarray:
    """One pass of Pillow's extended box blur of radius < 1 along ``axis`` (uint32, exact)."""
    n = x.shape[axis]
    left = jnp.take(x, jnp.maximum(jnp.arange(n) - 1, 0), axis=axis)
    right = jnp.take(x, jnp.minimum(jnp.arange(n) + 1, n - 1), axis=axis)
    acc = x * jnp.uint32(ww) + (left + right) * jnp.uint32(fw) + jnp.uint32(1 << 23)
    return acc >> 24


def _box_blur_weights(radius: float, passes: int = 3) -> tuple[int, int]:
    """Pillow's ``_gaussian_blur_radius`` and ``ImagingLineBoxBlur`` weights, in C float."""
    f32 = np.float32
    sigma2 = f32(radius) * f32(radius) / f32(passes)
    big_l = f32(np.sqrt(f32(12.0) * sigma2 + f32(1.0)))
    small_l = f32(np.floor((big_l - f32(1.0)) / f32(2.0)))
    a = (f32(2) * small_l + f32(1)) * (small_l * (small_l + f32(1)) - f32(3) * sigma2)
    a = a / (f32(6) * (sigma2 - (small_l + f32(1)) * (small_l + f32(1))))
    box_radius = f32(small_l + a)
    if int(box_radius) != 0:
        raise NotImplementedError("cpsl_jax/data/pil_ops.py: only blur radii whose box radius is < 1")
    ww = int(f32(1 << 24) / (box_radius * f32(2) + f32(1)))
    fw = ((1 << 24) - ww) // 2
    return ww, fw


_BLUR_WW, _BLUR_FW = _box_blur_weights(1.0)


def gaussian_blur(img):
    """``ImageFilter.GaussianBlur(1)``: Pillow's 3 horizontal + 3 vertical box passes, 8-bit each."""
    x = img.astype(jnp.uint32)
    for axis in (1, 1, 1, 0, 0, 0):
        x = _box_blur_pass(x, axis, _BLUR_WW, _BLUR_FW)
    return x.astype(jnp.float32)


def affine(img, mat, fill: float):
    """Pillow ``transform(AFFINE, mat, BILINEAR, fillcolor)``: output (x+.5, y+.5) -> input."""
    h, w = img.shape[:2]
    xo = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
    yo = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
    xin = mat[0] * xo + mat[1] * yo + mat[2]
    yin = mat[3] * xo + mat[4] * yo + mat[5]
    outside = (xin < 0.0) | (xin >= w) | (yin < 0.0) | (yin >= h)
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = jnp.floor(xs), jnp.floor(ys)
    dx, dy = (xs - x0)[..., None], (ys - y0)[..., None]
    x0i = x0.astype(jnp.int32)
    y0i = y0.astype(jnp.int32)
    xa, xb = jnp.clip(x0i, 0, w - 1), jnp.clip(x0i + 1, 0, w - 1)
    ya = jnp.clip(y0i, 0, h - 1)
    yb_ok = ((y0i + 1) >= 0) & ((y0i + 1) < h)
    yb = jnp.clip(y0i + 1, 0, h - 1)
    v1 = img[ya, xa] + (img[ya, xb] - img[ya, xa]) * dx
    v2 = img[yb, xa] + (img[yb, xb] - img[yb, xa]) * dx
    v2 = jnp.where(yb_ok[..., None], v2, v1)
    v = jnp.floor(v1 + (v2 - v1) * dy)
    return jnp.where(outside[..., None], jnp.float32(fill), jnp.clip(v, 0.0, 255.0))


def cutout(img, box, fill: float):
    """``ImageDraw.rectangle((x0, y0, x1, y1), fill)``: both corners inclusive, clipped."""
    h, w = img.shape[:2]
    yy = jnp.arange(h)[:, None]
    xx = jnp.arange(w)[None, :]
    inside = (xx >= box[0]) & (xx <= box[2]) & (yy >= box[1]) & (yy <= box[3])
    return jnp.where(inside[..., None], jnp.float32(fill), img)
