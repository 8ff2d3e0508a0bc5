"""CIELAB colour transfer of source images toward target statistics, on the device.

The reference moves every GTA5 image (at 2048x1024) toward a randomly drawn Cityscapes
training image: both converted to CIELAB with skimage (sRGB, D65, 2 degree observer),
each Lab channel of the source standardised with its own mean and population std and
rescaled to the target's, converted back with skimage's ``lab2rgb`` (which zeroes a
negative z before the inverse companding and clips RGB to [0, 1]), multiplied by 255,
clipped to [0, 255] and **truncated** to uint8. Only the target's per-channel Lab mean
and std enter, so :func:`lab_mean_std` computes them ahead of time.

Arithmetic is float32 (the reference is float64): the result is within one grey level
of skimage's (a value that lands within float32 error of an integer may truncate to the
level below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# skimage.color.colorconv constants (sRGB primaries, D65 white, 2 degree observer).
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423],
     [0.212671, 0.715160, 0.072169],
     [0.019334, 0.119193, 0.950227]], np.float64)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], np.float64)


def _check_rgb(images: jnp.ndarray, name: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"cpsl_jax/data/color.py: {name} must be (B, H, W, 3), got {images.shape}")


def rgb_to_lab(images: jnp.ndarray) -> jnp.ndarray:
    """skimage ``rgb2lab`` on (..., 3) uint8 (0..255) or float ([0, 1]) RGB -> float32 Lab."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        rgb = images.astype(jnp.float32) / 255.0
    else:
        rgb = images.astype(jnp.float32)
    lin = jnp.where(rgb > 0.04045, jnp.power((rgb + 0.055) / 1.055, 2.4), rgb / 12.92)
    xyz = lin @ jnp.asarray((_XYZ_FROM_RGB / _WHITE_D65[:, None]).T, jnp.float32)
    f = jnp.where(xyz > 0.008856, jnp.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lightness = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return jnp.stack([lightness, a, b], axis=-1)


def lab_to_rgb(lab: jnp.ndarray) -> jnp.ndarray:
    """skimage ``lab2rgb``: (..., 3) Lab -> float32 sRGB in [0, 1] (negative z zeroed, RGB clipped)."""
    y = (lab[..., 0] + 16.0) / 116.0
    x = lab[..., 1] / 500.0 + y
    z = jnp.maximum(y - lab[..., 2] / 200.0, 0.0)  # skimage warns and sets z < 0 to 0
    f = jnp.stack([x, y, z], axis=-1)
    xyz = jnp.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / 7.787)
    lin = xyz @ jnp.asarray((_RGB_FROM_XYZ * _WHITE_D65[None, :]).T, jnp.float32)
    # Guard the power against negative arguments of the branch not taken (NaN-free gradients).
    safe = jnp.maximum(lin, 0.0031308)
    rgb = jnp.where(lin > 0.0031308, 1.055 * jnp.power(safe, 1.0 / 2.4) - 0.055, lin * 12.92)
    return jnp.clip(rgb, 0.0, 1.0)


def _channel_mean_std(lab: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-image, per-channel mean and population std of (B, H, W, 3) Lab (two-pass, float32)."""
    mean = jnp.mean(lab, axis=(1, 2))
    std = jnp.sqrt(jnp.mean(jnp.square(lab - mean[:, None, None, :]), axis=(1, 2)))
    return mean, std


def lab_mean_std(images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Target statistics for :func:`lab_transfer`: (B, H, W, 3) RGB -> (mean (B, 3), std (B, 3)).

    Mean and population std (``numpy.std``, ddof 0) of each Lab channel of each image.
    """
    _check_rgb(images, "images")
    return _channel_mean_std(rgb_to_lab(images))


def lab_transfer(src_uint8: jnp.ndarray, tgt_mean: jnp.ndarray, tgt_std: jnp.ndarray,
                 eps: float = 1e-6) -> jnp.ndarray:
    """Colour transfer of (B, H, W, 3) uint8 sources to the Lab statistics (B, 3), (B, 3).

    ``lab' = (lab - mean_src) / std_src * std_tgt + mean_tgt`` per Lab channel, then
    ``uint8(clip(lab2rgb(lab') * 255, 0, 255))`` (truncation, as the reference).
    ``eps`` bounds the source std from below: a constant channel (std 0) gives NaN in the
    reference; here it maps to the target mean.
    """
    _check_rgb(src_uint8, "src_uint8")
    batch = src_uint8.shape[0]
    for name, arr in (("tgt_mean", tgt_mean), ("tgt_std", tgt_std)):
        if arr.shape != (batch, 3):
            raise ValueError(f"cpsl_jax/data/color.py: {name} must be ({batch}, 3), got {arr.shape}")
    lab = rgb_to_lab(src_uint8)
    mean, std = _channel_mean_std(lab)
    scale = tgt_std.astype(jnp.float32) / jnp.maximum(std, eps)
    lab = (lab - mean[:, None, None, :]) * scale[:, None, None, :] + tgt_mean.astype(jnp.float32)[:, None, None, :]
    rgb = lab_to_rgb(lab) * 255.0
    return jnp.floor(jnp.clip(rgb, 0.0, 255.0)).astype(jnp.uint8)


lab_transfer_jit = jax.jit(lab_transfer)
