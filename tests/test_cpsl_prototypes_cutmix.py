"""Prototypes, rectification, class prior and CutMix of cpsl_jax.cpsl vs NumPy references."""

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from cpsl_jax.cpsl import (
    box_from_uniforms, box_mask, class_pixel_counts, class_prior, cosine_scores, ema_prototypes,
    image_class_means, init_prototype_state, mix_images, mix_labels, rectify_pseudo_labels,
    sample_cutmix, update_prototype_state)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_prototype_pass(batches, c, d, cap, min_pixels=10):
    """The reference's loops: per image, per class, masked mean, then the capped running mean."""
    means, counts = np.zeros((c, d)), np.zeros(c)
    for feats, logits in batches:
        pred = logits.argmax(-1)
        for n in range(feats.shape[0]):
            for t in range(c):
                m = pred[n] == t
                if m.sum() < min_pixels:
                    continue
                v = feats[n][m].mean(0)
                if v.sum() == 0:
                    continue
                means[t] = (means[t] * counts[t] + v) / (counts[t] + 1)
                counts[t] = min(counts[t] + 1, cap)
    return means, counts


def _batch(rng, b, h, w, d, c, absent):
    feats = rng.normal(size=(b, h, w, d)).astype(np.float32)
    logits = rng.normal(size=(b, h, w, c)).astype(np.float32)
    logits[..., absent] -= 100.0  # an empty class
    logits[0, :1, :, 1] += 100.0  # class 1 has w < 10 pixels in image 0
    logits[0, 1:, :, 1] -= 100.0
    return feats, logits


def test_prototype_running_mean_matches_reference_loop():
    rng = np.random.default_rng(0)
    b, h, w, d, c, cap = 3, 6, 7, 5, 4, 4.0  # a small cap so it is reached
    batches = [_batch(rng, b, h, w, d, c, absent=3) for _ in range(3)]
    assert 0 < (batches[0][1][0].argmax(-1) == 1).sum() < 10
    assert not bool(image_class_means(*batches[0])[1][0, 1])
    state = init_prototype_state(c, d)
    update = jax.jit(lambda s, f, lg: update_prototype_state(s, *image_class_means(f, lg), cap=cap))
    for feats, logits in batches:
        state = update(state, feats, logits)
    want_means, want_counts = np_prototype_pass([(f.astype(np.float64), lg) for f, lg in batches], c, d, cap)
    np.testing.assert_allclose(np.asarray(state.counts), want_counts)
    np.testing.assert_allclose(np.asarray(state.means), want_means, rtol=1e-5, atol=1e-6)
    assert want_counts[3] == 0 and want_counts.max() == cap

    # Four devices, one image each: every device ends with the state of the device-order scan.
    feats = np.concatenate([f for f, _ in batches])[:4]
    logits = np.concatenate([lg for _, lg in batches])[:4]
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.jit(jax.shard_map(
        lambda f, lg: update_prototype_state(init_prototype_state(c, d), *image_class_means(f, lg), cap=cap,
                                             axis_name="data"),
        mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))
    got = sharded(feats, logits)
    want = update_prototype_state(init_prototype_state(c, d), *image_class_means(feats, logits), cap=cap)
    np.testing.assert_array_equal(np.asarray(got.counts), np.asarray(want.counts))
    np.testing.assert_allclose(np.asarray(got.means), np.asarray(want.means), rtol=1e-6)


def test_rectification_cosine_and_ema():
    rng = np.random.default_rng(1)
    b, h, w, d, c, temp = 2, 4, 5, 6, 5, 0.08
    feats = rng.normal(size=(b, h, w, d))
    protos = rng.normal(size=(c, d))
    soft = _softmax(rng.normal(size=(b, h, w, c)) * 2)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    cos = unit(feats) @ unit(protos).T
    got_cos = cosine_scores(jnp.asarray(feats, jnp.float32), jnp.asarray(protos, jnp.float32))
    np.testing.assert_allclose(np.asarray(got_cos), cos, rtol=1e-5, atol=1e-6)
    rect = _softmax(cos / temp) * soft
    conf = rect.max(-1) / rect.sum(-1)
    for threshold in (0.0, float(np.median(conf))):
        want = np.where(conf < threshold, 255, rect.argmax(-1))
        got = rectify_pseudo_labels(jnp.asarray(feats, jnp.float32), jnp.asarray(soft, jnp.float32),
                                    jnp.asarray(protos, jnp.float32), temperature=temp, threshold=threshold)
        np.testing.assert_array_equal(np.asarray(got), want)
    assert np.any(np.asarray(got) == 255)
    p_ema, p = rng.normal(size=(c, d)), rng.normal(size=(c, d))
    np.testing.assert_allclose(np.asarray(ema_prototypes(jnp.asarray(p_ema), jnp.asarray(p))),
                               0.999 * p_ema + 0.001 * p, rtol=1e-6)


