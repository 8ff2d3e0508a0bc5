"""Sinkhorn and queues of cpsl_jax.cpsl against NumPy float64 references."""

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from cpsl_jax.cpsl import in_use, init_queue, push
from cpsl_jax.cpsl import sinkhorn as _sinkhorn, sinkhorn_log_plan as _sinkhorn_log_plan

_STATIC = ("epsilon", "iterations", "axis_name")
sinkhorn = jax.jit(_sinkhorn, static_argnames=_STATIC)
sinkhorn_log_plan = jax.jit(_sinkhorn_log_plan, static_argnames=_STATIC)


def np_sinkhorn(scores, prior, eps, iters):
    """The reference's arithmetic, float64; returns (Q (N, C), plan after the last class step)."""
    q = np.exp(scores / eps).T
    q /= q.sum()
    n = q.shape[1]
    after_class = q
    for _ in range(iters):
        q = q / q.sum(axis=1, keepdims=True) * prior[:, None]
        after_class = q.copy()
        q = q / q.sum(axis=0, keepdims=True) / n
    return (q * n).T, after_class


def np_log_sinkhorn(scores, prior, eps, iters):
    """Same steps in the log domain (float64) for inputs where exp overflows."""
    def lse(x, axis):
        m = x.max(axis=axis, keepdims=True)
        return np.log(np.exp(x - m).sum(axis=axis, keepdims=True)) + m
    lq = scores.T / eps
    lq = lq - lse(lse(lq, 1), 0)
    n = lq.shape[1]
    for _ in range(iters):
        lq = lq - lse(lq, 1) + np.log(prior)[:, None]
        lq = lq - lse(lq, 0) - np.log(n)
    return np.exp(lq + np.log(n)).T


def _cosine(rng, n, c, d=16):
    f = rng.normal(size=(n, d))
    p = rng.normal(size=(c, d))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return f @ p.T


def test_sinkhorn_matches_reference_and_marginals():
    rng = np.random.default_rng(0)
    scores = _cosine(rng, 40, 7)
    prior = rng.dirichlet(np.ones(7))
    for iters in (1, 3):
        want, after_class = np_sinkhorn(scores, prior, 0.05, iters)
        got = np.asarray(sinkhorn(jnp.asarray(scores, jnp.float32), jnp.asarray(prior, jnp.float32),
                                  epsilon=0.05, iterations=iters))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
        # Class marginals after the last class step are proportional to the prior.
        np.testing.assert_allclose(after_class.sum(1), prior, rtol=1e-10)
        log_class, _ = sinkhorn_log_plan(jnp.asarray(scores, jnp.float32), jnp.asarray(prior, jnp.float32),
                                         epsilon=0.05, iterations=iters)
        mass = np.exp(np.asarray(log_class, np.float64)).sum(1)
        np.testing.assert_allclose(mass / mass.sum(), prior / prior.sum(), rtol=1e-4)
        np.testing.assert_allclose(np.exp(np.asarray(log_class, np.float64)), after_class, rtol=2e-4, atol=1e-9)


def test_sinkhorn_large_logits_is_finite_and_correct():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 5)) * 50.0  # S / eps ~ 1000: exp overflows in float32 and float64
    prior = rng.dirichlet(np.ones(5))
    got = np.asarray(sinkhorn(jnp.asarray(scores, jnp.float32), jnp.asarray(prior, jnp.float32)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, np_log_sinkhorn(scores, prior, 0.05, 3), atol=1e-4)


def test_sinkhorn_zero_prior_class_and_valid_mask():
    rng = np.random.default_rng(2)
    scores = _cosine(rng, 20, 6)
    prior = rng.dirichlet(np.ones(6))
    prior[2] = 0.0
    got = np.asarray(sinkhorn(jnp.asarray(scores, jnp.float32), jnp.asarray(prior, jnp.float32)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[:, 2], 0.0)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
    # Masked rows behave as if absent.
    valid = rng.random(20) < 0.6
    prior = rng.dirichlet(np.ones(6))
    masked = np.asarray(sinkhorn(jnp.asarray(scores, jnp.float32), jnp.asarray(prior, jnp.float32),
                                 valid=jnp.asarray(valid)))
    want, _ = np_sinkhorn(scores[valid], prior, 0.05, 3)
    np.testing.assert_allclose(masked[valid], want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(masked[~valid], 0.0)


def test_sinkhorn_across_devices_equals_single_device():
    rng = np.random.default_rng(3)
    scores = jnp.asarray(_cosine(rng, 4 * 9, 5), jnp.float32)
    prior = jnp.asarray(rng.dirichlet(np.ones(5)), jnp.float32)
    valid = jnp.asarray(rng.random(36) < 0.8)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    f = jax.jit(jax.shard_map(lambda s, v: sinkhorn(s, prior, valid=v, axis_name="data"), mesh=mesh,
                      in_specs=(P("data"), P("data")), out_specs=P("data")))
    got = np.asarray(f(scores, valid))
    want = np.asarray(sinkhorn(scores, prior, valid=valid))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    g = jax.jit(jax.shard_map(lambda s: sinkhorn(s, prior, axis_name="data"), mesh=mesh,
                      in_specs=P("data"), out_specs=P("data")))
    want_np, _ = np_sinkhorn(np.asarray(scores, np.float64), np.asarray(prior, np.float64), 0.05, 3)
    np.testing.assert_allclose(np.asarray(g(scores)), want_np, rtol=2e-4, atol=1e-6)


def test_queue_matches_front_insertion_reference():
    rng = np.random.default_rng(4)
    k, d = 12, 3
    q = init_queue(k, d, with_labels=True)
    ref_rows, ref_labels = np.zeros((k, d)), np.zeros(k, np.int64)
    ref_flag = False
    push_j = jax.jit(push)
    for step, n in enumerate([4, 5, 4, 3, 4, 5, 4]):
        rows = rng.normal(size=(n, d)).astype(np.float32)
        labels = rng.integers(0, 255, size=n)
        # Reference: check "last row non-zero" before the push, then shift and insert at the front.
        full_before = bool(np.any(ref_rows[-1] != 0))
        assert bool(in_use(q)) == full_before, step
        ref_flag = ref_flag or full_before
        ref_rows[n:] = ref_rows[:-n].copy()
        ref_rows[:n] = rows
        ref_labels[n:] = ref_labels[:-n].copy()
        ref_labels[:n] = labels
        q = push_j(q, jnp.asarray(rows), jnp.asarray(labels))
        assert bool(q.was_in_use) == ref_flag
        # Same multiset of (row, label) pairs: order does not matter to any consumer.
        got = np.concatenate([np.asarray(q.rows, np.float64), np.asarray(q.labels)[:, None]], 1)
        want = np.concatenate([ref_rows, ref_labels[:, None]], 1)
        np.testing.assert_allclose(got[np.lexsort(got.T)], want[np.lexsort(want.T)], rtol=1e-6)
    assert bool(in_use(q)) and bool(q.was_in_use)


def test_queue_push_more_rows_than_size_keeps_front_rows():
    q = init_queue(4, 2)
    rows = jnp.arange(12.0).reshape(6, 2) + 1
    q = push(q, rows)
    # Front insertion of 6 rows into 4 slots keeps rows 0..3.
    np.testing.assert_array_equal(np.sort(np.asarray(q.rows)[:, 0]), np.asarray(rows)[:4, 0])
    assert int(q.count) == 4 and not bool(q.was_in_use)
