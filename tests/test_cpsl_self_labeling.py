"""Self-labeling scan of cpsl_jax.cpsl against a NumPy float64 loop over images."""

import functools

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from cpsl_jax.cpsl import (
    gather_positions, init_queue, queue_push_labels, sample_positions, self_labeling_loss)

T, EPS, ITERS = 0.08, 0.05, 3


def _norm(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_sinkhorn(scores, prior):
    q = np.exp(scores / EPS).T
    q /= q.sum()
    n = q.shape[1]
    for _ in range(ITERS):
        q = q / q.sum(axis=1, keepdims=True) * prior[:, None]
        q = q / q.sum(axis=0, keepdims=True) / n
    return (q * n).T


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class NpQueues:
    """The reference's queues: front insertion, flag on once the last row is non-zero."""

    def __init__(self, k, d, c):
        self.f, self.lab, self.o = np.zeros((k, d)), np.zeros(k, np.int64), np.zeros((k, c))

    @staticmethod
    def _push(q, rows):
        n = rows.shape[0]
        q[n:] = q[:-n].copy()
        q[:n] = rows


def np_self_labeling(features, logits, protos, queues, labels, prior, batched=False):
    """Plain loop over images (reference order); returns (mean loss, flag of the last check)."""
    pn = _norm(protos)
    losses, flag = [], False
    if batched:
        f_all, o_all = _norm(features).reshape(-1, features.shape[-1]), _norm(logits).reshape(-1, logits.shape[-1])
        s_all = f_all @ pn.T
        m = f_all.shape[0]
        use_f, use_o = np.any(queues.f[-1] != 0), np.any(queues.o[-1] != 0)
        t1 = np_sinkhorn(np.concatenate([queues.f @ protos.T, s_all]) if use_f else s_all, prior)[-m:]
        t2 = np_sinkhorn(np.concatenate([queues.o, o_all]) if use_o else o_all, prior)[-m:]
        NpQueues._push(queues.f, f_all)
        NpQueues._push(queues.lab, labels.reshape(-1))
        NpQueues._push(queues.o, o_all)
        logp = np_log_softmax(s_all / T)
        per_row = -(t1 * logp).sum(-1) - (t2 * logp).sum(-1)
        return per_row.reshape(features.shape[0], -1).mean(1).mean(), bool(use_f)
    for i in range(features.shape[0]):
        f, o = _norm(features[i]), _norm(logits[i])
        s = f @ pn.T
        use_f = np.any(queues.f[-1] != 0)
        inp = np.concatenate([queues.f @ protos.T, s]) if use_f else s
        NpQueues._push(queues.f, f)
        NpQueues._push(queues.lab, labels[i])
        t1 = np_sinkhorn(inp, prior)[-f.shape[0]:]
        use_o = np.any(queues.o[-1] != 0)
        inp = np.concatenate([queues.o, o]) if use_o else o
        NpQueues._push(queues.o, o)
        t2 = np_sinkhorn(inp, prior)[-f.shape[0]:]
        logp = np_log_softmax(s / T)
        losses.append(-np.mean((t1 * logp).sum(-1)) - np.mean((t2 * logp).sum(-1)))
        flag = flag or bool(use_f)
    return float(np.mean(losses)), flag


def _sorted_rows(rows, labels=None):
    x = np.asarray(rows, np.float64)
    if labels is not None:
        x = np.concatenate([x, np.asarray(labels, np.float64)[:, None]], 1)
    return x[np.lexsort(x.T)]


def _inputs(rng, b, n, d, c):
    return (rng.normal(size=(b, n, d)).astype(np.float32), (rng.normal(size=(b, n, c)) * 5).astype(np.float32),
            rng.integers(0, c, size=(b, n)).astype(np.int32))


def _mesh():
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))


def _assert_queues(fq, oq, ref):
    np.testing.assert_allclose(_sorted_rows(fq.rows, fq.labels), _sorted_rows(ref.f, ref.lab), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_sorted_rows(oq.rows), _sorted_rows(ref.o), rtol=1e-5, atol=1e-6)


