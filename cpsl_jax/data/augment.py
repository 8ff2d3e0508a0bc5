"""Device augmentation of the reference (PIL on the CPU there), batched, jittable, in JAX.

Three stages, each drawn once from a JAX key into a parameter record that moves every
map with the image (:mod:`cpsl_jax.data.transport`):

1. CIELAB colour transfer of source images (:mod:`cpsl_jax.data.color`).
2. Weak view (:func:`sample_weak`, :func:`weak_view`): ``w = int(U(0.5, 1.5) * 2200)``,
   ``h = int(w / (W0 / H0))``, PIL bilinear resize (antialiased: a triangle filter whose
   support grows with the shrink factor, Pillow's own coefficients), crop 512x896 at
   ``x1 = randint(0, w - 896)``, ``y1 = randint(0, h - 512)`` (inclusive), flip p=0.5,
   computed as one sampling grid on the full image.
3. Strong view of the weak crop (:func:`sample_strong`, :func:`strong_view`), the
   reference's ``RandAugmentMC(2, 10)``: flip p=0.5; PIL ``GaussianBlur(1)`` p=0.5;
   colour jitter (brightness, contrast, saturation 0.4, hue 0.4, order shuffled as
   torchvision) p=0.5; 2 ops drawn with replacement from the pool, magnitude
   ``randint(1, 10)``, each applied with p=0.5, fill 127, bilinear; cutout always
   (square of side ``min(h, w) // 3`` centred uniformly, clipped, fill 127).

Images follow PIL's 8-bit arithmetic: each stage works on 0..255 levels and rounds or
truncates where Pillow does (the kernels: :mod:`cpsl_jax.data.pil_ops`), so the output is
exact or within one level of PIL's.
Measured against Pillow 13 on random images (tests/test_data_augment*.py):

=====================  ==========================================================
stage / op             agreement with PIL (uint8 levels)
=====================  ==========================================================
weak view resize       max 1 level; >= 90% exact on noise, ~100% on smooth images
                       (float coefficients vs Pillow's 22-bit fixed point)
label nearest resize   exact but at ties of ``(p + .5) in / out`` (Pillow's double
                       accumulation): >= 95% on small images, ~99.9% at 1024x2048
Gaussian blur r=1      exact (Pillow's 3+3 extended-box passes in integer arithmetic)
brightness, color,     max 1 level, >= 99.5% exact (exact op by op; compiled, XLA fuses
contrast, sharpness    Pillow's rounded product and sum into an FMA)
autocontrast           max 1 level, >= 99% exact (exact rational LUT vs float64)
equalize, posterize,   exact
solarize, identity,
translate, cutout
hue (jitter)           exact (Pillow's float/double HSV arithmetic reproduced)
rotate, shear          max 1 level, >= 97% exact (float32 vs double positions: the
                       truncated blend lands on the other level)
jitter chain           >= 99.5% exact; a 1-level blend difference may move a hue bin
=====================  ==========================================================
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cpsl_jax.data import pil_ops
from cpsl_jax.data.color import lab_mean_std, lab_transfer
from cpsl_jax.data.transport import (GEOMETRIC_ORDER, NUM_OPS, OP, MAX_MAGNITUDE, StrongParams, WeakParams,
                                     _apply_axis, _magnitude_tables, _pil_bilinear_num_taps, full2weak,
                                     move_to_strong, move_to_weak, soft_label_to_weak, weak_taps)

__all__ = [
    "WeakParams", "StrongParams", "sample_weak", "weak_view", "sample_strong", "strong_view",
    "move_to_weak", "move_to_strong", "full2weak", "soft_label_to_weak", "lab_transfer", "lab_mean_std",
    "GEOMETRIC_ORDER",
]

FILL = 127.0  # grey fill of the reference's geometric ops and cutout


# --------------------------------------------------------------------------------------
# Weak view
# --------------------------------------------------------------------------------------


def sample_weak(key: jax.Array, batch: int, base_hw: Sequence[int] = (1024, 2048),
                crop_hw: Sequence[int] = (512, 896), base_width: int = 2200,
                scale: Sequence[float] = (0.5, 1.5)) -> WeakParams:
    """Draw the weak view of ``batch`` images: rescale, crop, flip (see :class:`WeakParams`).

    ``w = int(U(scale) * base_width)``; ``h = int(w / (W0 / H0))`` with the reference's
    double-precision division (a lookup table built here); ``x1 = randint(0, w - cw)`` and
    ``y1 = randint(0, h - ch)`` inclusive; flip with p=0.5.
    """
    base_h, base_w = int(base_hw[0]), int(base_hw[1])
    crop_h, crop_w = int(crop_hw[0]), int(crop_hw[1])
    w_min, w_max = int(scale[0] * base_width), int(scale[1] * base_width)
    prop = 1.0 * base_w / base_h
    h_table = np.array([int(w / prop) for w in range(w_min, w_max + 1)], np.int32)
    if w_min < crop_w or int(h_table[0]) < crop_h:
        raise ValueError(f"cpsl_jax/data/augment.py: the smallest rescaled image ({int(h_table[0])}x{w_min}) "
                         f"is smaller than the crop {crop_h}x{crop_w}")
    kw, kx, ky, kf = jax.random.split(key, 4)
    u = jax.random.uniform(kw, (batch,), minval=scale[0], maxval=scale[1])
    w = jnp.clip(jnp.floor(u * base_width).astype(jnp.int32), w_min, w_max)
    h = jnp.asarray(h_table)[w - w_min]
    x1 = jax.random.randint(kx, (batch,), 0, w - crop_w + 1)
    y1 = jax.random.randint(ky, (batch,), 0, h - crop_h + 1)
    flip = jax.random.bernoulli(kf, 0.5, (batch,))
    return WeakParams(w=w, h=h, x1=x1, y1=y1, flip=flip, base_hw=(base_h, base_w), crop_hw=(crop_h, crop_w))


def _levels(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 (0..255) or float ([0, 1]) images -> float32 levels 0..255."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32)
    return images.astype(jnp.float32) * 255.0


def weak_view(images: jnp.ndarray, params: WeakParams, quantize: bool = True) -> jnp.ndarray:
    """(B, H0, W0, 3) uint8 or float [0, 1] images -> (B, *crop_hw, 3) float32 in [0, 1].

    PIL bilinear resize to (h, w) (horizontal pass, 8-bit intermediate, vertical pass, as
    Pillow), crop, flip; evaluated only at the crop's pixels. ``quantize`` rounds to 8-bit
    levels where Pillow does (the reference feeds ``uint8 / 255`` to the network).
    """
    if images.ndim != 4 or tuple(images.shape[1:3]) != tuple(params.base_hw):
        raise ValueError(f"cpsl_jax/data/augment.py: images must be (B, {params.base_hw[0]}, "
                         f"{params.base_hw[1]}, C), got {images.shape}")
    # The rescaled image is never smaller than the crop: this bounds the kernel support.
    taps = (_pil_bilinear_num_taps(params.base_hw[0], params.crop_hw[0]),
            _pil_bilinear_num_taps(params.base_hw[1], params.crop_hw[1]))
    rows, cols = weak_taps(params, params.crop_hw, "pil_bilinear", num_taps=taps)
    x = _apply_axis(_levels(images), cols, 2)
    if quantize:
        x = pil_ops.round_levels(x)
    x = _apply_axis(x, rows, 1)
    if quantize:
        x = pil_ops.round_levels(x)
    return x / 255.0


# --------------------------------------------------------------------------------------
# Strong view: sampling
# --------------------------------------------------------------------------------------


def sample_strong(key: jax.Array, batch: int, crop_hw: Sequence[int] = (512, 896), n_ops: int = 2,
                  jitter: float = 0.4, max_magnitude: int = MAX_MAGNITUDE - 1, op_prob: float = 0.5,
                  blur_prob: float = 0.5, jitter_prob: float = 0.5, cutout: bool = True,
                  hue: float | None = None) -> StrongParams:
    """Draw the strong view of ``batch`` crops of size ``crop_hw`` (see :class:`StrongParams`).

    The defaults are the reference's: 2 RandAugment ops of magnitude 1..9, each applied with
    probability 0.5, blur and colour jitter (brightness, contrast and saturation factors in
    1 +- 0.4, hue shift within +-0.4) each with probability 0.5, and the cutout always.
    ``max_magnitude`` (1..9) caps the magnitudes; ``hue`` (default: ``min(0.5, jitter)``)
    bounds the hue shift alone; the probabilities and ``cutout=False`` make the view milder
    (``config.data.strong``).
    """
    if not 1 <= max_magnitude < MAX_MAGNITUDE:
        raise ValueError(f"max_magnitude must be in 1..{MAX_MAGNITUDE - 1}, got {max_magnitude}")
    crop_h, crop_w = int(crop_hw[0]), int(crop_hw[1])
    keys = jax.random.split(key, 12)
    flip = jax.random.bernoulli(keys[0], 0.5, (batch,))
    blur = jax.random.bernoulli(keys[1], blur_prob, (batch,))
    jit_on = jax.random.bernoulli(keys[2], jitter_prob, (batch,))
    order = jax.vmap(lambda k: jax.random.permutation(k, 4))(jax.random.split(keys[3], batch)).astype(jnp.int32)
    bcs = jax.random.uniform(keys[4], (batch, 3), minval=1.0 - jitter, maxval=1.0 + jitter)
    hue_max = min(0.5, jitter) if hue is None else float(hue)
    hue = jax.random.uniform(keys[5], (batch, 1), minval=-hue_max, maxval=hue_max)
    op = jax.random.randint(keys[6], (batch, n_ops), 0, NUM_OPS)  # random.choices: with replacement
    mag = jax.random.randint(keys[7], (batch, n_ops), 1, max_magnitude + 1)  # np.random.randint(1, 10)
    apply = jax.random.bernoulli(keys[8], op_prob, (batch, n_ops))
    sign = jnp.where(jax.random.bernoulli(keys[9], 0.5, (batch, n_ops)), -1, 1).astype(jnp.int32)
    # CutoutAbs(img, min(w, h) // 3): centre uniform in the image, box clipped at the borders.
    side = min(crop_h, crop_w) // 3
    cx = jax.random.uniform(keys[10], (batch,), minval=0.0, maxval=float(crop_w))
    cy = jax.random.uniform(keys[11], (batch,), minval=0.0, maxval=float(crop_h))
    x0 = jnp.floor(jnp.maximum(0.0, cx - side / 2.0)).astype(jnp.int32)
    y0 = jnp.floor(jnp.maximum(0.0, cy - side / 2.0)).astype(jnp.int32)
    x1 = jnp.minimum(crop_w, x0 + side)
    y1 = jnp.minimum(crop_h, y0 + side)
    if not cutout:  # an empty box: x1 < x0 covers no pixel, in the image or in the moved maps
        x0, y0 = jnp.full_like(x0, crop_w), jnp.full_like(y0, crop_h)
        x1, y1 = x0 - 2, y0 - 2
    return StrongParams(flip=flip, blur=blur, jitter=jit_on, jitter_order=order,
                        jitter_factors=jnp.concatenate([bcs, hue], axis=1).astype(jnp.float32),
                        op=op.astype(jnp.int32), mag=mag.astype(jnp.int32), sign=sign, apply=apply,
                        cutout=jnp.stack([x0, y0, x1, y1], axis=1).astype(jnp.int32),
                        crop_hw=(crop_h, crop_w))


# --------------------------------------------------------------------------------------
# Strong view: the drawn ops applied with Pillow's kernels (pil_ops.py)
# --------------------------------------------------------------------------------------


def _geometric_matrix(op, value, hw):
    """Pillow affine coefficients (6,) of the drawn op; identity for photometric ops."""
    h, w = float(hw[0]), float(hw[1])
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    value = value.astype(jnp.float32)
    # img.rotate(deg): angle = -radians(deg), centre (w/2, h/2), coefficients rounded to 15 digits.
    a = -value * (jnp.pi / 180.0)
    c, s = jnp.cos(a), jnp.sin(a)
    cx, cy = w / 2.0, h / 2.0
    rot = jnp.stack([c, s, c * -cx + s * -cy + cx, -s, c, -s * -cx + c * -cy + cy])
    mats = {
        "rotate": rot,
        "shear_x": jnp.stack([one, value, zero, zero, one, zero]),
        "shear_y": jnp.stack([one, zero, zero, value, one, zero]),
        "translate_x": jnp.stack([one, zero, value, zero, one, zero]),
        "translate_y": jnp.stack([one, zero, zero, zero, one, value]),
    }
    out = jnp.stack([one, zero, zero, zero, one, zero])
    for name, m in mats.items():
        out = jnp.where(op == OP[name], m, out)
    return out


def _photometric(img, op, mag, tables):
    """The pool's photometric op ``op`` (identity for the geometric ones), via ``lax.switch``."""
    enhance = jnp.asarray(tables["enhance"])[mag]
    branches = [
        pil_ops.autocontrast,
        lambda x: pil_ops.brightness(x, enhance),
        lambda x: pil_ops.color(x, enhance),
        lambda x: pil_ops.contrast(x, enhance),
        pil_ops.equalize,
        lambda x: x,
        lambda x: pil_ops.posterize(x, jnp.asarray(tables["posterize"])[mag]),
        lambda x: pil_ops.sharpness(x, enhance),
        lambda x: pil_ops.solarize(x, jnp.asarray(tables["solarize"])[mag]),
    ]
    index = jnp.select([op == OP["autocontrast"], op == OP["brightness"], op == OP["color"],
                        op == OP["contrast"], op == OP["equalize"], op == OP["posterize"],
                        op == OP["sharpness"], op == OP["solarize"]],
                       [0, 1, 2, 3, 4, 6, 7, 8], 5)
    return lax.switch(index, branches, img)


