"""Class-balanced Sinkhorn-Knopp (CPSL eq. 4-5; reference ``CustomModel.sinkhorn``).

The reference works on ``Q = exp(S / eps)`` transposed to C x N, divides by its total,
then ``iterations`` times scales each class row to sum ``pi_c`` and each sample column to
``1 / N``, and finally multiplies by N so every sample's assignment sums to 1. Here the same
steps run in the log domain, so ``S / eps`` of 1,000 (logits of magnitude 50 at eps 0.05)
neither overflows nor turns into nan, and a class with prior 0 gets assignment 0 instead of
the reference's 0 / 0.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jax import lax

from cpsl_jax.cpsl._util import logsumexp, psum_if


def _finite_or_zero(x: jnp.ndarray) -> jnp.ndarray:
    # An all -inf row/column (masked rows, zero-prior classes) must stay -inf, not nan.
    return jnp.where(jnp.isfinite(x), x, 0.0)


def sinkhorn_log_plan(
    scores: jnp.ndarray,
    class_prior: jnp.ndarray,
    *,
    epsilon: float = 0.05,
    iterations: int = 3,
    valid: Optional[jnp.ndarray] = None,
    axis_name: Optional[str] = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Log of the transport plan after the last class step and after the last sample step.

    Args:
      scores: (N, C) similarities of this device's rows.
      class_prior: (C,) class distribution pi (any positive scale; zeros allowed).
      valid: optional (N,) bool; invalid rows take no part (as if absent).
      axis_name: when set, the N rows of every device form one problem (row sums and the
        total are psum-ed), equal to a single-device call on the concatenated rows.

    Returns:
      (log_after_class_step, log_after_sample_step), both (C, N), before the final x N.
      The first has class marginals pi_c / sum(pi); the second has sample marginals 1/N.
    """
    if scores.ndim != 2 or class_prior.shape != (scores.shape[1],):
        raise ValueError(
            f"sinkhorn: scores must be (N, C) and class_prior (C,), got {scores.shape} and {class_prior.shape}")
    scores = lax.stop_gradient(scores).astype(jnp.float32)
    log_q = scores.T / epsilon  # (C, N)
    if valid is None:
        n_local = jnp.float32(scores.shape[0])
    else:
        log_q = jnp.where(valid[None, :], log_q, -jnp.inf)
        n_local = jnp.sum(valid.astype(jnp.float32))
    log_n = jnp.log(psum_if(n_local, axis_name))
    log_prior = jnp.log(lax.stop_gradient(class_prior).astype(jnp.float32))[:, None]
    # Divide by the total (the reference's first normalisation).
    total = logsumexp(logsumexp(log_q, axis=1, axis_name=axis_name), axis=0)
    log_q = log_q - _finite_or_zero(total)
    after_class = log_q
    for _ in range(iterations):  # static, 3 in the paper
        rows = logsumexp(log_q, axis=1, axis_name=axis_name)  # (C, 1): class mass over all rows
        log_q = log_q - _finite_or_zero(rows) + log_prior
        after_class = log_q
        cols = logsumexp(log_q, axis=0)  # (1, N): per-sample mass, local
        log_q = log_q - _finite_or_zero(cols) - log_n
    return after_class, log_q


def sinkhorn(
    scores: jnp.ndarray,
    class_prior: jnp.ndarray,
    *,
    epsilon: float = 0.05,
    iterations: int = 3,
    valid: Optional[jnp.ndarray] = None,
    axis_name: Optional[str] = None,
) -> jnp.ndarray:
    """Soft class assignments ``Q`` (N, C) of the rows of ``scores``; each valid row sums to 1.

    ``Q = N * plan^T`` where ``plan`` is the reference's C x N matrix after ``iterations``
    alternating class (sum pi_c) and sample (sum 1/N) normalisations. No gradient flows
    (the reference computes it under ``torch.no_grad``). Invalid rows come back as zeros.
    With ``axis_name`` the rows of all devices form one problem (N is the global count).
    """
    _, log_q = sinkhorn_log_plan(
        scores, class_prior, epsilon=epsilon, iterations=iterations, valid=valid, axis_name=axis_name)
    n_local = scores.shape[0] if valid is None else jnp.sum(valid.astype(jnp.float32))
    log_n = jnp.log(psum_if(jnp.float32(n_local), axis_name))
    return lax.stop_gradient(jnp.exp(log_q + log_n).T)