def test_scan_matches_numpy_loop_with_queue_filling_mid_batch():
    rng = np.random.default_rng(0)
    b, n, d, c, k = 4, 4, 8, 5, 12  # the queue is full after 3 images: in use for image 4
    protos = rng.normal(size=(c, d)).astype(np.float32)
    prior = rng.dirichlet(np.ones(c)).astype(np.float32)
    fq, oq = init_queue(k, d, with_labels=True), init_queue(k, c)
    ref = NpQueues(k, d, c)
    fn = jax.jit(functools.partial(self_labeling_loss, temperature=T, epsilon=EPS, iterations=ITERS))
    for step in range(3):  # step 2 and 3 run with a full queue that wraps around
        feats, logits, labels = _inputs(rng, b, n, d, c)
        loss, fq, oq = fn(feats, logits, protos, fq, oq, labels, prior)
        want, flag = np_self_labeling(feats.astype(np.float64), logits.astype(np.float64),
                                      protos.astype(np.float64), ref, labels, prior.astype(np.float64))
        np.testing.assert_allclose(float(loss), want, rtol=2e-5)
        _assert_queues(fq, oq, ref)
        assert bool(fq.was_in_use) == flag
        assert flag == (step > 0 or b * n > k)


def test_batched_variant_matches_numpy():
    rng = np.random.default_rng(1)
    b, n, d, c, k = 4, 4, 8, 5, 24
    protos = rng.normal(size=(c, d)).astype(np.float32)
    prior = rng.dirichlet(np.ones(c)).astype(np.float32)
    fq, oq = init_queue(k, d, with_labels=True), init_queue(k, c)
    ref = NpQueues(k, d, c)
    fn = jax.jit(functools.partial(self_labeling_loss, batched=True))
    for _ in range(3):  # the third step uses the full queue
        feats, logits, labels = _inputs(rng, b, n, d, c)
        loss, fq, oq = fn(feats, logits, protos, fq, oq, labels, prior)
        want, flag = np_self_labeling(feats.astype(np.float64), logits.astype(np.float64),
                                      protos.astype(np.float64), ref, labels, prior.astype(np.float64), batched=True)
        np.testing.assert_allclose(float(loss), want, rtol=2e-5)
        _assert_queues(fq, oq, ref)
        assert bool(fq.was_in_use) == flag
    assert flag


def _sharded(batched, check_vma):
    def per_device(feats, logits, labels, protos, fq, oq, prior):
        def loss_fn(p):
            return self_labeling_loss(feats, logits, p, fq, oq, labels, prior, batched=batched, axis_name="data")
        (share, (fq2, oq2)), grad = jax.value_and_grad(lambda p: (lambda r: (r[0], r[1:]))(loss_fn(p)),
                                                       has_aux=True)(protos)
        total = jax.lax.psum(share, "data")
        if not check_vma:
            grad = jax.lax.psum(grad, "data")
        # With check_vma, shard_map already sums the gradient of the replicated prototypes over
        # devices (the transpose of their implicit broadcast is a psum): it is the global one.
        # Stack every device's queues so the test can see they are identical.
        return total[None], grad[None], fq2.rows[None], fq2.labels[None], oq2.rows[None]

    rep = P()
    return jax.jit(jax.shard_map(
        per_device, mesh=_mesh(),
        in_specs=(P("data"), P("data"), P("data"), rep, rep, rep, rep),
        out_specs=(P("data"),) * 5, check_vma=check_vma))


def _single(batched):
    def fn(feats, logits, labels, protos, fq, oq, prior):
        def loss_fn(p):
            loss, fq2, oq2 = self_labeling_loss(feats, logits, p, fq, oq, labels, prior, batched=batched)
            return loss, (fq2, oq2)
        return jax.value_and_grad(loss_fn, has_aux=True)(protos)
    return jax.jit(fn)


