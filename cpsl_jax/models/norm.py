"""Batch normalisation with the reference's synchronised-BN arithmetic.

The reference trains with a synchronised BatchNorm whose semantics differ from Flax's
``nn.BatchNorm`` in three ways that matter for checkpoint parity:

* train mode normalises by ``max(biased_var, eps) ** -0.5`` (a clamp, not ``var + eps``);
* the running variance is updated with the **unbiased** batch variance, so the stored
  ``var`` is directly PyTorch's ``running_var`` (import/export is a copy);
* eval mode uses ``(x - running_mean) / sqrt(running_var + eps)``.

Momentum is 0.1 in PyTorch terms: ``running = 0.9 * running + 0.1 * batch``.
Statistics are always float32, whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def batch_moments(x: jnp.ndarray, axis_name: str | None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Global per-channel mean, biased and unbiased variance of ``x`` (N, H, W, C), float32.

    One pass and one collective, as the reference's synchronised BN: the per-channel sum and
    sum of squares are reduced over the local batch and, with ``axis_name``, summed over
    devices together with the element count, so the statistics are count-weighted over the
    global batch. ``var = (sum(x^2) - sum(x) * mean) / n``; the unbiased variance divides by
    the global ``n - 1``. Returns arrays of shape (C,).
    """
    x = x.astype(jnp.float32)
    red = tuple(range(x.ndim - 1))
    count = jnp.float32(x.size // x.shape[-1])
    sums = jnp.stack([jnp.sum(x, axis=red), jnp.sum(x * x, axis=red)])
    if axis_name is not None:
        sums, count = lax.psum((sums, count), axis_name)
    mean = sums[0] / count
    sumvar = sums[1] - sums[0] * mean
    biased = sumvar / count
    unbiased = sumvar / jnp.maximum(count - 1.0, 1.0)
    return mean, biased, unbiased


class BatchNorm(nn.Module):
    """Reference (synchronised) BatchNorm on NHWC maps.

    Attributes:
      axis_name: mesh / pmap axis to synchronise statistics over in train mode (None: local).
      momentum: PyTorch-style momentum (weight of the new batch statistic), 0.1.
      epsilon: 1e-5.
      dtype: output dtype (the compute dtype); statistics and parameters are float32.

    Variables: params ``scale`` (PyTorch ``weight``), ``bias``; batch_stats ``mean``
    (``running_mean``) and ``var`` (``running_var``, unbiased).
    """

    axis_name: str | None = None
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            mean, biased, unbiased = batch_moments(x, self.axis_name)
            inv = lax.rsqrt(jnp.maximum(biased, self.epsilon))
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * lax.stop_gradient(mean)
                ra_var.value = (1.0 - m) * ra_var.value + m * lax.stop_gradient(unbiased)
        else:
            mean = ra_mean.value
            inv = lax.rsqrt(ra_var.value + self.epsilon)
        # Centre before scaling: with a clamped variance inv can be ~316, and folding the mean
        # into an offset would amplify float32 cancellation.
        y = (x.astype(jnp.float32) - mean) * (inv * scale) + bias
        return y.astype(self.dtype)

