"""Pixel-level self-labeling with class-balanced Sinkhorn targets (CPSL stage 1, step 7).

Reference semantics (default, ``batched=False``): per image of the **global** batch, in
order, the teacher's sampled rows are scored against the trainable prototypes; Sinkhorn
runs on [queue rows; new rows] once the queue is in use (else on the new rows alone) and the
last n rows of its output are the targets; the new rows are pushed **before the next
image**, so image i+1 sees image i's rows. That order is a ``lax.scan`` over images.
Loss per image = mean over rows of CE(targets, softmax(scores / T)), two terms:

1. Sinkhorn input ``F @ P^T`` for the queue rows (**quirk**: P un-normalised and
   detached) and ``normalize(f) @ normalize(P)^T`` for the new rows; queue F.
2. Sinkhorn input = the teacher's L2-normalised logits, queue O (no prototype product).

Both terms use the same prediction ``softmax(normalize(f) @ normalize(P)^T / T)``, so the
gradient reaches P only (every teacher input is under ``stop_gradient``).

``batched=True`` is the paper's intent: one Sinkhorn over all images' rows and the queue,
with its sums over devices, then one push of all rows.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from cpsl_jax.ops import l2_normalize
from cpsl_jax.cpsl._util import gather_rows, own_rows
from cpsl_jax.cpsl.queues import Queue, in_use, push
from cpsl_jax.cpsl.sinkhorn import sinkhorn


def sample_positions(key: jax.Array, num_positions: int, n: int) -> jnp.ndarray:
    """(n,) int32: the first n entries of one random permutation of ``num_positions``.

    One permutation is shared by the batch (the reference's ``torch.randperm`` over the
    33,153 positions of a 129x257 map); pass a key that is equal on every device.
    """
    if n > num_positions:
        raise ValueError(f"sample_positions: cannot keep {n} of {num_positions} positions")
    return jax.random.permutation(key, num_positions)[:n].astype(jnp.int32)


def gather_positions(maps: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
    """Rows of ``maps`` (b, h, w, D) at raster indices ``idx`` (n,) -> (b, n, D)."""
    b, h, w = maps.shape[:3]
    return jnp.take(maps.reshape(b, h * w, *maps.shape[3:]), idx, axis=1)


def queue_push_labels(label_map: jnp.ndarray, idx: jnp.ndarray, *, quirk: bool = True) -> jnp.ndarray:
    """Labels pushed with the feature queue rows, (b, n) int32.

    ``label_map`` is ``threshold_SL`` (b, H, W) on the teacher's grid (129x257 for a
    1024x2048 image), the grid the rows were sampled from.
    **quirk** (default): the reference pushes the first n raster entries of the map (its top
    row), not the sampled pixels' labels. ``quirk=False`` reads the map at ``idx``.
    """
    b = label_map.shape[0]
    flat = label_map.reshape(b, -1).astype(jnp.int32)
    n = idx.shape[0]
    return flat[:, :n] if quirk else jnp.take(flat, idx, axis=1)


def _targets(queue_scores, new_scores, use_queue, class_prior, epsilon, iterations, axis_name=None):
    """Sinkhorn targets of the new rows, with the queue rows taking part when ``use_queue``."""
    k, n = queue_scores.shape[0], new_scores.shape[0]
    scores = jnp.concatenate([queue_scores, new_scores], axis=0)
    valid = jnp.concatenate([jnp.broadcast_to(use_queue, (k,)), jnp.ones((n,), jnp.bool_)])
    q = sinkhorn(scores, class_prior, epsilon=epsilon, iterations=iterations, valid=valid,
                 axis_name=axis_name)
    return q[k:]


def _check(features, logits, prototypes, feature_queue, output_queue, push_labels):
    b, n, d = features.shape
    c = prototypes.shape[0]
    if logits.shape != (b, n, c) or prototypes.shape[1] != d or push_labels.shape != (b, n):
        raise ValueError(
            "self_labeling_loss: expected features (b, n, D), logits (b, n, C), prototypes (C, D), "
            f"push_labels (b, n); got {features.shape}, {logits.shape}, {prototypes.shape}, {push_labels.shape}")
    if feature_queue.rows.shape[1] != d or feature_queue.labels is None:
        raise ValueError("self_labeling_loss: feature_queue must be (K, D) with labels")
    if output_queue.rows.shape[1] != c:
        raise ValueError(f"self_labeling_loss: output_queue must be (K, {c}), got {output_queue.rows.shape}")
    if n > feature_queue.size or n > output_queue.size:
        raise ValueError(f"self_labeling_loss: {n} rows per image exceed the queue size")


def self_labeling_loss(
    features: jnp.ndarray,
    logits: jnp.ndarray,
    prototypes: jnp.ndarray,
    feature_queue: Queue,
    output_queue: Queue,
    push_labels: jnp.ndarray,
    class_prior: jnp.ndarray,
    *,
    temperature: float = 0.08,
    epsilon: float = 0.05,
    iterations: int = 3,
    batched: bool = False,
    axis_name: Optional[str] = None,
) -> tuple[jnp.ndarray, Queue, Queue]:
    """Self-labeling loss share and the updated queues.

    Args:
      features: (b, n, D) the teacher's sampled (un-normalised) feature rows of this
        device's b images (n = 256 in the paper).
      logits: (b, n, C) the teacher's logits at the same positions.
      prototypes: (C, D) trainable prototypes P (the only input that gets a gradient).
      feature_queue: queue F (K, D) with labels; output_queue: queue O (K, C).
      push_labels: (b, n) labels pushed with F (see ``queue_push_labels``).
      class_prior: (C,) Sinkhorn class prior pi.
      batched: False = the reference's per-image scan; True = one Sinkhorn for the batch.
      axis_name: data-parallel axis. Every device gathers all rows, runs the identical
        scan and ends with identical queues.

    Returns:
      (share, feature_queue, output_queue): share = (sum of this device's images' losses)
      / B_global, so ``psum(share)`` is the mean over the global batch of
      (term 1 + term 2). ``feature_queue.was_in_use`` gates the contrastive term.
    """
    _check(features, logits, prototypes, feature_queue, output_queue, push_labels)
    b, n, d = features.shape
    f_own = l2_normalize(lax.stop_gradient(features).astype(jnp.float32))
    o_own = l2_normalize(lax.stop_gradient(logits).astype(jnp.float32))
    p_detached = lax.stop_gradient(prototypes).astype(jnp.float32)
    p_normalized = l2_normalize(prototypes.astype(jnp.float32), axis=-1)
    scores_own = jnp.einsum("bnd,cd->bnc", f_own, p_normalized)  # gradient reaches P here
    f_all, o_all = gather_rows(f_own, axis_name), gather_rows(o_own, axis_name)
    labels_all = gather_rows(push_labels.astype(jnp.int32), axis_name)
    num_images = f_all.shape[0]
    sink = dict(class_prior=class_prior, epsilon=epsilon, iterations=iterations)

    if batched:
        t_feat, t_out = _batched_targets(f_own, o_own, p_detached, p_normalized, feature_queue,
                                         output_queue, sink, axis_name)
        feature_queue = push(feature_queue, f_all.reshape(-1, d), labels_all.reshape(-1))
        output_queue = push(output_queue, o_all.reshape(num_images * n, -1))
    else:
        scores_all = lax.stop_gradient(jnp.einsum("bnd,cd->bnc", f_all, p_normalized))

        def one_image(queues, xs):
            fq, oq = queues
            f_i, o_i, s_i, l_i = xs
            t1 = _targets(fq.rows @ p_detached.T, s_i, in_use(fq), **sink)
            t2 = _targets(oq.rows, o_i, in_use(oq), **sink)
            return (push(fq, f_i, l_i), push(oq, o_i)), (t1, t2)

        (feature_queue, output_queue), (t_feat, t_out) = lax.scan(
            one_image, (feature_queue, output_queue), (f_all, o_all, scores_all, labels_all))
        t_feat, t_out = own_rows(t_feat, b, axis_name), own_rows(t_out, b, axis_name)

    log_p = jax.nn.log_softmax(scores_own / temperature, axis=-1)
    per_image = -jnp.mean(jnp.sum(t_feat * log_p, -1), -1) - jnp.mean(jnp.sum(t_out * log_p, -1), -1)
    return jnp.sum(per_image) / num_images, feature_queue, output_queue


def _batched_targets(f_own, o_own, p_detached, p_normalized, fq, oq, sink, axis_name):
    """Targets (b, n, C) of both terms from one Sinkhorn over all devices' rows + the queue.

    The queue is identical on every device, so each device contributes only its own
    1/num_devices slice of it (the queue size must divide by the device count).
    """
    b, n, _ = f_own.shape
    ndev = 1 if axis_name is None else lax.axis_size(axis_name)
    outs = []
    for queue, queue_scores_fn, new in (
        (fq, lambda rows: rows @ p_detached.T, lax.stop_gradient(jnp.einsum("bnd,cd->bnc", f_own, p_normalized))),
        (oq, lambda rows: rows, o_own),
    ):
        if queue.size % ndev:
            raise ValueError(f"self_labeling_loss(batched): queue size {queue.size} must divide by {ndev} devices")
        shard = queue.size // ndev
        start = 0 if axis_name is None else lax.axis_index(axis_name) * shard
        rows = lax.dynamic_slice_in_dim(queue.rows, start, shard, axis=0)
        t = _targets(queue_scores_fn(rows), new.reshape(b * n, -1), in_use(queue), axis_name=axis_name, **sink)
        outs.append(t.reshape(b, n, -1))
    return tuple(outs)
