"""Class prototypes: initial class means, cosine scores, rectification, EMA.

Initial prototypes (reference ``calc_prototype.py``): per image and class whose argmax mask
has >= 10 pixels, the masked mean of the un-normalised features is one *contribution*;
contributions update a running mean ``v <- (v * n + x) / (n + 1)``, ``n <- min(n + 1, 3000)``
(past 3000 contributions each new one weighs 1/3001). The reference applies contributions one
image after another (classes of one image are independent), so ``update_prototype_state``
scans over images and updates all classes of an image at once: the same order exactly.
The reference also skips a contribution whose entries sum to exactly 0; so does this.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from cpsl_jax.ops import l2_normalize
from cpsl_jax.cpsl._util import gather_rows


@struct.dataclass
class PrototypeState:
    """Running class means. means: (C, D) float32; counts: (C,) float32, capped at ``cap``."""

    means: jnp.ndarray
    counts: jnp.ndarray


def init_prototype_state(num_classes: int, dim: int) -> PrototypeState:
    """Zero means and counts (the reference's ``objective_vectors`` and ``_num``)."""
    return PrototypeState(jnp.zeros((num_classes, dim), jnp.float32), jnp.zeros((num_classes,), jnp.float32))


def image_class_means(
    features: jnp.ndarray, logits: jnp.ndarray, *, min_pixels: int = 10
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per image and class, the mean feature over pixels whose argmax is that class.

    Args:
      features: (b, h, w, D) un-normalised features; logits: (b, h, w, C).
    Returns:
      means (b, C, D) and present (b, C) bool: the class has >= ``min_pixels`` pixels in
      the image and its mean does not sum to exactly 0 (both skipped by the reference).
    """
    b, h, w, d = features.shape
    c = logits.shape[-1]
    if logits.shape[:3] != (b, h, w):
        raise ValueError(f"image_class_means: features {features.shape} and logits {logits.shape} differ in (b, h, w)")
    onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), c, dtype=jnp.float32).reshape(b, h * w, c)
    pixels = jnp.sum(onehot, axis=1)  # (b, C)
    sums = jnp.einsum("bpc,bpd->bcd", onehot, features.reshape(b, h * w, d).astype(jnp.float32))
    means = sums / jnp.maximum(pixels, 1.0)[..., None]
    present = (pixels >= min_pixels) & (jnp.sum(means, axis=-1) != 0)
    return means, present


def update_prototype_state(
    state: PrototypeState,
    means: jnp.ndarray,
    present: jnp.ndarray,
    *,
    cap: float = 3000.0,
    axis_name: Optional[str] = None,
) -> PrototypeState:
    """Apply the contributions of b images (``image_class_means``) in image order.

    With ``axis_name`` all devices' contributions are gathered in device order and every
    device applies the same sequence (identical states).
    """
    means, present = gather_rows(means, axis_name), gather_rows(present, axis_name)

    def one_image(s: PrototypeState, xs):
        x, p = xs
        n = s.counts
        updated = (s.means * n[:, None] + x) / (n + 1.0)[:, None]
        return PrototypeState(
            means=jnp.where(p[:, None], updated, s.means),
            counts=jnp.where(p, jnp.minimum(n + 1.0, cap), n),
        ), None

    state, _ = lax.scan(one_image, state, (means.astype(jnp.float32), present))
    return state


def cosine_scores(features: jnp.ndarray, prototypes: jnp.ndarray) -> jnp.ndarray:
    """cos(feature, prototype) for every class: (..., D) x (C, D) -> (..., C)."""
    return jnp.einsum("...d,cd->...c", l2_normalize(features), l2_normalize(prototypes))


def rectify_pseudo_labels(
    teacher_features: jnp.ndarray,
    soft_labels: jnp.ndarray,
    prototypes_ema: jnp.ndarray,
    *,
    temperature: float = 0.08,
    threshold: float = 0.0,
    ignore_index: int = 255,
) -> jnp.ndarray:
    """Prototype-rectified hard pseudo labels (CPSL stage 1 step 5, from ProDA).

    weights = softmax(cos(f, P_ema) / T) over classes; rectified = weights * soft;
    label = argmax; where the renormalised max (max / sum) < ``threshold`` -> ignore
    (threshold 0 = never).

    Args:
      teacher_features: (b, h, w, D) teacher features on the crop; soft_labels: (b, h, w, C).
    Returns:
      (b, h, w) int32 labels.
    """
    weights = jax.nn.softmax(cosine_scores(teacher_features, prototypes_ema) / temperature, axis=-1)
    rectified = lax.stop_gradient(weights * soft_labels)
    hard = jnp.argmax(rectified, axis=-1).astype(jnp.int32)
    confidence = jnp.max(rectified, axis=-1) / jnp.sum(rectified, axis=-1)
    return jnp.where(confidence < threshold, ignore_index, hard)


def ema_prototypes(prototypes_ema: jnp.ndarray, prototypes: jnp.ndarray, decay: float = 0.999) -> jnp.ndarray:
    """P_ema <- decay * P_ema + (1 - decay) * P."""
    return decay * prototypes_ema + (1.0 - decay) * lax.stop_gradient(prototypes)
