"""Recorded augmentation parameters and the maps that move pixels with them.

Every augmentation of :mod:`cpsl_jax.data.augment` is drawn once into a parameter record
(:class:`WeakParams`, :class:`StrongParams`) and every image or map is moved with it, so
that labels, soft labels, features and scores follow the image exactly as in the reference.

Resampling is written as *composed coordinate maps*: along each spatial axis a resize is
a set of taps (source indices and weights) per output index; a chain of resizes, crops
and flips composes into one set of taps (the product of the per-step taps), evaluated
only at the output positions. Nothing of variable size (the rescaled image at (h, w)) is
ever built, so every shape is static and the whole batch is one jitted computation.

Conventions (all maps NHWC, batch first):
- ``align_corners`` bilinear: PyTorch ``F.interpolate(..., 'bilinear', align_corners=True)``.
- legacy nearest: PyTorch ``F.interpolate(..., 'nearest')``: source ``floor(i * in / out)``.
- PIL nearest resize: source ``floor((i + 0.5) * in / out)``, in exact integer arithmetic.
  (PIL accumulates the position in double precision; where ``(i + 0.5) * in / out`` is an
  exact integer it may pick the pixel before: a few columns per resize.)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cpsl_jax.ops import align_corners_coords, legacy_nearest_indices

# --------------------------------------------------------------------------------------
# Parameter records
# --------------------------------------------------------------------------------------


@struct.dataclass
class WeakParams:
    """Weak view of each image: rescale to (h, w), crop ``crop_hw`` at (y1, x1), flip.

    Arrays (B,): ``w``, ``h`` (int32: the rescaled size), ``x1``, ``y1`` (int32: crop
    corner in the rescaled image), ``flip`` (bool: horizontal flip after the crop).
    Static: ``base_hw`` (the full image the parameters refer to), ``crop_hw``.
    """
    w: jnp.ndarray
    h: jnp.ndarray
    x1: jnp.ndarray
    y1: jnp.ndarray
    flip: jnp.ndarray
    base_hw: tuple[int, int] = struct.field(pytree_node=False, default=(1024, 2048))
    crop_hw: tuple[int, int] = struct.field(pytree_node=False, default=(512, 896))


# RandAugment pool of the reference (FixMatch order); index = position.
OP_NAMES = ("autocontrast", "brightness", "color", "contrast", "equalize", "identity",
            "posterize", "rotate", "sharpness", "shear_x", "shear_y", "solarize",
            "translate_x", "translate_y")
OP = {name: i for i, name in enumerate(OP_NAMES)}
NUM_OPS = len(OP_NAMES)
# Geometric ops in the order the reference applies them to maps (after the flip).
GEOMETRIC_ORDER = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
MAX_MAGNITUDE = 10  # magnitudes are randint(1, 10) = 1..9 of 10


@struct.dataclass
class StrongParams:
    """Strong view of each weak crop (B images, ``n_ops`` RandAugment draws per image).

    ``flip``, ``blur``, ``jitter`` (B,) bool: whether each stage is applied.
    ``jitter_order`` (B, 4) int32: permutation of (brightness, contrast, saturation, hue).
    ``jitter_factors`` (B, 4) float32: brightness, contrast, saturation in [0.6, 1.4],
    hue in [-0.4, 0.4].
    ``op`` (B, n) int32 index into :data:`OP_NAMES`; ``mag`` (B, n) int32 in 1..9;
    ``sign`` (B, n) int32 +-1 (rotate, shear, translate); ``apply`` (B, n) bool.
    ``cutout`` (B, 4) int32: (x0, y0, x1, y1) as the reference's ``CutoutAbs`` records it.
    Static: ``crop_hw`` (the image size the parameters refer to).
    """
    flip: jnp.ndarray
    blur: jnp.ndarray
    jitter: jnp.ndarray
    jitter_order: jnp.ndarray
    jitter_factors: jnp.ndarray
    op: jnp.ndarray
    mag: jnp.ndarray
    sign: jnp.ndarray
    apply: jnp.ndarray
    cutout: jnp.ndarray
    crop_hw: tuple[int, int] = struct.field(pytree_node=False, default=(512, 896))


def _magnitude_tables(crop_hw: Sequence[int]) -> dict[str, np.ndarray]:
    """Value of each op per magnitude 0..9 with the reference's Python arithmetic.

    ``_float_parameter(v, max_v) = float(v) * max_v / 10``, ``_int_parameter = int(v * max_v / 10)``;
    enhance factors ``0.9 v / 10 + 0.05`` (0.14..0.86), posterize ``int(4 v / 10) + 4`` bits,
    rotate ``int(30 v / 10)`` degrees, shear ``0.3 v / 10``, solarize threshold
    ``256 - int(256 v / 10)``, translate ``int(+-0.3 v / 10 * size)`` pixels (truncated
    toward zero after the sign).
    """
    height, width = int(crop_hw[0]), int(crop_hw[1])
    v = range(MAX_MAGNITUDE)
    return {
        "enhance": np.array([float(m) * 0.9 / 10 + 0.05 for m in v], np.float32),
        "posterize": np.array([int(m * 4 / 10) + 4 for m in v], np.int32),
        "rotate": np.array([int(m * 30 / 10) for m in v], np.float32),
        "shear": np.array([float(m) * 0.3 / 10 for m in v], np.float32),
        "solarize": np.array([256 - int(m * 256 / 10) for m in v], np.int32),
        "translate_x": np.array([int(float(m) * 0.3 / 10 * width) for m in v], np.int32),
        "translate_y": np.array([int(float(m) * 0.3 / 10 * height) for m in v], np.int32),
    }


def op_values(params: StrongParams) -> dict[str, jnp.ndarray]:
    """Signed values (B, n) of the geometric draws: degrees, shear factors, pixel offsets."""
    tables = _magnitude_tables(params.crop_hw)
    sign = params.sign
    return {
        "rotate": jnp.asarray(tables["rotate"])[params.mag] * sign,
        "shear_x": jnp.asarray(tables["shear"])[params.mag] * sign,
        "shear_y": jnp.asarray(tables["shear"])[params.mag] * sign,
        "translate_x": jnp.asarray(tables["translate_x"])[params.mag] * sign,
        "translate_y": jnp.asarray(tables["translate_y"])[params.mag] * sign,
    }


def last_geometric(params: StrongParams) -> dict[str, tuple[jnp.ndarray, jnp.ndarray]]:
    """Per geometric op: (applied (B,) bool, value (B,)) of its **last** applied draw.

    The reference records the parameters in a dict keyed by op name, so an op drawn twice
    is applied twice to the image but only its last value reaches the maps.
    """
    values = op_values(params)
    out = {}
    for name in GEOMETRIC_ORDER:
        hit = params.apply & (params.op == OP[name])  # (B, n)
        slots = jnp.arange(hit.shape[1])[None, :]
        # Slot of the last hit, -1 when none (also when no op is drawn at all, ``data.strong.ops=0``).
        last = jnp.max(jnp.where(hit, slots, -1), axis=1, initial=-1)
        # Its value (0 when none; masked by `applied` anyway).
        value = jnp.sum(jnp.where(slots == last[:, None], values[name], 0), axis=1)
        out[name] = (last >= 0, value)
    return out


# --------------------------------------------------------------------------------------
# Taps: one axis of a (composed) resampling
# --------------------------------------------------------------------------------------
# A tap set is (idx, w): idx int32 (B, n, T) source indices along one axis, w float32
# (B, n, T) weights (None for nearest, T = 1). Composition multiplies weights and chains
# indices, so a chain of L bilinear steps has 2**L taps per axis.


def _static_taps(idx: np.ndarray | jnp.ndarray, w: np.ndarray | jnp.ndarray | None, batch: int):
    idx = jnp.broadcast_to(jnp.asarray(idx, jnp.int32), (batch,) + tuple(np.shape(idx)))
    if w is not None:
        w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (batch,) + tuple(np.shape(w)))
    return idx, w


def _linear_taps(coords: jnp.ndarray, size: int | jnp.ndarray):
    """Two taps of linear interpolation at fractional ``coords`` (clamped to [0, size-1])."""
    coords = jnp.clip(coords, 0.0, jnp.asarray(size, jnp.float32) - 1.0)
    lo = jnp.floor(coords)
    frac = coords - lo
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.asarray(size, jnp.int32) - 1)
    return jnp.stack([lo, hi], axis=-1), jnp.stack([1.0 - frac, frac], axis=-1)


def _align_corners_at(positions: jnp.ndarray, in_size: int, out_size: jnp.ndarray):
    """Taps of an ``align_corners`` resize in_size -> out_size (per image), at ``positions``.

    positions: (B, n) integer indices in the resized axis; out_size: (B,) int.
    Source coordinate ``p * (in - 1) / (out - 1)`` (PyTorch's scale, float32).
    """
    scale = (in_size - 1) / jnp.maximum(out_size.astype(jnp.float32) - 1.0, 1.0)
    coords = positions.astype(jnp.float32) * scale[:, None]
    return _linear_taps(coords, in_size)


def _compose(outer, inner_fn: Callable):
    """Chain taps: ``outer`` indexes an intermediate axis whose values are ``inner_fn(idx)``."""
    o_idx, o_w = outer
    i_idx, i_w = inner_fn(o_idx)  # (B, n, To, Ti)
    b, n = o_idx.shape[:2]
    idx = i_idx.reshape(b, n, -1)
    if o_w is None and i_w is None:
        return idx, None
    o_w = jnp.ones(o_idx.shape, jnp.float32) if o_w is None else o_w
    i_w = jnp.ones(i_idx.shape, jnp.float32) if i_w is None else i_w
    return idx, (o_w[..., None] * i_w).reshape(b, n, -1)


def _apply_axis(x: jnp.ndarray, taps, axis: int) -> jnp.ndarray:
    """Resample (B, H, W, C) ``x`` along spatial ``axis`` (1 or 2) with per-image taps."""
    idx, w = taps

    def one(xi, ii, wi):
        g = jnp.take(xi, ii, axis=axis - 1)  # rows: (n, T, W, C); cols: (H, n, T, C)
        if wi is None:
            return jnp.squeeze(g, axis=axis)
        wshape = (wi.shape + (1, 1)) if axis == 1 else ((1,) + wi.shape + (1,))
        return jnp.sum(g * wi.reshape(wshape).astype(g.dtype), axis=axis)

    if w is None:
        return jax.vmap(lambda xi, ii: one(xi, ii, None))(x, idx)
    return jax.vmap(one)(x, idx, w)


def apply_taps(x: jnp.ndarray, row_taps, col_taps) -> jnp.ndarray:
    """Separable resampling of (B, H, W, C) maps: rows then columns."""
    return _apply_axis(_apply_axis(x, row_taps, 1), col_taps, 2)


# --------------------------------------------------------------------------------------
# Weak view: positions in the rescaled image
# --------------------------------------------------------------------------------------


def _out_to_crop_taps(crop_n: int, out_n: int, method: str, batch: int):
    """Output index -> crop index taps (identity when sizes agree)."""
    if out_n == crop_n:
        return _static_taps(np.arange(crop_n)[:, None], None if method == "nearest" else np.ones((crop_n, 1)), batch)
    if method == "nearest":
        return _static_taps(np.asarray(legacy_nearest_indices(crop_n, out_n))[:, None], None, batch)
    idx, w = _linear_taps(align_corners_coords(crop_n, out_n), crop_n)
    return _static_taps(idx, w, batch)


def _crop_to_resized(idx: jnp.ndarray, offset: jnp.ndarray, flip: jnp.ndarray | None, crop_n: int):
    """Crop index -> index in the rescaled image (flip first undone, then the offset)."""
    if flip is not None:
        idx = jnp.where(flip[:, None, None], crop_n - 1 - idx, idx)
    return idx + offset[:, None, None]


def _pil_nearest(in_n: int, size: jnp.ndarray):
    """PIL nearest resize in_n -> size: source floor((p + 0.5) * in / size), exact integers."""
    def fn(p):
        src = ((2 * p + 1) * in_n) // (2 * size[:, None, None])
        return jnp.minimum(src, in_n - 1)[..., None], None
    return fn


def _pil_bilinear(in_n: int, size: jnp.ndarray, num_taps: int):
    """PIL's (antialiased) bilinear resize in_n -> size, as taps at resized positions.

    Pillow's ``precompute_coeffs``: ``scale = in / out``, ``support = max(scale, 1)``,
    centre ``(p + 0.5) * scale``, taps ``xmin = int(centre - support + 0.5)`` up to
    ``int(centre + support + 0.5)`` clipped to the image, weights
    ``triangle((x - centre + 0.5) / max(scale, 1))`` normalised to sum 1. When shrinking
    this is a triangle filter whose support grows with the shrink factor.
    """
    def fn(p):
        scale = (jnp.float32(in_n) / size.astype(jnp.float32))[:, None, None]
        fscale = jnp.maximum(scale, 1.0)
        center = (p.astype(jnp.float32) + 0.5) * scale
        xmin = jnp.maximum(jnp.floor(center - fscale + 0.5), 0.0)
        xmax = jnp.minimum(jnp.floor(center + fscale + 0.5), jnp.float32(in_n))
        k = jnp.arange(num_taps, dtype=jnp.float32)
        src = xmin[..., None] + k
        valid = src < xmax[..., None]
        w = jnp.maximum(1.0 - jnp.abs((src - center[..., None] + 0.5) / fscale[..., None]), 0.0)
        w = jnp.where(valid, w, 0.0)
        w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-12)
        return jnp.minimum(src, in_n - 1).astype(jnp.int32), w
    return fn


def _pil_bilinear_num_taps(in_n: int, min_size: int) -> int:
    """Static tap count covering Pillow's kernel at the strongest shrink."""
    support = max(in_n / max(min_size, 1), 1.0)
    return int(math.ceil(support)) * 2 + 1


def weak_taps(params: WeakParams, out_hw: Sequence[int], kind: str, in_hw: Sequence[int] | None = None,
              num_taps: tuple[int, int] | None = None):
    """Row and column taps from an (in_hw) full-image grid to the weak crop at ``out_hw``.

    kind: 'pil_bilinear' (the image: PIL resize), 'nearest' (labels: PIL nearest resize
    then legacy nearest to ``out_hw``), 'bilinear' (maps: align_corners resize to (h, w),
    crop, flip, align_corners resize to ``out_hw``).
    """
    in_hw = tuple(params.base_hw) if in_hw is None else tuple(in_hw)
    crop_h, crop_w = params.crop_hw
    batch = params.w.shape[0]
    out_method = "nearest" if kind == "nearest" else "bilinear"
    rows = _out_to_crop_taps(crop_h, int(out_hw[0]), out_method, batch)
    cols = _out_to_crop_taps(crop_w, int(out_hw[1]), out_method, batch)
    rows = (_crop_to_resized(rows[0], params.y1, None, crop_h), rows[1])
    cols = (_crop_to_resized(cols[0], params.x1, params.flip, crop_w), cols[1])
    if kind == "pil_bilinear":
        th, tw = num_taps
        row_fn = _pil_bilinear(in_hw[0], params.h, th)
        col_fn = _pil_bilinear(in_hw[1], params.w, tw)
    elif kind == "nearest":
        row_fn, col_fn = _pil_nearest(in_hw[0], params.h), _pil_nearest(in_hw[1], params.w)
    elif kind == "bilinear":
        row_fn = _lifted_align_corners(in_hw[0], params.h)
        col_fn = _lifted_align_corners(in_hw[1], params.w)
    else:
        raise ValueError(f"cpsl_jax/data/transport.py: unknown kind {kind!r}")
    return _compose(rows, row_fn), _compose(cols, col_fn)


def _lifted_align_corners(in_n: int, size: jnp.ndarray) -> Callable:
    """``_align_corners_at`` for (B, n, To) positions -> (B, n, To, 2) taps."""
    def fn(p):
        idx, w = _align_corners_at(p.reshape(p.shape[0], -1), in_n, size)
        return idx.reshape(p.shape + (2,)), w.reshape(p.shape + (2,))
    return fn


def _check_maps(maps: jnp.ndarray, name: str, batch: int, hw: Sequence[int] | None = None) -> None:
    if maps.ndim != 4 or maps.shape[0] != batch:
        raise ValueError(f"cpsl_jax/data/transport.py: {name} must be (B={batch}, H, W, K), got {maps.shape}")
    if hw is not None and tuple(maps.shape[1:3]) != tuple(hw):
        raise ValueError(f"cpsl_jax/data/transport.py: {name} must be {tuple(hw)} spatially, got {maps.shape[1:3]}")


def move_to_weak(maps: jnp.ndarray, params: WeakParams, out_hw: Sequence[int],
                 method: str = "nearest") -> jnp.ndarray:
    """Move full-image maps (B, Hm, Wm, K) onto the weak crop at ``out_hw`` -> (B, *out_hw, K).

    The map covers the whole base image at any resolution. ``'nearest'`` (labels, any dtype):
    PIL nearest resize to (h, w), crop, flip, then legacy nearest to ``out_hw`` (the
    reference's label path, e.g. ``x0.25`` to 128x224). ``'bilinear'`` (soft labels,
    features, float): align_corners resize to (h, w), crop, flip, align_corners resize to
    ``out_hw`` (the reference's soft-label path once the map is at base size).
    """
    _check_maps(maps, "maps", params.w.shape[0])
    if method not in ("nearest", "bilinear"):
        raise ValueError(f"cpsl_jax/data/transport.py: method must be 'nearest' or 'bilinear', got {method!r}")
    if method == "bilinear" and not jnp.issubdtype(maps.dtype, jnp.floating):
        raise ValueError("cpsl_jax/data/transport.py: bilinear transport needs floating-point maps")
    rows, cols = weak_taps(params, out_hw, method, in_hw=maps.shape[1:3])
    return apply_taps(maps, rows, cols)


def full2weak(maps: jnp.ndarray, params: WeakParams) -> jnp.ndarray:
    """The reference's ``full2weak`` for teacher maps at 1/4 of the base image.

    (B, H0/4, W0/4, K) -> bilinear align_corners to (int(h/4), int(w/4)) -> crop at
    (int(y1/4), int(x1/4)) of size crop/4 -> flip. Returns (B, crop_h/4, crop_w/4, K).
    """
    base_h, base_w = params.base_hw
    _check_maps(maps, "maps", params.w.shape[0], (base_h // 4, base_w // 4))
    crop_h, crop_w = params.crop_hw[0] // 4, params.crop_hw[1] // 4
    batch = params.w.shape[0]

    def axis_taps(n, offset, size, in_n, flip):
        idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], (batch, n))
        if flip is not None:
            idx = jnp.where(flip[:, None], n - 1 - idx, idx)
        pos = idx + offset[:, None] // 4
        return _align_corners_at(pos, in_n, size // 4)

    rows = axis_taps(crop_h, params.y1, params.h, maps.shape[1], None)
    cols = axis_taps(crop_w, params.x1, params.w, maps.shape[2], params.flip)
    return apply_taps(maps, rows, cols)


def soft_label_to_weak(soft: jnp.ndarray, params: WeakParams, out_hw: Sequence[int] | None = None) -> jnp.ndarray:
    """The reference's soft pseudo-label path, as one composed coordinate map.

    Stored (B, 129, 257, C) -> bilinear (align_corners) to the base size -> to (h, w) ->
    crop -> flip -> bilinear (align_corners) to ``out_hw`` (default crop/4: the
    ``scale_factor=0.25`` resize). Three bilinear steps: 8 taps per axis, 64 per pixel.
    """
    _check_maps(soft, "soft", params.w.shape[0])
    if out_hw is None:
        out_hw = (params.crop_hw[0] // 4, params.crop_hw[1] // 4)
    base_h, base_w = params.base_hw
    rows, cols = weak_taps(params, out_hw, "bilinear", in_hw=(base_h, base_w))

    def base_to_stored(stored_n: int, base_n: int) -> Callable:
        # Taps of the first resize (stored -> base size) are static: look them up.
        c_idx, c_w = _linear_taps(align_corners_coords(stored_n, base_n), stored_n)  # (base_n, 2)
        return lambda p: (c_idx[p], c_w[p])

    rows = _compose(rows, base_to_stored(soft.shape[1], base_h))
    cols = _compose(cols, base_to_stored(soft.shape[2], base_w))
    return apply_taps(soft, rows, cols)


# --------------------------------------------------------------------------------------
# Strong view: the reference's ``label_strong_T``
# --------------------------------------------------------------------------------------


def _theta(name: str, value: jnp.ndarray, hw: Sequence[int], translate_quirk: bool) -> jnp.ndarray:
    """The reference's ``affine_sample`` matrix (normalised coordinates) for one op, (2, 3)."""
    h, w = float(hw[0]), float(hw[1])
    one, zero = jnp.ones_like(value), jnp.zeros_like(value)
    if name == "rotate":
        a = value / 180.0 * jnp.pi
        c, s = jnp.cos(a), jnp.sin(a)
        return jnp.stack([jnp.stack([c, -s * h / w, zero]), jnp.stack([s * w / h, c, zero])])
    if name == "shear_x":
        return jnp.stack([jnp.stack([one, value * h / w, value * h / w]), jnp.stack([zero, one, zero])])
    if name == "shear_y":
        return jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([value * w / h, one, value * w / h])])
    if name == "translate_x":
        # quirk: the reference divides the x offset by H (not W): maps move by v * W / H.
        return jnp.stack([jnp.stack([one, zero, 2.0 * value / (h if translate_quirk else w)]),
                          jnp.stack([zero, one, zero])])
    if name == "translate_y":
        return jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([zero, one, 2.0 * value / h])])
    raise ValueError(name)


