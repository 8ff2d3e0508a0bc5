"""Colour transfer, weak view and map transport vs skimage / PIL / NumPy float64 replays."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cpsl_jax.data.augment import (full2weak, lab_mean_std, lab_transfer, move_to_weak, sample_weak,
                                   soft_label_to_weak, weak_view)

BASE, CROP = (32, 64), (16, 24)


# ---------------------------------------------------------------- NumPy float64 replays

def np_resize_ac(x: np.ndarray, out_hw) -> np.ndarray:
    """F.interpolate(bilinear, align_corners=True) on (H, W, C), float64."""
    def axis(x, n_out, ax):
        n_in = x.shape[ax]
        c = np.zeros(n_out) if n_out == 1 else np.arange(n_out) * (n_in - 1) / (n_out - 1)
        lo = np.floor(c).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        f = (c - lo).reshape([-1 if a == ax else 1 for a in range(x.ndim)])
        return np.take(x, lo, ax) * (1 - f) + np.take(x, hi, ax) * f
    return axis(axis(x.astype(np.float64), out_hw[0], 0), out_hw[1], 1)


def weak_params_list(p):
    return [tuple(int(t[i]) for t in (p.w, p.h, p.x1, p.y1, p.flip)) for i in range(p.w.shape[0])]


# ---------------------------------------------------------------- colour transfer

@pytest.mark.parametrize("hw", [(13, 29), (48, 80)])
def test_lab_transfer_matches_skimage(hw):
    from skimage import color
    rng = np.random.default_rng(hw[0])
    src = rng.integers(0, 256, (2,) + hw + (3,), dtype=np.uint8)
    tgt = rng.integers(0, 256, (2, hw[0] + 5, hw[1], 3), dtype=np.uint8)
    tgt[1] = (tgt[1] * 0.4 + 90).astype(np.uint8)  # a low-contrast target
    mean, std = lab_mean_std(jnp.asarray(tgt))
    out = np.asarray(jax.jit(lab_transfer)(jnp.asarray(src), mean, std))
    assert out.dtype == np.uint8
    for i in range(2):
        lab, t = color.rgb2lab(src[i]), color.rgb2lab(tgt[i])
        np.testing.assert_allclose(np.asarray(mean[i]), t.reshape(-1, 3).mean(0), atol=2e-3)
        np.testing.assert_allclose(np.asarray(std[i]), t.reshape(-1, 3).std(0), atol=2e-3)
        for c in range(3):
            lab[..., c] = (lab[..., c] - lab[..., c].mean()) / lab[..., c].std() * t[..., c].std() + t[..., c].mean()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = np.clip(color.lab2rgb(lab) * 255, 0, 255).astype(np.uint8)
        diff = np.abs(out[i].astype(int) - ref)
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_lab_transfer_rejects_bad_stats():
    with pytest.raises(ValueError, match="tgt_mean"):
        lab_transfer(jnp.zeros((2, 4, 4, 3), jnp.uint8), jnp.zeros((3, 3)), jnp.ones((2, 3)))


# ---------------------------------------------------------------- weak view

def _weak(seed, batch=4, base=BASE, crop=CROP, width=70):
    return sample_weak(jax.random.PRNGKey(seed), batch, base, crop, base_width=width)


def test_sample_weak_ranges():
    p = sample_weak(jax.random.PRNGKey(0), 512, (1024, 2048), (512, 896))
    w, h, x1, y1 = (np.asarray(t) for t in (p.w, p.h, p.x1, p.y1))
    assert w.min() >= 1100 and w.max() <= 3300 and np.all(h == (w / 2.0).astype(int))
    assert np.all(x1 >= 0) and np.all(x1 <= w - 896) and np.all(y1 >= 0) and np.all(y1 <= h - 512)
    assert 0.35 < np.asarray(p.flip).mean() < 0.65
    with pytest.raises(ValueError, match="smaller than the crop"):
        sample_weak(jax.random.PRNGKey(0), 2, (1024, 2048), (512, 896), scale=(0.3, 1.0))


@pytest.mark.parametrize("seed", [1, 2])
def test_weak_view_matches_pil(seed):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (4,) + BASE + (3,), dtype=np.uint8)
    p = _weak(seed)
    out = np.asarray(jax.jit(weak_view)(jnp.asarray(imgs), p)) * 255.0
    assert out.shape == (4,) + CROP + (3,)
    np.testing.assert_allclose(out, np.round(out), atol=1e-3)  # 8-bit levels, as PIL
    for i, (w, h, x1, y1, f) in enumerate(weak_params_list(p)):
        ref = np.array(Image.fromarray(imgs[i]).resize((w, h), Image.BILINEAR).crop((x1, y1, x1 + CROP[1], y1 + CROP[0])))
        ref = ref[:, ::-1] if f else ref
        diff = np.abs(np.round(out[i]).astype(int) - ref)
        assert diff.max() <= 1 and (diff == 0).mean() > 0.9


def test_move_to_weak_nearest_matches_pil_labels():
    rng = np.random.default_rng(3)
    # Blocky labels at a realistic ratio (ties of the nearest rule are rare there).
    base = (64, 128)
    labels = np.repeat(np.repeat(rng.integers(0, 19, (1, 16, 32, 1), dtype=np.uint8), 4, 1), 4, 2)
    labels = np.concatenate([labels, rng.integers(0, 19, (3,) + base + (1,), dtype=np.uint8)])
    p = _weak(4, base=base, crop=(32, 48), width=140)
    moved = np.asarray(move_to_weak(jnp.asarray(labels), p, (32, 48), "nearest"))
    quarter = np.asarray(move_to_weak(jnp.asarray(labels), p, (8, 12), "nearest"))
    assert moved.dtype == np.uint8
    for i, (w, h, x1, y1, f) in enumerate(weak_params_list(p)):
        ref = np.array(Image.fromarray(labels[i, ..., 0]).resize((w, h), Image.NEAREST).crop((x1, y1, x1 + 48, y1 + 32)))
        ref = ref[:, ::-1] if f else ref
        assert (moved[i, ..., 0] == ref).mean() > 0.95
        # Legacy nearest x0.25 of the moved crop (the reference's label path).
        np.testing.assert_array_equal(quarter[i], moved[i, ::4, ::4])


def test_move_to_weak_bilinear_commutes_with_weak_view():
    """A linear ramp encodes each pixel's coordinates: moving it = augmenting it."""
    yy, xx = np.mgrid[:BASE[0], :BASE[1]].astype(np.float64)
    ramp = np.stack([xx / BASE[1], yy / BASE[0], 0 * xx], -1)[None].repeat(4, 0)
    p = _weak(5)
    img = np.asarray(weak_view(jnp.asarray(ramp, jnp.float32), p, quantize=False))
    moved = np.asarray(move_to_weak(jnp.asarray(ramp, jnp.float32), p, CROP, "bilinear"))
    # PIL's pixel-centre grid vs align_corners differ by < one source pixel (scale-dependent):
    # the coordinate maps agree to within a pixel and flips point the same way.
    assert np.abs(img[..., 0] - moved[..., 0]).max() < 1.5 / BASE[1]
    assert np.abs(img[..., 1] - moved[..., 1]).max() < 1.5 / BASE[0]
    slope = np.sign(moved[:, :, -1, 0] - moved[:, :, 0, 0]).mean(1)
    np.testing.assert_array_equal(slope, np.where(np.asarray(p.flip), -1, 1))