def _compare_devices(batched, k, check_vma=True):
    rng = np.random.default_rng(2 + batched)
    b, n, d, c = 4, 4, 8, 5
    protos = rng.normal(size=(c, d)).astype(np.float32)
    prior = rng.dirichlet(np.ones(c)).astype(np.float32)
    fq, oq = init_queue(k, d, with_labels=True), init_queue(k, c)
    fq_1, oq_1 = fq, oq
    sharded, single = _sharded(batched, check_vma), _single(batched)
    for _ in range(3):
        feats, logits, labels = _inputs(rng, b, n, d, c)
        (loss, (fq_1, oq_1)), grad = single(feats, logits, labels, protos, fq_1, oq_1, prior)
        total, grads, f_rows, f_labels, o_rows = sharded(feats, logits, labels, protos, fq, oq, prior)
        np.testing.assert_allclose(np.asarray(total), float(loss), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grads), np.broadcast_to(grad, grads.shape), rtol=1e-4, atol=1e-6)
        for dev in range(4):  # identical on every device, equal to single device
            np.testing.assert_array_equal(np.asarray(f_rows[dev]), np.asarray(f_rows[0]))
            np.testing.assert_array_equal(np.asarray(f_labels[dev]), np.asarray(f_labels[0]))
            np.testing.assert_array_equal(np.asarray(o_rows[dev]), np.asarray(o_rows[0]))
        np.testing.assert_allclose(np.asarray(f_rows[0]), np.asarray(fq_1.rows), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(f_labels[0]), np.asarray(fq_1.labels))
        np.testing.assert_allclose(np.asarray(o_rows[0]), np.asarray(oq_1.rows), rtol=1e-6)
        fq = fq.replace(rows=f_rows[0], labels=f_labels[0], ptr=fq_1.ptr, count=fq_1.count, was_in_use=fq_1.was_in_use)
        oq = oq.replace(rows=o_rows[0], ptr=oq_1.ptr, count=oq_1.count, was_in_use=oq_1.was_in_use)
    assert bool(fq_1.was_in_use)


def test_scan_on_four_devices_equals_single_device():
    _compare_devices(batched=False, k=12)


def test_batched_on_four_devices_equals_single_device():
    _compare_devices(batched=True, k=24)


def test_scan_on_four_devices_without_vma_checks():
    # The project's data-parallel wrapper runs shard_map with check_vma=False (psum of grads).
    _compare_devices(batched=False, k=12, check_vma=False)


def test_gradient_reaches_prototypes_only():
    rng = np.random.default_rng(5)
    b, n, d, c, k = 2, 4, 8, 5, 4
    feats, logits, labels = _inputs(rng, b, n, d, c)
    protos = rng.normal(size=(c, d)).astype(np.float32)
    prior = rng.dirichlet(np.ones(c)).astype(np.float32)
    fq, oq = init_queue(k, d, with_labels=True), init_queue(k, c)

    def loss(f, lg, p):
        return self_labeling_loss(f, lg, p, fq, oq, labels, prior)[0]

    g_f, g_l, g_p = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(feats, logits, protos)
    assert np.all(np.asarray(g_f) == 0) and np.all(np.asarray(g_l) == 0)
    assert np.abs(np.asarray(g_p)).max() > 1e-4


def test_sampling_helpers():
    rng = np.random.default_rng(6)
    maps = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    idx = np.asarray(sample_positions(jax.random.key(0), 35, 6))
    assert len(set(idx.tolist())) == 6 and idx.min() >= 0 and idx.max() < 35
    np.testing.assert_array_equal(np.asarray(gather_positions(jnp.asarray(maps), jnp.asarray(idx))),
                                  maps.reshape(2, 35, 3)[:, idx])
    label_map = rng.integers(0, 255, size=(2, 5, 7))
    np.testing.assert_array_equal(np.asarray(queue_push_labels(jnp.asarray(label_map), jnp.asarray(idx))),
                                  label_map.reshape(2, -1)[:, :6])  # quirk: the top row
    np.testing.assert_array_equal(
        np.asarray(queue_push_labels(jnp.asarray(label_map), jnp.asarray(idx), quirk=False)),
        label_map.reshape(2, -1)[:, idx])
