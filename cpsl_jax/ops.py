"""Resizing operators shared by the whole project, with the reference's arithmetic.

Every resize inside the method is PyTorch's ``F.interpolate`` either bilinear with
``align_corners=True`` (logits, features, soft labels) or legacy ``nearest`` (labels).
They live here once so that the model, the method, the augmentation and the evaluation
agree bit for bit. Maps are NHWC (or HW, HWC: the two spatial axes are given by ``axes``).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jax import lax


def align_corners_coords(in_size: int, out_size: int) -> jnp.ndarray:
    """Source coordinates of ``out_size`` samples under ``align_corners=True``.

    Output index i maps to ``i * (in_size - 1) / (out_size - 1)`` (0 when out_size == 1).
    """
    if out_size == 1:
        return jnp.zeros((1,), jnp.float32)
    scale = (in_size - 1) / (out_size - 1)
    return jnp.arange(out_size, dtype=jnp.float32) * jnp.float32(scale)


def legacy_nearest_indices(in_size: int, out_size: int) -> jnp.ndarray:
    """Source indices of PyTorch's legacy ``nearest``: ``floor(i * in_size / out_size)``.

    PyTorch computes the scale in float32 as ``in/out`` and floors ``i * scale``; x0.25 on
    a size-4k axis picks pixels 0, 4, 8, ...
    """
    scale = jnp.float32(in_size / out_size)
    idx = jnp.floor(jnp.arange(out_size, dtype=jnp.float32) * scale).astype(jnp.int32)
    return jnp.minimum(idx, in_size - 1)


def sample_bilinear_1d(x: jnp.ndarray, coords: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Linear interpolation of ``x`` along ``axis`` at fractional ``coords`` (clamped to the edge)."""
    size = x.shape[axis]
    coords = jnp.clip(coords, 0.0, size - 1)
    lo = jnp.floor(coords).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, size - 1)
    frac = coords - lo.astype(coords.dtype)
    shape = [1] * x.ndim
    shape[axis] = coords.shape[0]
    frac = frac.reshape(shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else frac.reshape(shape)
    x_lo = jnp.take(x, lo, axis=axis)
    x_hi = jnp.take(x, hi, axis=axis)
    return x_lo + (x_hi - x_lo) * frac


def resize_bilinear(x: jnp.ndarray, out_hw: Sequence[int], axes: tuple[int, int] = (1, 2)) -> jnp.ndarray:
    """``F.interpolate(x, size=out_hw, mode='bilinear', align_corners=True)`` on NHWC maps.

    Separable: rows first, then columns, which is exactly bilinear interpolation.
    Floating-point inputs only.
    """
    h_axis, w_axis = axes
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    if x.shape[h_axis] != out_h:
        x = sample_bilinear_1d(x, align_corners_coords(x.shape[h_axis], out_h), h_axis)
    if x.shape[w_axis] != out_w:
        x = sample_bilinear_1d(x, align_corners_coords(x.shape[w_axis], out_w), w_axis)
    return x


def resize_nearest(x: jnp.ndarray, out_hw: Sequence[int], axes: tuple[int, int] = (1, 2)) -> jnp.ndarray:
    """``F.interpolate(x, size=out_hw, mode='nearest')`` (legacy nearest) on any dtype."""
    h_axis, w_axis = axes
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    if x.shape[h_axis] != out_h:
        x = jnp.take(x, legacy_nearest_indices(x.shape[h_axis], out_h), axis=h_axis)
    if x.shape[w_axis] != out_w:
        x = jnp.take(x, legacy_nearest_indices(x.shape[w_axis], out_w), axis=w_axis)
    return x


def l2_normalize(x: jnp.ndarray, axis: int = -1, eps: float = 1e-12) -> jnp.ndarray:
    """``F.normalize(x, dim=axis)``: x / max(||x||, eps).

    Written as ``x / sqrt(max(||x||^2, eps^2))``: the same values, and a finite gradient for an
    all-zero row (e.g. the prototype of a class never predicted), where sqrt's is not.
    """
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * lax.rsqrt(jnp.maximum(sq, eps * eps))


def conv_dilated_space_to_batch(x: jnp.ndarray, kernel: jnp.ndarray, rate: int, *, precision=None) -> jnp.ndarray:
    """A stride-1 'same' dilated convolution as a plain convolution over the input's phases.

    ``x`` NHWC, ``kernel`` HWIO with odd spatial size k, dilation ``rate``, padding
    ``rate * (k - 1) // 2`` (the network's convention). Output pixel ``(r*i + p, r*j + q)``
    only reads input pixels of the same phase ``(p, q)``, so the ``rate x rate`` phases
    become extra batch entries, one undilated convolution runs on all of them, and the
    result is interleaved back. Equal to ``lax.conv_general_dilated(..., rhs_dilation=rate)``;
    on GPUs where XLA lowers dilated convolutions as padded ones it is much faster.
    """
    from jax import lax

    n, h, w, c = x.shape
    k = kernel.shape[0]
    r = int(rate)
    hp, wp = -(-h // r) * r, -(-w // r) * r
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    # (n, hp/r, r, wp/r, r, c) -> (r, r, n, hp/r, wp/r, c): phase (p, q) = x[:, p::r, q::r].
    phases = x.reshape(n, hp // r, r, wp // r, r, c).transpose(2, 4, 0, 1, 3, 5)
    phases = phases.reshape(r * r * n, hp // r, wp // r, c)
    pad = (k - 1) // 2
    y = lax.conv_general_dilated(
        phases, kernel, (1, 1), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
    )
    o = y.shape[-1]
    y = y.reshape(r, r, n, hp // r, wp // r, o).transpose(2, 3, 0, 4, 1, 5).reshape(n, hp, wp, o)
    return y[:, :h, :w]