def _nearest_affine(m: jnp.ndarray, valid: jnp.ndarray, theta: jnp.ndarray):
    """``grid_sample(m, affine_grid(theta), 'nearest', zeros, align_corners=False)`` on (H, W, K)."""
    h, w = m.shape[:2]
    xs = (2.0 * jnp.arange(w, dtype=jnp.float32) + 1.0) / w - 1.0
    ys = (2.0 * jnp.arange(h, dtype=jnp.float32) + 1.0) / h - 1.0
    gx = theta[0, 0] * xs[None, :] + theta[0, 1] * ys[:, None] + theta[0, 2]
    gy = theta[1, 0] * xs[None, :] + theta[1, 1] * ys[:, None] + theta[1, 2]
    ix = jnp.round(((gx + 1.0) * w - 1.0) / 2.0)  # nearbyint: half to even, as PyTorch
    iy = jnp.round(((gy + 1.0) * h - 1.0) / 2.0)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    ixc = jnp.clip(ix, 0, w - 1).astype(jnp.int32)
    iyc = jnp.clip(iy, 0, h - 1).astype(jnp.int32)
    new_valid = inside & valid[iyc, ixc]
    return m[iyc, ixc], new_valid


def move_to_strong(maps: jnp.ndarray, params: StrongParams, *, translate_quirk: bool = True,
                   fill: float | int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The reference's ``label_strong_T``: move weak-crop maps (B, h, w, K) onto the strong view.

    Maps sit at 1/4 of the crop (128x224 for 512x896), any dtype (labels, cosine scores:
    the reference moves both with this nearest transport). Geometric ops are applied in
    the fixed order flip, shear-x, shear-y, translate-x, translate-y, rotate, cutout,
    whatever order the image got; an op drawn twice moves the map once, with its last
    value; nearest sampling with zero padding (outside -> invalid); translation and the
    cutout box are divided by 4 with floor division (``int(v // 4)``).
    ``translate_quirk`` (default, as the reference): the x offset is normalised by the
    height, so maps move by ``v * W / H``; ``False`` gives the exact transport.
    Returns (maps with ``fill`` where invalid, valid (B, h, w) bool).
    """
    batch = params.flip.shape[0]
    _check_maps(maps, "maps", batch)
    hw = maps.shape[1:3]
    scale_h = params.crop_hw[0] // hw[0]
    scale_w = params.crop_hw[1] // hw[1]
    if scale_h != scale_w or scale_h * hw[0] != params.crop_hw[0]:
        raise ValueError(f"cpsl_jax/data/transport.py: maps {tuple(hw)} must be crop {params.crop_hw} / integer")
    scale = scale_h
    geo = last_geometric(params)
    thetas, applied = [], []
    for name in GEOMETRIC_ORDER:
        on, value = geo[name]
        value = value.astype(jnp.float32)
        if name.startswith("translate"):
            value = jnp.floor(value / scale)  # int(v // 4), Python floor division
        thetas.append(jax.vmap(lambda v, n=name: _theta(n, v, hw, translate_quirk))(value))
        applied.append(on)
    thetas = jnp.stack(thetas, axis=1)  # (B, 5, 2, 3)
    applied = jnp.stack(applied, axis=1)  # (B, 5)
    box = jnp.floor_divide(params.cutout, scale)  # x0, y0, x1, y1

    def one(m, flip, th, on, bx):
        m = jnp.where(flip, m[:, ::-1], m)
        valid = jnp.ones(m.shape[:2], bool)
        for k in range(len(GEOMETRIC_ORDER)):
            m2, v2 = _nearest_affine(m, valid, th[k])
            m = jnp.where(on[k], m2, m)
            valid = jnp.where(on[k], v2, valid)
        yy = jnp.arange(hw[0])[:, None]
        xx = jnp.arange(hw[1])[None, :]
        in_box = (yy >= bx[1]) & (yy < bx[3]) & (xx >= bx[0]) & (xx < bx[2])
        valid = valid & ~in_box
        return jnp.where(valid[..., None], m, jnp.asarray(fill, m.dtype)), valid

    return jax.vmap(one)(maps, params.flip, thetas, applied, box)
