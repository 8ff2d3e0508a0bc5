"""Losses of stages 1-3, normalised over the global batch.

Per-device convention: each function returns this device's *share* = local numerator /
global normaliser (``lax.psum`` of the counts over ``axis_name``), so ``psum(share)`` is the
global loss and the psum of per-device gradients is the global gradient. With
``axis_name=None`` it is the plain single-device loss. Maps are channel-last:
logits (..., C), labels (...). Ignore value: 255 in this project (uint8 label maps; the
reference uses 250); labels outside [0, C) count as ignored too, so the ignore value never
reaches an index operation.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from cpsl_jax.ops import l2_normalize
from cpsl_jax.cpsl._util import global_count, psum_if

IGNORE_INDEX = 255


def _valid_and_safe(labels: jnp.ndarray, num_classes: int, ignore_index: int):
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    return valid, jnp.where(valid, labels, 0).astype(jnp.int32)


def cross_entropy(
    logits: jnp.ndarray, labels: jnp.ndarray, ignore_index: int = IGNORE_INDEX, axis_name: Optional[str] = None
) -> jnp.ndarray:
    """Mean CE over the valid pixels of the global batch (``F.cross_entropy(ignore_index)``).

    Share = sum of this device's pixel losses / psum(valid count) (0 when nothing is valid).
    """
    valid, safe = _valid_and_safe(labels, logits.shape[-1], ignore_index)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    count = global_count(valid, axis_name)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1.0)


def reverse_cross_entropy(
    logits: jnp.ndarray, labels: jnp.ndarray, ignore_index: int = IGNORE_INDEX, axis_name: Optional[str] = None
) -> jnp.ndarray:
    """Reverse CE (symmetric CE, Wang et al. 2019) as the reference computes it.

    ``-sum_c clip(p_c, 1e-7, 1) * log(clip(onehot_c, 1e-4, 1))`` per valid pixel, summed,
    divided by (global valid count + 1e-6).
    """
    c = logits.shape[-1]
    valid, safe = _valid_and_safe(labels, c, ignore_index)
    p = jnp.clip(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), 1e-7, 1.0)
    log_onehot = jnp.log(jnp.clip(jax.nn.one_hot(safe, c, dtype=jnp.float32), 1e-4, 1.0))
    per_pixel = -jnp.sum(p * log_onehot, axis=-1)
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / (global_count(valid, axis_name) + 1e-6)


def symmetric_cross_entropy(
    logits: jnp.ndarray,
    labels: jnp.ndarray,
    *,
    alpha: float = 0.1,
    beta: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    axis_name: Optional[str] = None,
) -> jnp.ndarray:
    """alpha * CE + beta * RCE (stage 1 uses 0.1 / 1.0)."""
    return (alpha * cross_entropy(logits, labels, ignore_index, axis_name)
            + beta * reverse_cross_entropy(logits, labels, ignore_index, axis_name))


def prototype_consistency(
    teacher_scores: jnp.ndarray,
    student_scores: jnp.ndarray,
    valid: jnp.ndarray,
    temperature: float = 0.08,
    axis_name: Optional[str] = None,
) -> jnp.ndarray:
    """KL(teacher || student) of prototype softmaxes, summed over unmasked entries / global count.

    Args:
      teacher_scores: (..., C) cosine(teacher features, P_ema) moved onto the strong view.
      student_scores: (..., C) cosine(student strong-view features, P_ema).
      valid: bool mask broadcastable to (..., C) (False outside the view and in the cutout);
        the count is over (pixel, class) entries, as the reference's ``mask.sum()``.
    """
    t = jax.nn.softmax(lax.stop_gradient(teacher_scores).astype(jnp.float32) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student_scores.astype(jnp.float32) / temperature, axis=-1)
    mask = jnp.broadcast_to(valid, t.shape)
    # F.kl_div uses t * log t = 0 at t = 0.
    kl = jnp.where(t > 0, t * (jnp.log(jnp.where(t > 0, t, 1.0)) - log_s), -t * log_s)
    return jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(global_count(mask, axis_name), 1.0)


def distillation_kl(
    student_logits: jnp.ndarray,
    teacher_logits: jnp.ndarray,
    *,
    quirk: bool = True,
    axis_name: Optional[str] = None,
) -> jnp.ndarray:
    """Stage 2/3 distillation: ``sum t * (log t - s) / (B * C * h * w)`` over the global batch.

    **quirk** (default): s are the student's *probabilities* (the reference feeds softmax to
    ``F.kl_div``, which expects log-probabilities). ``quirk=False``: s = log-softmax, the
    true KL(teacher || student). t = softmax(teacher), no gradient.
    """
    t = jax.nn.softmax(lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    s_fn = jax.nn.softmax if quirk else jax.nn.log_softmax
    s = s_fn(student_logits.astype(jnp.float32), axis=-1)
    kl = jnp.where(t > 0, t * (jnp.log(jnp.where(t > 0, t, 1.0)) - s), -t * s)
    count = psum_if(jnp.float32(t.size), axis_name)
    return jnp.sum(kl) / count


def queue_contrastive(
    anchors: jnp.ndarray,
    anchor_labels: jnp.ndarray,
    queue: jnp.ndarray,
    queue_labels: jnp.ndarray,
    temperature: float = 0.08,
) -> jnp.ndarray:
    """Pixel-to-queue contrastive loss of one image, exactly as the reference computes it.

    positives = queue rows whose label equals the anchor's (**quirk**: ignore == ignore
    counts as a positive); logits = anchors @ queue^T / T minus the row max;
    log-prob = logit - log(exp(logit) + sum of exp over negatives);
    loss = -mean over anchors of (sum over positives of log-prob) / (positive count + 1e-5).

    Args:
      anchors: (n, D) L2-normalised student features (gradient flows);
      anchor_labels: (n,); queue: (K, D) (no gradient); queue_labels: (K,).
    """
    positive = (anchor_labels[:, None] == queue_labels[None, :]).astype(jnp.float32)
    logits = anchors.astype(jnp.float32) @ lax.stop_gradient(queue).astype(jnp.float32).T / temperature
    logits = logits - lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    exp_logits = jnp.exp(logits)
    neg_sum = jnp.sum(exp_logits * (1.0 - positive), axis=1, keepdims=True)
    log_prob = logits - jnp.log(exp_logits + neg_sum)
    mean_pos = jnp.sum(positive * log_prob, axis=1) / (jnp.sum(positive, axis=1) + 1e-5)
    return -jnp.mean(mean_pos)


def contrastive_share(
    anchors: jnp.ndarray,
    anchor_labels: jnp.ndarray,
    queue: jnp.ndarray,
    queue_labels: jnp.ndarray,
    temperature: float = 0.08,
    axis_name: Optional[str] = None,
) -> jnp.ndarray:
    """Mean over the global batch of ``queue_contrastive`` per image, as this device's share.

    anchors (b, n, D), anchor_labels (b, n); share = sum over own images / B_global.
    """
    per_image = jax.vmap(queue_contrastive, in_axes=(0, 0, None, None, None))(
        anchors, anchor_labels, queue, queue_labels, temperature)
    return jnp.sum(per_image) / psum_if(jnp.float32(anchors.shape[0]), axis_name)


def sample_anchors(
    key: jax.Array, features: jnp.ndarray, n: int, image_ids: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Contrastive anchors: per image a fresh permutation of the h*w positions, first n kept.

    Args:
      key: a key; image i uses ``fold_in(key, image_ids[i])`` (pass global image indices so
        devices draw different permutations).
      features: (b, h, w, D) student features (65x113 in the paper).
    Returns:
      (anchors (b, n, D) L2-normalised, idx (b, n) raster indices).
    """
    b, h, w, d = features.shape
    if n > h * w:
        raise ValueError(f"sample_anchors: cannot keep {n} of {h * w} positions")
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(image_ids)
    idx = jax.vmap(lambda k: jax.random.permutation(k, h * w)[:n])(keys).astype(jnp.int32)
    rows = jnp.take_along_axis(features.reshape(b, h * w, d), idx[..., None], axis=1)
    return l2_normalize(rows), idx


def anchor_labels(
    label_map: jnp.ndarray, idx: jnp.ndarray, anchor_hw: tuple[int, int], *, quirk: bool = True
) -> jnp.ndarray:
    """Labels of the anchors, (b, n) int32.

    **quirk** (default): ``label_map`` is ``threshold_SL`` on the teacher's grid (129x257),
    read flattened at the anchors' indices on the student's 65x113 grid, i.e. labels come
    from the map's first rows, not from the anchors' pixels. ``quirk=False``: pass the
    crop's label map already on the anchor grid (e.g. the 128x224 label resized nearest to
    65x113); it must have shape (b, *anchor_hw).
    """
    b = label_map.shape[0]
    if not quirk and tuple(label_map.shape[1:3]) != tuple(anchor_hw):
        raise ValueError(
            f"anchor_labels(quirk=False): label map {label_map.shape} is not on the anchor grid {anchor_hw}")
    return jnp.take_along_axis(label_map.reshape(b, -1).astype(jnp.int32), idx, axis=1)
