"""Strong view vs PIL (per op and end to end) and ``label_strong_T`` transport vs a PyTorch replay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

import cpsl_jax.data.augment as A
from cpsl_jax.data.transport import OP, OP_NAMES, StrongParams, _magnitude_tables, move_to_strong

CROP = (24, 40)
FILLC = (127, 127, 127)


def make_params(batch, crop, *, flip=False, ops=(), cutout=None, blur=False, jitter=False):
    """StrongParams with chosen draws; ``ops`` = [(name, mag, sign)], all applied."""
    n = max(len(ops), 1)
    op = np.full((batch, n), OP["identity"], np.int32)
    mag = np.ones((batch, n), np.int32)
    sign = np.ones((batch, n), np.int32)
    for k, (name, m, s) in enumerate(ops):
        op[:, k], mag[:, k], sign[:, k] = OP[name], m, s
    box = np.array(cutout if cutout is not None else (crop[1] + 8, crop[0] + 8, crop[1] + 9, crop[0] + 9))
    return StrongParams(flip=jnp.full((batch,), flip), blur=jnp.full((batch,), blur), jitter=jnp.full((batch,), jitter),
                        jitter_order=jnp.tile(jnp.arange(4, dtype=jnp.int32), (batch, 1)),
                        jitter_factors=jnp.tile(jnp.array([1.2, 0.8, 1.3, 0.1], jnp.float32), (batch, 1)),
                        op=jnp.asarray(op), mag=jnp.asarray(mag), sign=jnp.asarray(sign),
                        apply=jnp.ones((batch, n), bool), cutout=jnp.tile(jnp.asarray(box, jnp.int32), (batch, 1)),
                        crop_hw=tuple(crop))


# ---------------------------------------------------------------- PIL replay of the reference

def pil_op(img, name, mag, sign, crop):
    t = _magnitude_tables(crop)
    e = float(mag) * 0.9 / 10 + 0.05
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name in ("brightness", "color", "contrast", "sharpness"):
        cls = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
               "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}[name]
        return cls(img).enhance(e)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "identity":
        return img
    if name == "posterize":
        return ImageOps.posterize(img, int(t["posterize"][mag]))
    if name == "solarize":
        return ImageOps.solarize(img, int(t["solarize"][mag]))
    if name == "rotate":
        return img.rotate(int(t["rotate"][mag]) * sign, resample=Image.BILINEAR, fillcolor=FILLC)
    coeffs = {"shear_x": (1, float(mag) * 0.3 / 10 * sign, 0, 0, 1, 0),
              "shear_y": (1, 0, 0, float(mag) * 0.3 / 10 * sign, 1, 0),
              "translate_x": (1, 0, int(t["translate_x"][mag]) * sign, 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, int(t["translate_y"][mag]) * sign)}[name]
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=FILLC)


def pil_hue(img, factor):
    h, s, v = img.convert("HSV").split()
    nh = np.array(h, np.uint8) + np.uint8(int(factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(nh.astype(np.uint8), "L"), s, v)).convert("RGB")


def pil_strong(img, p, i):
    """The reference's RandAugmentMC.__call__ with the recorded draws of image i."""
    g = lambda a: np.asarray(a)[i]  # noqa: E731
    if g(p.flip):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if g(p.blur):
        img = img.filter(ImageFilter.GaussianBlur(1))
    if g(p.jitter):
        f = g(p.jitter_factors).astype(np.float64)
        fns = [lambda x: ImageEnhance.Brightness(x).enhance(f[0]), lambda x: ImageEnhance.Contrast(x).enhance(f[1]),
               lambda x: ImageEnhance.Color(x).enhance(f[2]), lambda x: pil_hue(x, f[3])]
        for k in g(p.jitter_order):
            img = fns[int(k)](img)
    for k in range(g(p.op).shape[0]):
        if g(p.apply)[k]:
            img = pil_op(img, OP_NAMES[int(g(p.op)[k])],
                         int(g(p.mag)[k]), int(g(p.sign)[k]), p.crop_hw)
    img = img.copy()
    ImageDraw.Draw(img).rectangle(tuple(int(v) for v in g(p.cutout)), FILLC)
    return np.array(img).astype(int)


# ---------------------------------------------------------------- per-op tolerance vs PIL

def _images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2,) + CROP + (3,), dtype=np.uint8)
    yy, xx = np.mgrid[:CROP[0], :CROP[1]]
    smooth = np.clip(np.stack([xx * 6, yy * 9, (xx + yy) * 3], -1) + rng.integers(0, 40, CROP + (3,)), 0, 255)
    return np.concatenate([noise, smooth[None].astype(np.uint8)])


