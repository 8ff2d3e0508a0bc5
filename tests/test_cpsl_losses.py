"""Losses of cpsl_jax.cpsl against NumPy float64 references, on one and four devices."""

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from cpsl_jax.cpsl import (
    anchor_labels, contrastive_share, cross_entropy, distillation_kl, prototype_consistency,
    queue_contrastive, reverse_cross_entropy, sample_anchors, symmetric_cross_entropy)

IGN = 255


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_ce(logits, labels):
    valid = labels != IGN
    logp = np.log(_softmax(logits))
    safe = np.where(valid, labels, 0)
    nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    return (nll * valid).sum() / valid.sum()


def np_rce(logits, labels):
    c = logits.shape[-1]
    valid = labels != IGN
    p = np.clip(_softmax(logits), 1e-7, 1.0)
    onehot = np.clip(np.eye(c + 1)[np.where(valid, labels, c)][..., :c], 1e-4, 1.0)
    return -((p * np.log(onehot)).sum(-1) * valid).sum() / (valid.sum() + 1e-6)


def np_consistency(t_scores, s_scores, valid, temp):
    t = _softmax(t_scores / temp)
    log_s = np.log(_softmax(s_scores / temp))
    mask = np.broadcast_to(valid[..., None], t.shape)
    return (t * (np.log(t) - log_s) * mask).sum() / mask.sum()


def np_kd(student, teacher, quirk):
    t = _softmax(teacher)
    s = _softmax(student) if quirk else np.log(_softmax(student))
    return (t * (np.log(t) - s)).sum() / t.size


def np_contrastive(anchors, a_labels, queue, q_labels, temp):
    mask = (a_labels[:, None] == q_labels[None, :]).astype(np.float64)
    logits = anchors @ queue.T / temp
    logits = logits - logits.max(1, keepdims=True)
    neg = (np.exp(logits) * (1 - mask)).sum(1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits) + neg)
    return -((mask * log_prob).sum(1) / (mask.sum(1) + 1e-5)).mean()


def _labels(rng, shape, c, ignore_fracs):
    """Labels with a different ignored fraction per image (one image per device)."""
    lab = rng.integers(0, c, size=shape)
    for i, frac in enumerate(ignore_fracs):
        lab[i][rng.random(shape[1:]) < frac] = IGN
    return lab.astype(np.int32)


def _mesh():
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))


def test_ce_rce_shares_psum_to_global_loss():
    rng = np.random.default_rng(0)
    b, h, w, c = 4, 5, 6, 7
    logits = (rng.normal(size=(b, h, w, c)) * 3).astype(np.float32)
    labels = _labels(rng, (b, h, w), c, [0.0, 0.3, 0.9, 1.0])  # last image: nothing valid
    ce, rce = np_ce(logits.astype(np.float64), labels), np_rce(logits.astype(np.float64), labels)
    np.testing.assert_allclose(float(cross_entropy(logits, labels)), ce, rtol=1e-5)
    np.testing.assert_allclose(float(reverse_cross_entropy(logits, labels)), rce, rtol=1e-5)
    np.testing.assert_allclose(float(symmetric_cross_entropy(logits, labels)), 0.1 * ce + rce, rtol=1e-5)

    def per_device(lg, lb):
        shares = (cross_entropy(lg, lb, axis_name="data"), reverse_cross_entropy(lg, lb, axis_name="data"),
                  symmetric_cross_entropy(lg, lb, axis_name="data"))
        return jnp.stack(shares)[None]

    shares = jax.jit(jax.shard_map(per_device, mesh=_mesh(), in_specs=(P("data"), P("data")),
                                   out_specs=P("data")))(logits, labels)
    np.testing.assert_allclose(np.asarray(shares).sum(0), [ce, rce, 0.1 * ce + rce], rtol=1e-5)
    # Shares differ per device (different valid counts) yet sum to the global loss.
    assert np.ptp(np.asarray(shares)[:, 0]) > 1e-3


def test_ce_gradient_sums_to_global_gradient():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
    labels = _labels(rng, (4, 3, 3), 5, [0.1, 0.5, 0.0, 0.7])
    want = jax.grad(cross_entropy)(logits, labels)
    got = jax.jit(jax.shard_map(jax.grad(lambda lg, lb: cross_entropy(lg, lb, axis_name="data")), mesh=_mesh(),
                                in_specs=(P("data"), P("data")), out_specs=P("data")))(logits, labels)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-8)


