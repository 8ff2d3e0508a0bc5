"""CutMix of the weak target crop with the source crop (CPSL stage 1, step 2).

The reference (``rand_bbox`` with area fraction 0.5 and a random aspect ratio) draws one box
per iteration, shared by the whole batch, and applies it with probability 0.5 (one host coin):
h_frac = 0.5 ** u, w_frac = 0.5 / h_frac (u ~ U(0, 1)); size = round(frac * dim);
start = round((dim - size) * U(0, 1)) per axis. Image i's box content comes from source
image i. Labels: the reference upsamples the 1/4 label x4 (nearest), pastes the
full-resolution source label and downsamples x0.25 (nearest), i.e. low-resolution pixel
(i, j) takes the source label at full-resolution pixel (4i, 4j) when that pixel is in the
box. ``box_mask`` evaluates the box at any resolution with PyTorch's legacy-nearest
coordinates, so one function serves the image (full resolution) and every map.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from cpsl_jax.ops import legacy_nearest_indices


def box_from_uniforms(
    u_aspect: jnp.ndarray, u_y: jnp.ndarray, u_x: jnp.ndarray, hw: Sequence[int], area: float = 0.5
) -> jnp.ndarray:
    """(4,) int32 box ``(y0, x0, y1, x1)`` (end exclusive) from three U(0, 1) draws."""
    h, w = int(hw[0]), int(hw[1])
    h_frac = jnp.exp(u_aspect * jnp.log(area))  # area ** u
    w_frac = area / h_frac
    size_y, size_x = jnp.round(h_frac * h), jnp.round(w_frac * w)
    y0, x0 = jnp.round((h - size_y) * u_y), jnp.round((w - size_x) * u_x)
    return jnp.stack([y0, x0, y0 + size_y, x0 + size_x]).astype(jnp.int32)


def sample_cutmix(
    key: jax.Array, hw: Sequence[int], *, prob: float = 0.5, area: float = 0.5
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(apply () bool, box (4,) int32) for the whole global batch.

    Pass a key that is equal on every device so all devices mix with the same box.
    """
    k_coin, k_aspect, k_pos = jax.random.split(key, 3)
    apply = jax.random.uniform(k_coin) < prob
    u_y, u_x = jax.random.uniform(k_pos, (2,))
    return apply, box_from_uniforms(jax.random.uniform(k_aspect), u_y, u_x, hw, area)


def box_mask(box: jnp.ndarray, out_hw: Sequence[int], full_hw: Optional[Sequence[int]] = None) -> jnp.ndarray:
    """(h, w) bool mask of ``box`` (given at ``full_hw``) sampled at ``out_hw`` by legacy nearest.

    ``full_hw=None`` means the box is given at ``out_hw`` itself.
    """
    h, w = int(out_hw[0]), int(out_hw[1])
    full_h, full_w = (h, w) if full_hw is None else (int(full_hw[0]), int(full_hw[1]))
    ys, xs = legacy_nearest_indices(full_h, h), legacy_nearest_indices(full_w, w)
    in_y = (ys >= box[0]) & (ys < box[2])
    in_x = (xs >= box[1]) & (xs < box[3])
    return in_y[:, None] & in_x[None, :]


def mix_images(target: jnp.ndarray, source: jnp.ndarray, box: jnp.ndarray, apply: jnp.ndarray) -> jnp.ndarray:
    """Paste ``source`` (b, H, W, ch) into ``target`` inside the box when ``apply``."""
    mask = box_mask(box, target.shape[1:3]) & apply
    return jnp.where(mask[None, :, :, None], source, target)


def mix_labels(
    target_labels: jnp.ndarray, source_labels_full: jnp.ndarray, box: jnp.ndarray, apply: jnp.ndarray
) -> jnp.ndarray:
    """Mixed low-resolution label map, (b, h, w).

    Args:
      target_labels: (b, h, w) the crop's label at low resolution (128x224).
      source_labels_full: (b, H, W) the source label at full resolution (512x896).
      box: the box at full resolution.
    """
    full_hw = source_labels_full.shape[1:3]
    out_hw = target_labels.shape[1:3]
    ys, xs = legacy_nearest_indices(full_hw[0], out_hw[0]), legacy_nearest_indices(full_hw[1], out_hw[1])
    source_low = source_labels_full[:, ys][:, :, xs].astype(target_labels.dtype)
    mask = box_mask(box, out_hw, full_hw) & apply
    return jnp.where(mask[None], source_low, target_labels)
