"""The shared resize operators against PyTorch's F.interpolate on fresh random maps."""
import numpy as np
import pytest

from cpsl_jax import ops

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("in_hw,out_hw", [((7, 11), (13, 5)), ((129, 257), (256, 512)), ((65, 113), (128, 224)), ((5, 9), (1, 1))])
def test_resize_bilinear_matches_align_corners_true(in_hw, out_hw):
    rng = np.random.default_rng()
    x = rng.standard_normal((2, *in_hw, 3)).astype(np.float32)
    ours = np.asarray(ops.resize_bilinear(x, out_hw))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_hw,out_hw", [((512, 896), (128, 224)), ((7, 11), (13, 5)), ((1024, 2048), (129, 257)), ((128, 224), (512, 896))])
def test_resize_nearest_matches_legacy_nearest(in_hw, out_hw):
    rng = np.random.default_rng()
    x = rng.integers(0, 255, (2, *in_hw), dtype=np.uint8)
    ours = np.asarray(ops.resize_nearest(x, out_hw))
    ref = F.interpolate(torch.from_numpy(x[:, None].astype(np.float32)), size=out_hw, mode="nearest")[:, 0]
    np.testing.assert_array_equal(ours, ref.numpy().astype(np.uint8))


def test_l2_normalize_matches_torch():
    x = np.random.default_rng().standard_normal((4, 7, 256)).astype(np.float32)
    x[0, 0] = 0.0  # a zero row stays zero, as F.normalize's eps clamp does
    ours = np.asarray(ops.l2_normalize(x))
    np.testing.assert_allclose(ours, F.normalize(torch.from_numpy(x), dim=-1).numpy(), rtol=1e-6, atol=1e-7)
    import jax

    grad = jax.grad(lambda v: ops.l2_normalize(v).sum())(x)
    assert np.all(np.isfinite(np.asarray(grad)))  # finite also for the zero row


@pytest.mark.parametrize("rate,hw", [(2, (9, 14)), (4, (17, 29)), (6, (65, 113)), (24, (17, 30))])
def test_space_to_batch_dilated_conv_equals_dilated_conv(rate, hw):
    import jax
    import jax.numpy as jnp
    from jax import lax

    rng = np.random.default_rng()
    x = rng.standard_normal((2, *hw, 5)).astype(np.float32)
    k = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
    ref = lax.conv_general_dilated(x, k, (1, 1), ((rate, rate), (rate, rate)), rhs_dilation=(rate, rate),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    ours = ops.conv_dilated_space_to_batch(x, k, rate, precision="highest")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-4)
    # Gradients agree too (the training step differentiates through it). In float64: the kernel
    # gradient sums 2 x 65 x 113 products of size ~1e4, and float32 rounding of two different
    # summation orders would decide the comparison instead of the formulation.
    with jax.enable_x64(True):
        x64, k64 = jnp.asarray(x, jnp.float64), jnp.asarray(k, jnp.float64)
        f = lambda fn: jax.grad(lambda xx, kk: (fn(xx, kk) ** 2).sum(), argnums=(0, 1))(x64, k64)
        g_ref = f(lambda xx, kk: lax.conv_general_dilated(xx, kk, (1, 1), ((rate, rate), (rate, rate)),
                                                          rhs_dilation=(rate, rate),
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")))
        g_ours = f(lambda xx, kk: ops.conv_dilated_space_to_batch(xx, kk, rate))
        for a, b in zip(g_ours, g_ref):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-8)
