"""Output-space patch discriminator of the adversarial warm-up.

As the reference's ``FCDiscriminator`` (read in ProDA's ``models/discriminator.py``, which
CPSL imports unchanged): four 3x3 stride-2 convolutions with padding 1 (C -> 64 -> 128 ->
256 -> 512), ReLU after the first three and LeakyReLU(0.2) after the fourth, then a 1x1
convolution to one channel. All convolutions have biases and PyTorch's default init.
Parameter names ``conv1 .. conv4``, ``classifier`` match its state dict.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cpsl_jax.models.layers import Conv2d


class Discriminator(nn.Module):
    """``__call__(probs)``: (N, H, W, C) class probabilities -> (N, ceil(H/16), ceil(W/16), 1) float32 scores."""

    planes: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = lambda feat, k, name, **kw: Conv2d(  # noqa: E731
            feat, k, use_bias=True, kernel_init="torch", bias_init="torch", dtype=self.dtype, name=name, **kw
        )
        for i in range(4):
            x = conv(self.planes * 2**i, 3, f"conv{i + 1}", stride=2, padding=1)(x)
            x = nn.relu(x) if i < 3 else nn.leaky_relu(x, negative_slope=0.2)
        return conv(1, 1, "classifier")(x).astype(jnp.float32)
