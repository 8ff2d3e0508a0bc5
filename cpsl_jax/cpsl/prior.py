"""Class distribution of predictions and its use as the Sinkhorn prior pi.

The reference's ``class_distribution.npy`` is the fraction of target training pixels whose
warm-up argmax (129x257, eval mode) is each class. Counts here are psum-able, so a tool can
accumulate them over batches and devices and normalise once at the end.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from cpsl_jax.cpsl._util import psum_if


def class_pixel_counts(
    logits: jnp.ndarray, valid: Optional[jnp.ndarray] = None, axis_name: Optional[str] = None
) -> jnp.ndarray:
    """(C,) float32 number of pixels whose argmax is each class.

    Args:
      logits: (..., C) predictions; valid: optional bool mask of shape ``logits.shape[:-1]``
        (e.g. padded images of the last batch); axis_name: sum over devices too.
    """
    c = logits.shape[-1]
    onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), c, dtype=jnp.float32)
    if valid is not None:
        onehot = onehot * valid[..., None].astype(jnp.float32)
    return psum_if(jnp.sum(onehot.reshape(-1, c), axis=0), axis_name)


def class_prior(counts: jnp.ndarray, *, min_fraction: float = 1e-6) -> jnp.ndarray:
    """Normalised class distribution (C,) for the Sinkhorn prior.

    Zero (or tiny) classes are raised to ``min_fraction`` before renormalising so every class
    can still receive assignments (the reference's Sinkhorn would divide 0 by 0 for them); all
    counts zero gives the uniform prior. Sinkhorn is invariant to the prior's scale, so the
    floor changes only the classes below it.
    """
    counts = jnp.asarray(counts, jnp.float32)
    total = jnp.sum(counts)
    frac = jnp.where(total > 0, counts / jnp.where(total > 0, total, 1.0), 1.0 / counts.shape[0])
    frac = jnp.maximum(frac, min_fraction)
    return frac / jnp.sum(frac)