# (op, min fraction exact, max level difference): the table of augment.py's docstring.
# Blends: exact op by op, but XLA fuses Pillow's rounded product and sum into an FMA.
OPS = [("autocontrast", 0.99, 1), ("brightness", 0.995, 1), ("color", 0.995, 1), ("contrast", 0.995, 1),
       ("equalize", 1.0, 0), ("identity", 1.0, 0), ("posterize", 1.0, 0), ("rotate", 0.98, 1),
       ("sharpness", 0.995, 1), ("shear_x", 0.97, 1), ("shear_y", 0.97, 1), ("solarize", 1.0, 0),
       ("translate_x", 1.0, 0), ("translate_y", 1.0, 0)]


@pytest.mark.parametrize("name,min_exact,max_diff", OPS)
def test_randaugment_op_matches_pil(name, min_exact, max_diff):
    imgs = _images()
    for mag, sign in ((1, 1), (9, -1), (4, -1)):
        p = make_params(len(imgs), CROP, ops=[(name, mag, sign)])
        out = np.round(np.asarray(jax.jit(A.strong_view)(jnp.asarray(imgs / 255.0, jnp.float32), p)) * 255).astype(int)
        ref = np.stack([pil_strong(Image.fromarray(im), p, i) for i, im in enumerate(imgs)])
        diff = np.abs(out - ref)
        assert diff.max() <= max_diff and (diff == 0).mean() >= min_exact, (mag, sign, diff.max(), (diff == 0).mean())