def test_class_counts_and_prior():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 5, 6, 6)).astype(np.float32)
    logits[..., 4] -= 100.0  # class 4 never predicted
    valid = rng.random((4, 5, 6)) < 0.8
    want = np.bincount(logits.argmax(-1)[valid], minlength=6).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(class_pixel_counts(logits, jnp.asarray(valid))), want)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    got = jax.jit(jax.shard_map(lambda lg, v: class_pixel_counts(lg, v, axis_name="data"), mesh=mesh,
                                in_specs=(P("data"), P("data")), out_specs=P()))(logits, valid)
    np.testing.assert_array_equal(np.asarray(got), want)
    prior = np.asarray(class_prior(jnp.asarray(want)))
    np.testing.assert_allclose(prior.sum(), 1.0, rtol=1e-6)
    assert prior[4] > 0
    nonzero = want > 0
    np.testing.assert_allclose(prior[nonzero] / prior[nonzero].sum(), want[nonzero] / want.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(class_prior(jnp.zeros(6))), np.full(6, 1 / 6), rtol=1e-6)


def np_rand_bbox(u_aspect, u_y, u_x, shape):
    """The reference's box arithmetic (area 0.5, random aspect) in float64 with given draws."""
    y_props = np.exp(u_aspect * np.log(0.5))
    x_props = 0.5 / y_props
    sizes = np.round(np.array([y_props, x_props]) * np.array(shape))
    pos = np.round((np.array(shape) - sizes) * np.array([u_y, u_x]))
    return np.concatenate([pos, pos + sizes]).astype(np.int16)


def test_cutmix_box_and_mixing_match_reference():
    rng = np.random.default_rng(3)
    full = (16, 28)  # 4x the label map (as 512x896 vs 128x224)
    for _ in range(20):
        u = rng.random(3)
        box = np.asarray(box_from_uniforms(*[jnp.float32(x) for x in u], full))
        np.testing.assert_array_equal(box, np_rand_bbox(*u, full))
    y0, x0, y1, x1 = box
    b = 2
    target_img = rng.random((b, *full, 3)).astype(np.float32)
    source_img = rng.random((b, *full, 3)).astype(np.float32)
    want_img = target_img.copy()
    want_img[:, y0:y1, x0:x1] = source_img[:, y0:y1, x0:x1]
    np.testing.assert_array_equal(np.asarray(mix_images(target_img, source_img, jnp.asarray(box), True)), want_img)
    np.testing.assert_array_equal(np.asarray(mix_images(target_img, source_img, jnp.asarray(box), False)), target_img)
    # Labels: x4 nearest up, paste the full-resolution source label, x0.25 nearest down.
    low = rng.integers(0, 19, size=(b, 4, 7)).astype(np.uint8)
    src = rng.integers(0, 19, size=(b, *full)).astype(np.uint8)
    up = low.repeat(4, axis=1).repeat(4, axis=2)
    up[:, y0:y1, x0:x1] = src[:, y0:y1, x0:x1]
    want = up[:, ::4, ::4]
    np.testing.assert_array_equal(np.asarray(mix_labels(low, src, jnp.asarray(box), True)), want)
    # A box mask at full resolution is the box itself.
    mask = np.zeros(full, bool)
    mask[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(np.asarray(box_mask(jnp.asarray(box), full)), mask)


def test_sample_cutmix_draws():
    keys = jax.random.split(jax.random.key(0), 200)
    apply, boxes = jax.vmap(lambda k: sample_cutmix(k, (512, 896)))(keys)
    boxes = np.asarray(boxes)
    assert 0.35 < np.asarray(apply).mean() < 0.65
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= 512) and np.all(boxes[:, 3] <= 896)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (512 * 896)
    np.testing.assert_allclose(area, 0.5, atol=0.01)
