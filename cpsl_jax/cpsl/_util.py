"""Small collective helpers shared by the modules of ``cpsl_jax.cpsl``."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jax import lax


def psum_if(x, axis_name: Optional[str]):
    """``lax.psum`` over ``axis_name``, or ``x`` itself when running on one device."""
    return x if axis_name is None else lax.psum(x, axis_name)


def logsumexp(x: jnp.ndarray, axis: int, axis_name: Optional[str] = None) -> jnp.ndarray:
    """Log-sum-exp along ``axis`` (keepdims), over all devices' slices when ``axis_name`` is set.

    Safe for slices that are entirely ``-inf`` (result ``-inf``, never nan): the shift is
    replaced by 0 where the maximum is not finite.
    """
    m = jnp.max(x, axis=axis, keepdims=True)
    if axis_name is not None:
        m = lax.pmax(m, axis_name)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    s = psum_if(jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True), axis_name)
    return jnp.log(s) + m


def own_rows(x: jnp.ndarray, local: int, axis_name: Optional[str]) -> jnp.ndarray:
    """The ``local`` leading entries of a tiled ``all_gather`` that belong to this device."""
    if axis_name is None:
        return x
    start = lax.axis_index(axis_name) * local
    return lax.dynamic_slice_in_dim(x, start, local, axis=0)


def gather_rows(x: jnp.ndarray, axis_name: Optional[str]) -> jnp.ndarray:
    """Concatenate every device's leading-axis slices in device order (identity on one device).

    Written as a psum of zero-padded slices (exact: every entry is one value plus zeros), so the
    result is typed device-invariant under ``shard_map``: state built from it (queues,
    prototype means) can be a ``lax.scan`` carry and an output with spec ``P()``. The rows
    gathered here are small (B x 256 rows), so the psum costs little more than an all-gather.
    """
    if axis_name is None:
        return x
    local = x.shape[0]
    padded = jnp.zeros((local * lax.axis_size(axis_name),) + x.shape[1:], x.dtype)
    padded = lax.dynamic_update_slice_in_dim(padded, x, lax.axis_index(axis_name) * local, axis=0)
    if x.dtype == jnp.bool_:
        return lax.psum(padded.astype(jnp.int32), axis_name).astype(jnp.bool_)
    return lax.psum(padded, axis_name)


def global_count(x: jnp.ndarray, axis_name: Optional[str]) -> jnp.ndarray:
    """Sum of ``x`` over every device (float32)."""
    return psum_if(jnp.sum(x.astype(jnp.float32)), axis_name)


__all__ = ["psum_if", "logsumexp", "own_rows", "gather_rows", "global_count"]