def test_full2weak_matches_reference_sequence():
    rng = np.random.default_rng(6)
    base, crop = (64, 128), (32, 48)
    p = _weak(7, base=base, crop=crop, width=140)
    maps = rng.normal(size=(4, base[0] // 4, base[1] // 4, 5)).astype(np.float32)
    out = np.asarray(jax.jit(full2weak)(jnp.asarray(maps), p))
    assert out.shape == (4, crop[0] // 4, crop[1] // 4, 5)
    for i, (w, h, x1, y1, f) in enumerate(weak_params_list(p)):
        r = np_resize_ac(maps[i], (int(h / 4), int(w / 4)))
        r = r[int(y1 / 4):int(y1 / 4) + crop[0] // 4, int(x1 / 4):int(x1 / 4) + crop[1] // 4]
        r = r[:, ::-1] if f else r
        np.testing.assert_allclose(out[i], r, atol=2e-5)


def test_soft_label_path_matches_reference_sequence():
    rng = np.random.default_rng(8)
    base, crop = (64, 128), (32, 48)
    stored = (base[0] // 8 + 1, base[1] // 8 + 1)  # the network's 1/8 grid (129x257 at 1024x2048)
    p = _weak(9, base=base, crop=crop, width=140)
    soft = rng.dirichlet(np.ones(4), size=(4,) + stored).astype(np.float32)
    out = np.asarray(jax.jit(soft_label_to_weak)(jnp.asarray(soft), p))
    assert out.shape == (4, crop[0] // 4, crop[1] // 4, 4)
    for i, (w, h, x1, y1, f) in enumerate(weak_params_list(p)):
        r = np_resize_ac(np_resize_ac(soft[i], base), (h, w))[y1:y1 + crop[0], x1:x1 + crop[1]]
        r = r[:, ::-1] if f else r
        r = np_resize_ac(r, (crop[0] // 4, crop[1] // 4))
        np.testing.assert_allclose(out[i], r, atol=2e-5)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_weak_view_rejects_wrong_size():
    p = _weak(1)
    with pytest.raises(ValueError, match="augment.py"):
        weak_view(jnp.zeros((4, 10, 10, 3), jnp.uint8), p)