def _jitter(img, order, factors):
    """torchvision ``ColorJitter`` on a PIL image: the four adjustments in the drawn order."""
    branches = [
        lambda x: pil_ops.brightness(x, factors[0]),
        lambda x: pil_ops.contrast(x, factors[1]),
        lambda x: pil_ops.color(x, factors[2]),
        lambda x: pil_ops.hue(x, factors[3]),
    ]
    for k in range(4):
        img = lax.switch(order[k], branches, img)
    return img


def _strong_one(img, flip, blur, jit_on, order, factors, ops, mags, values, applies, box, tables):
    img = jnp.where(flip, img[:, ::-1], img)
    img = jnp.where(blur, pil_ops.gaussian_blur(img), img)
    img = jnp.where(jit_on, _jitter(img, order, factors), img)
    for k in range(ops.shape[0]):
        geo = pil_ops.affine(img, _geometric_matrix(ops[k], values[k], img.shape[:2]), FILL)
        out = _photometric(geo, ops[k], mags[k], tables)
        img = jnp.where(applies[k], out, img)
    return pil_ops.cutout(img, box, FILL)


def strong_view(images: jnp.ndarray, params: StrongParams) -> jnp.ndarray:
    """(B, h, w, 3) float [0, 1] weak crops -> (B, h, w, 3) float32 strong views in [0, 1].

    Values are taken as 8-bit levels (rounded), as the reference's PIL pipeline sees them.
    """
    if images.ndim != 4 or tuple(images.shape[1:3]) != tuple(params.crop_hw):
        raise ValueError(f"cpsl_jax/data/augment.py: images must be (B, {params.crop_hw[0]}, "
                         f"{params.crop_hw[1]}, 3), got {images.shape}")
    tables = _magnitude_tables(params.crop_hw)
    values = _slot_values(params, tables)
    img = pil_ops.round_levels(_levels(images))
    fn = lambda *a: _strong_one(*a, tables=tables)  # noqa: E731
    out = jax.vmap(fn)(img, params.flip, params.blur, params.jitter, params.jitter_order,
                       params.jitter_factors, params.op, params.mag, values, params.apply, params.cutout)
    return out / 255.0


def _slot_values(params: StrongParams, tables) -> jnp.ndarray:
    """Signed value (B, n) of each draw for the geometric ops (degrees, shear, pixels)."""
    mag, sign, op = params.mag, params.sign.astype(jnp.float32), params.op
    value = jnp.zeros(op.shape, jnp.float32)
    for name, table in (("rotate", "rotate"), ("shear_x", "shear"), ("shear_y", "shear"),
                        ("translate_x", "translate_x"), ("translate_y", "translate_y")):
        value = jnp.where(op == OP[name], jnp.asarray(tables[table], jnp.float32)[mag] * sign, value)
    return value