def test_blur_jitter_flip_cutout_match_pil():
    imgs = _images()
    box = (5, 3, 5 + CROP[0] // 3, 3 + CROP[0] // 3)
    for order in ([0, 1, 2, 3], [3, 2, 0, 1]):
        p = make_params(len(imgs), CROP, flip=True, blur=True, jitter=True, cutout=box)
        p = p.replace(jitter_order=jnp.tile(jnp.asarray(order, jnp.int32), (len(imgs), 1)),
                      jitter_factors=jnp.tile(jnp.array([0.7, 1.3, 0.65, -0.33], jnp.float32), (len(imgs), 1)))
        out = np.round(np.asarray(A.strong_view(jnp.asarray(imgs / 255.0, jnp.float32), p)) * 255).astype(int)
        ref = np.stack([pil_strong(Image.fromarray(im), p, i) for i, im in enumerate(imgs)])
        diff = np.abs(out - ref)
        # A blend off by one level (FMA, see OPS) can move a hue bin: a few levels, rarely.
        assert (diff == 0).mean() > 0.995 and (diff <= 1).mean() > 0.998


def test_strong_view_random_draws_match_pil():
    imgs = np.concatenate([_images()] * 4)
    p = A.sample_strong(jax.random.PRNGKey(3), len(imgs), CROP)
    out = np.round(np.asarray(jax.jit(A.strong_view)(jnp.asarray(imgs / 255.0, jnp.float32), p)) * 255).astype(int)
    ref = np.stack([pil_strong(Image.fromarray(im), p, i) for i, im in enumerate(imgs)])
    diff = np.abs(out - ref)
    assert (diff <= 1).mean() > 0.98 and (diff == 0).mean() > 0.95


def test_sample_strong_ranges():
    p = A.sample_strong(jax.random.PRNGKey(0), 256, (512, 896))
    mag, op, box = np.asarray(p.mag), np.asarray(p.op), np.asarray(p.cutout)
    assert mag.min() == 1 and mag.max() == 9 and op.min() == 0 and op.max() == 13
    assert np.all(np.sort(np.asarray(p.jitter_order), 1) == np.arange(4))
    side_x, side_y = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    assert np.all(side_x <= 170) and np.all(side_y <= 170) and np.all(box[:, 2] <= 896) and np.all(box[:, 3] <= 512)
    assert (side_x == 170).mean() > 0.5 and np.all(box[:, :2] >= 0)


# ---------------------------------------------------------------- transport (label_strong_T)

def torch_label_strong_t(maps, p, scale, translate_quirk=True):
    """Replay of the reference's label_strong_T + affine_sample with PyTorch, (B, K, h, w)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    t = _magnitude_tables(p.crop_hw)
    x = torch.from_numpy(np.asarray(maps, np.float32)).permute(0, 3, 1, 2) + 1
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        rec = {}
        for k in range(p.op.shape[1]):
            name = OP_NAMES[int(p.op[i, k])]
            if bool(p.apply[i, k]) and name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
                m, s = int(p.mag[i, k]), int(p.sign[i, k])
                rec[name] = {"rotate": int(t["rotate"][m]) * s, "shear_x": float(m) * 0.3 / 10 * s,
                             "shear_y": float(m) * 0.3 / 10 * s, "translate_x": int(t["translate_x"][m]) * s,
                             "translate_y": int(t["translate_y"][m]) * s}[name]
        if bool(p.flip[i]):
            xi = xi.flip(-1)
        for name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
            if name not in rec:
                continue
            v = rec[name]
            if name.startswith("translate"):
                v = int(v // scale)
            h, w = xi.shape[2:]
            th = {"rotate": [[np.cos(v / 180 * np.pi), -np.sin(v / 180 * np.pi), 0], [np.sin(v / 180 * np.pi), np.cos(v / 180 * np.pi), 0]],
                  "shear_x": [[1, v, 0], [0, 1, 0]], "shear_y": [[1, 0, 0], [v, 1, 0]],
                  "translate_x": [[1, 0, v], [0, 1, 0]], "translate_y": [[1, 0, 0], [0, 1, v]]}[name]
            th = np.array(th, np.float64)
            th[0, 1] *= h / w
            th[1, 0] *= w / h
            if name != "rotate":
                th[0, 2] = th[0, 2] * 2 / (h if translate_quirk else w) + th[0, 0] + th[0, 1] - 1
                th[1, 2] = th[1, 2] * 2 / h + th[1, 0] + th[1, 1] - 1
            grid = F.affine_grid(torch.tensor(th, dtype=torch.float32)[None], list(xi.shape), align_corners=False)
            xi = F.grid_sample(xi, grid, mode="nearest", align_corners=False)
        x0, y0, x1, y1 = (int(v) // scale for v in np.asarray(p.cutout[i]))
        xi = xi.clone()
        xi[:, :, y0:y1, x0:x1] = 0
        out.append(xi)
    out = torch.cat(out).permute(0, 2, 3, 1).numpy()
    valid = np.all(out != 0, axis=-1)
    return out - 1, valid


@pytest.mark.parametrize("quirk", [True, False])
def test_move_to_strong_matches_torch_replay(quirk):
    crop, scale = (128, 224), 4
    p = A.sample_strong(jax.random.PRNGKey(7), 24, crop)
    # Make every draw applied and geometric half of the time so the test covers the ops.
    p = p.replace(apply=jnp.ones_like(p.apply))
    rng = np.random.default_rng(1)
    maps = rng.integers(0, 19, (24, crop[0] // scale, crop[1] // scale, 2)).astype(np.float32)
    ours, valid = move_to_strong(jnp.asarray(maps), p, translate_quirk=quirk)
    ref, ref_valid = torch_label_strong_t(maps, p, scale, translate_quirk=quirk)
    ours, valid = np.asarray(ours), np.asarray(valid)
    # The quirk's x offset v * W / H often lands on half pixels, where float32 rounding
    # noise (ours vs PyTorch's affine_grid) decides the tie.
    min_agree = 0.97 if quirk else 0.99
    assert (valid == ref_valid).mean() > min_agree
    both = valid & ref_valid
    assert (ours[both] == ref[both]).all(axis=-1).mean() > min_agree
    assert np.all(ours[~valid] == 0)


def test_move_to_strong_last_value_and_fixed_order():
    maps = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 28, 3)), jnp.float32)
    crop = (64, 112)
    once, _ = move_to_strong(maps, make_params(2, crop, ops=[("translate_x", 7, -1)]))
    twice, _ = move_to_strong(maps, make_params(2, crop, ops=[("translate_x", 3, 1), ("translate_x", 7, -1)]))
    np.testing.assert_array_equal(np.asarray(once), np.asarray(twice))
    a, va = move_to_strong(maps, make_params(2, crop, ops=[("rotate", 5, 1), ("shear_x", 6, -1)]))
    b, vb = move_to_strong(maps, make_params(2, crop, ops=[("shear_x", 6, -1), ("rotate", 5, 1)]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))


def _block_image(crop, seed, block=16):
    """Piecewise-constant labels on 16x16 blocks (4x4 on the 1/4 map), value = 10 * label + 20."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 19, (1, crop[0] // block, crop[1] // block))
    img = np.repeat(np.repeat(lab, block, 1), block, 2)
    lab4 = np.repeat(np.repeat(lab, block // 4, 1), block // 4, 2)
    return lab4[..., None].astype(np.float32), np.repeat((img * 10 + 20)[..., None], 3, -1).astype(np.float32) / 255.0


@pytest.mark.parametrize("ops,flip,min_agree", [
    ([], True, 1.0),
    ([("translate_x", 3, -1)], False, 1.0),   # 80 px: a multiple of 4
    ([("translate_y", 6, 1)], True, 1.0),     # 92 px
    ([("rotate", 9, 1)], False, 0.8),         # bilinear mixes at block edges: not a label there
    ([("shear_x", 9, -1), ("shear_y", 5, 1)], True, 0.8),
])
def test_transport_commutes_with_strong_geometry(ops, flip, min_agree):
    """Augment an image of constant blocks and compare with the moved 1/4 label map."""
    crop = (512, 896)
    lab, img = _block_image(crop, 0)
    p = make_params(1, crop, flip=flip, ops=ops, cutout=(300, 100, 470, 270))
    strong = np.round(np.asarray(A.strong_view(jnp.asarray(img), p)) * 255)[0, 2::4, 2::4, 0]  # map pixel centres
    moved, valid = move_to_strong(jnp.asarray(lab), p, translate_quirk=False)
    moved, valid = np.asarray(moved)[0, ..., 0], np.asarray(valid)[0]
    grey = strong == 127
    # Cutout and outside regions are invalid on the map, and grey on the image.
    assert not valid[100 // 4 + 1:270 // 4 - 1, 300 // 4 + 1:470 // 4 - 1].any()
    assert (~valid[grey]).mean() > 0.9 and (grey[~valid]).mean() > 0.9
    agree = (moved * 10 + 20 == strong)[valid & ~grey].mean()
    assert agree >= min_agree, agree


def test_translate_quirk_shifts_by_w_over_h():
    crop = (512, 896)
    lab = jnp.asarray(np.arange(224, dtype=np.float32)[None, None, :, None].repeat(128, 1))
    p = make_params(1, crop, ops=[("translate_x", 1, 1)])  # int(0.03 * 896) = 26 px -> 6 map px
    quirk, _ = move_to_strong(lab, p, translate_quirk=True)
    exact, _ = move_to_strong(lab, p, translate_quirk=False)
    assert float(exact[0, 0, 50, 0] - 50) == 6.0
    assert abs(float(quirk[0, 0, 50, 0] - 50) - 6 * 224 / 128) <= 0.5


def test_sample_strong_milder_options():
    """``config.data.strong``'s knobs: a magnitude cap, no hue shift, probabilities and no cutout. With all
    probabilities 0 and no cutout the strong view is the (flipped) weak crop, and no map
    position becomes ignore."""
    key = jax.random.PRNGKey(2)
    default = A.sample_strong(key, 64, CROP)
    explicit = A.sample_strong(key, 64, CROP, n_ops=2, jitter=0.4, max_magnitude=9, op_prob=0.5, blur_prob=0.5,
                               jitter_prob=0.5, cutout=True, hue=0.4)
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(a, b)  # the defaults are the reference's draws, unchanged
    capped = A.sample_strong(key, 256, CROP, n_ops=1, max_magnitude=3, hue=0.0)
    assert capped.op.shape == (256, 1) and int(capped.mag.max()) == 3 and int(capped.mag.min()) == 1
    factors = np.asarray(capped.jitter_factors)
    assert np.all(factors[:, 3] == 0) and factors[:, :3].min() < 0.7 and factors[:, :3].max() > 1.3

    none = A.sample_strong(key, 16, CROP, op_prob=0.0, blur_prob=0.0, jitter_prob=0.0, cutout=False)
    assert not np.asarray(none.apply).any() and not np.asarray(none.blur).any() and not np.asarray(none.jitter).any()
    imgs = np.concatenate([_images()] * 6)[:16]
    x = jnp.asarray(imgs / 255.0, jnp.float32)
    out = np.round(np.asarray(A.strong_view(x, none)) * 255).astype(int)
    flip = np.asarray(none.flip)
    expect = np.where(flip[:, None, None, None], imgs[:, :, ::-1], imgs).astype(int)
    np.testing.assert_array_equal(out, expect)
    maps = jnp.asarray(np.random.default_rng(0).integers(0, 19, (16, CROP[0] // 4, CROP[1] // 4, 1)), jnp.float32)
    moved, valid = move_to_strong(maps, none)
    assert np.asarray(valid).all()
    # No RandAugment op drawn at all (``data.strong.ops=0``): the same view and maps as ops never applied.
    zero = A.sample_strong(key, 16, CROP, n_ops=0, op_prob=0.0, blur_prob=0.0, jitter_prob=0.0, cutout=False)
    assert zero.op.shape == (16, 0)
    np.testing.assert_array_equal(np.round(np.asarray(A.strong_view(x, zero)) * 255).astype(int), expect)
    moved0, valid0 = move_to_strong(maps, zero)
    np.testing.assert_array_equal(np.asarray(moved0), np.asarray(moved))
    assert np.asarray(valid0).all()
    with pytest.raises(ValueError, match="max_magnitude"):
        A.sample_strong(key, 2, CROP, max_magnitude=10)
