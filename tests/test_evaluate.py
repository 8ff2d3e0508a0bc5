"""Confusion matrix and IoU against NumPy float64 references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cpsl_jax import evaluate

C = 5
OUT_HW = (6, 9)      # logits resolution
LABEL_HW = (21, 33)  # label resolution


def _np_upsample_align_corners(x, out_hw):
    """Bilinear align_corners=True of an (h, w, C) map in float64, as a 2-D weighted gather."""
    h, w = x.shape[:2]
    H, W = out_hw
    ys = np.arange(H) * (h - 1) / (H - 1)
    xs = np.arange(W) * (w - 1) / (W - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    x = x.astype(np.float64)
    return ((1 - wy) * (1 - wx) * x[y0][:, x0] + (1 - wy) * wx * x[y0][:, x1]
            + wy * (1 - wx) * x[y1][:, x0] + wy * wx * x[y1][:, x1])


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_confusion(logits, labels, valid, flip_logits=None):
    cm = np.zeros((C, C), np.int64)
    for i in range(len(logits)):
        if not valid[i]:
            continue
        if flip_logits is None:
            score = _np_upsample_align_corners(logits[i], LABEL_HW)
        else:
            score = (_np_upsample_align_corners(_np_softmax(logits[i].astype(np.float64)),
                                                LABEL_HW)
                     + _np_upsample_align_corners(
                         _np_softmax(flip_logits[i].astype(np.float64)), LABEL_HW)[:, ::-1]) / 2
        pred = score.argmax(-1)
        lab = labels[i].astype(np.int64)
        keep = lab < C
        for t, p in zip(lab[keep], pred[keep]):
            cm[t, p] += 1
    return cm


def _batch(seed, b):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, *OUT_HW, C)).astype(np.float32) * 3
    labels = rng.integers(0, C, size=(b, *LABEL_HW)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = 255  # ignore pixels
    return logits, labels


def test_confusion_matrix_matches_numpy_with_ignore_and_padding():
    logits, labels = _batch(0, 3)
    valid = np.array([True, True, False])  # the last entry pads the batch
    got = jax.jit(evaluate.confusion_matrix, static_argnums=3)(logits, labels, valid, C)
    want = _np_confusion(logits, labels, valid)
    np.testing.assert_array_equal(np.asarray(got), want)
    # Every labelled pixel of the valid images is counted once; the padded image not at all.
    assert int(got.sum()) == int((labels[:2] != 255).sum())


def test_confusion_matrix_flip_averaging_matches_numpy():
    logits, labels = _batch(1, 2)
    flip_logits = np.random.default_rng(2).normal(size=logits.shape).astype(np.float32) * 3
    valid = np.array([True, True])
    # The caller flips the flipped image's logits back; the reference flips after upsampling.
    got = evaluate.confusion_matrix(logits, labels, valid, C, flip_logits=flip_logits[:, :, ::-1])
    want = _np_confusion(logits, labels, valid, flip_logits)
    np.testing.assert_array_equal(np.asarray(got), want)
    # Flip averaging changes the predictions (so the branch is actually exercised).
    assert not np.array_equal(want, _np_confusion(logits, labels, valid))


def test_confusion_matrix_sharded_equals_single_device():
    n = 4
    logits, labels = _batch(3, 2 * n)
    valid = np.array([True] * (2 * n - 3) + [False] * 3)
    mesh = jax.make_mesh((n,), ('data',), devices=jax.devices()[:n])
    fn = jax.shard_map(
        lambda lg, lab, ok: evaluate.confusion_matrix(lg, lab, ok, C, axis_name='data'),
        mesh=mesh, in_specs=(P('data'), P('data'), P('data')), out_specs=P())
    # Host arrays become global arrays split over 'data', as the evaluation loop does.
    sharding = jax.sharding.NamedSharding(mesh, P('data'))
    args = [jax.device_put(a, sharding) for a in (logits, labels, valid)]
    sharded = np.asarray(jax.jit(fn)(*args))
    single = np.asarray(evaluate.confusion_matrix(logits, labels, valid, C))
    np.testing.assert_array_equal(sharded, single)
    np.testing.assert_array_equal(single, _np_confusion(logits, labels, valid))
    np.testing.assert_array_equal(evaluate.sum_over_processes(sharded), single)
    # The same per-device function under pmap.
    pm = jax.pmap(lambda lg, lab, ok: evaluate.confusion_matrix(lg, lab, ok, C, axis_name='data'),
                  axis_name='data', devices=jax.devices()[:n])
    split = lambda a: a.reshape(n, 2, *a.shape[1:])
    per_device = np.asarray(pm(split(logits), split(labels), split(valid)))
    for d in range(n):
        np.testing.assert_array_equal(per_device[d], single)


def test_iou_from_confusion_matches_numpy():
    rng = np.random.default_rng(4)
    k = 16
    cm = rng.integers(0, 50, size=(k, k)).astype(np.int64)
    cm[7, :] = 0  # class 7 absent from labels and predictions -> NaN, skipped by the mean
    cm[:, 7] = 0
    cm[9, :] = 0  # class 9 predicted but never labelled -> IoU 0, counted
    res = evaluate.iou_from_confusion(cm, subsets={'miou_13': evaluate.SYNTHIA_13_OF_16})
    want = []
    for c in range(k):
        tp = cm[c, c]
        union = cm[c, :].sum() + cm[:, c].sum() - tp
        want.append(tp / union if union > 0 else np.nan)
    want = np.array(want)
    np.testing.assert_allclose(res['per_class_iou'], want, rtol=1e-15)
    assert np.isnan(res['per_class_iou'][7]) and res['per_class_iou'][9] == 0
    present = [c for c in range(k) if c != 7]
    np.testing.assert_allclose(res['miou'], np.mean(want[present]), rtol=1e-14)
    kept13 = [c for c in present if c not in (3, 4, 5)]
    assert len(evaluate.SYNTHIA_13_OF_16) == 13
    np.testing.assert_allclose(res['miou_13'], np.mean(want[kept13]), rtol=1e-14)
    np.testing.assert_allclose(res['pixel_accuracy'], np.trace(cm) / cm.sum(), rtol=1e-14)

    table = evaluate.format_iou_table(res, [f'class{c}' for c in range(k)])
    assert f'{100 * want[0]:6.2f}' in table.splitlines()[1]
    with pytest.raises(ValueError, match='class names'):
        evaluate.format_iou_table(res, ['a'])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match='num_classes'):
        evaluate.confusion_matrix(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 4, 4), jnp.uint8),
                                  None, 4)
    with pytest.raises(ValueError, match='square'):
        evaluate.iou_from_confusion(np.zeros((3, 4)))