def test_consistency_and_kd_shares():
    rng = np.random.default_rng(2)
    b, h, w, c, temp = 4, 4, 5, 6, 0.08
    t_scores = rng.uniform(-1, 1, size=(b, h, w, c)).astype(np.float32)
    s_scores = rng.uniform(-1, 1, size=(b, h, w, c)).astype(np.float32)
    valid = rng.random((b, h, w)) < np.array([0.9, 0.5, 0.2, 0.7])[:, None, None]
    student = (rng.normal(size=(b, h, w, c)) * 2).astype(np.float32)
    teacher = (rng.normal(size=(b, h, w, c)) * 2).astype(np.float32)
    want_cons = np_consistency(t_scores.astype(np.float64), s_scores.astype(np.float64), valid, temp)
    want_kd = [np_kd(student.astype(np.float64), teacher.astype(np.float64), q) for q in (True, False)]
    np.testing.assert_allclose(float(prototype_consistency(t_scores, s_scores, valid[..., None], temp)),
                               want_cons, rtol=1e-4)
    np.testing.assert_allclose(float(distillation_kl(student, teacher)), want_kd[0], rtol=1e-5)
    np.testing.assert_allclose(float(distillation_kl(student, teacher, quirk=False)), want_kd[1], rtol=1e-4)

    def per_device(ts, ss, v, st, te):
        return jnp.stack([prototype_consistency(ts, ss, v[..., None], temp, axis_name="data"),
                          distillation_kl(st, te, axis_name="data"),
                          distillation_kl(st, te, quirk=False, axis_name="data")])[None]

    shares = jax.jit(jax.shard_map(per_device, mesh=_mesh(), in_specs=(P("data"),) * 5, out_specs=P("data")))(
        t_scores, s_scores, valid, student, teacher)
    np.testing.assert_allclose(np.asarray(shares).sum(0), [want_cons] + want_kd, rtol=1e-4)
    # The teacher gets no gradient, the student does.
    g_t, g_s = jax.grad(lambda a, b_: prototype_consistency(a, b_, valid[..., None], temp), argnums=(0, 1))(
        t_scores, s_scores)
    assert np.all(np.asarray(g_t) == 0) and np.abs(np.asarray(g_s)).max() > 0


def test_queue_contrastive_matches_reference_and_gradients():
    rng = np.random.default_rng(3)
    n, k, d, c = 6, 20, 8, 3
    anchors = rng.normal(size=(n, d))
    anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
    queue = rng.normal(size=(k, d))
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    a_labels = rng.integers(0, c, size=n)
    q_labels = rng.integers(0, c, size=k)
    a_labels[0] = IGN  # ignore == ignore is a positive (quirk)
    q_labels[:2] = IGN
    a_labels[1] = 2
    q_labels[q_labels == 2] = 1  # an anchor without positives
    want = np_contrastive(anchors, a_labels, queue, q_labels, 0.08)
    args = [jnp.asarray(x, jnp.float32) if x.dtype.kind == "f" else jnp.asarray(x) for x in
            (anchors, a_labels, queue, q_labels)]
    np.testing.assert_allclose(float(queue_contrastive(*args, 0.08)), want, rtol=1e-5)
    g_a, g_q = jax.grad(lambda a, q: queue_contrastive(a, args[1], q, args[3], 0.08), argnums=(0, 1))(args[0], args[2])
    assert np.abs(np.asarray(g_a)).max() > 1e-3 and np.all(np.asarray(g_q) == 0)


def test_contrastive_share_and_anchor_sampling():
    rng = np.random.default_rng(4)
    b, h, w, d, k, n, c = 4, 5, 6, 8, 16, 7, 3
    feats = rng.normal(size=(b, h, w, d)).astype(np.float32)
    queue = rng.normal(size=(k, d)).astype(np.float32)
    q_labels = rng.integers(0, c, size=k).astype(np.int32)
    label_map = rng.integers(0, c, size=(b, 9, 11)).astype(np.int32)  # a larger "teacher grid" map
    anchors, idx = sample_anchors(jax.random.key(0), jnp.asarray(feats), n, jnp.arange(b))
    idx = np.asarray(idx)
    assert all(len(set(r.tolist())) == n for r in idx) and len({tuple(r) for r in idx}) == b
    flat = feats.reshape(b, h * w, d)
    rows = np.stack([flat[i, idx[i]] for i in range(b)])
    np.testing.assert_allclose(np.asarray(anchors), rows / np.linalg.norm(rows, axis=-1, keepdims=True), rtol=1e-5)
    labels_q = np.asarray(anchor_labels(jnp.asarray(label_map), jnp.asarray(idx), (h, w)))
    np.testing.assert_array_equal(labels_q, np.stack([label_map[i].reshape(-1)[idx[i]] for i in range(b)]))
    on_grid = label_map[:, :h, :w]
    labels_c = np.asarray(anchor_labels(jnp.asarray(on_grid), jnp.asarray(idx), (h, w), quirk=False))
    np.testing.assert_array_equal(labels_c, np.stack([on_grid[i].reshape(-1)[idx[i]] for i in range(b)]))
    want = np.mean([np_contrastive(np.asarray(anchors[i], np.float64), labels_q[i], queue.astype(np.float64),
                                   q_labels, 0.08) for i in range(b)])
    np.testing.assert_allclose(float(contrastive_share(anchors, jnp.asarray(labels_q), queue, q_labels)), want,
                               rtol=1e-5)
    shares = jax.jit(jax.shard_map(
        lambda a, la: contrastive_share(a, la, queue, q_labels, axis_name="data")[None], mesh=_mesh(),
        in_specs=(P("data"), P("data")), out_specs=P("data")))(anchors, jnp.asarray(labels_q))
    np.testing.assert_allclose(float(np.asarray(shares).sum()), want, rtol=1e-5)
