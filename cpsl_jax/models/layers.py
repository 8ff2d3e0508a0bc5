"""Convolution and linear layers with the reference's PyTorch initialisation.

All convolutions of the project go through :func:`conv2d`, so the dilated ones (layer3,
layer4, the ASPP branches) can be swapped for an equivalent space-to-batch formulation in
one place. Kernels are HWIO (PyTorch OIHW transposed), activations NHWC.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cpsl_jax.ops import conv_dilated_space_to_batch

Initializer = Callable[..., jnp.ndarray]


DILATED_IMPLS = ("native", "space_to_batch")
# Backends on which a 1x1 convolution is computed as a matrix product. XLA:CPU runs its 1x1
# convolutions well below its dot (benchmarks/RESULTS.md, speed notes: the whole stage-1 step
# at mid-size shapes took 39.3 s as convolutions, 28.7 s with products); GPUs are left to cuDNN.
POINTWISE_AS_DOT_BACKENDS = ("cpu",)


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, *, stride: int = 1, padding: int = 0, dilation: int = 1,
           dilated_impl: str = "native") -> jnp.ndarray:
    """``F.conv2d`` on NHWC ``x`` with an HWIO ``kernel``, symmetric zero padding and dilation.

    ``dilated_impl='space_to_batch'`` computes a stride-1 'same' dilated convolution as a plain
    one over the input's ``dilation x dilation`` phases (``cpsl_jax.ops``): the same result,
    and far faster where XLA lowers dilated convolutions as padded ones (GPUs). On the backends
    of :data:`POINTWISE_AS_DOT_BACKENDS` a 1x1 convolution is a matrix product over channels.
    """
    if dilated_impl not in DILATED_IMPLS:
        raise ValueError(f"dilated_impl={dilated_impl!r} is not one of {DILATED_IMPLS}")
    k = kernel.shape[0]
    if k == 1 and padding == 0 and jax.default_backend() in POINTWISE_AS_DOT_BACKENDS:
        return jnp.einsum("nhwc,co->nhwo", x[:, ::stride, ::stride], kernel[0, 0])
    if dilated_impl == "space_to_batch" and dilation > 1 and stride == 1 and padding == dilation * (k - 1) // 2:
        return conv_dilated_space_to_batch(x, kernel, dilation)
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def torch_uniform(fan_in: int) -> Initializer:
    """PyTorch's default ``Conv2d``/``Linear`` init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    ``kaiming_uniform_(a=sqrt(5))`` on the weight and the bias rule both reduce to this bound.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jnp.ndarray:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# The reference overwrites every Conv2d weight of the segmenter with N(0, 0.01).
conv_normal_init: Initializer = nn.initializers.normal(stddev=0.01)


class Conv2d(nn.Module):
    """PyTorch-style ``nn.Conv2d`` (square kernel, symmetric padding) on NHWC inputs.

    Attributes:
      features: output channels.
      kernel_size, stride, padding, dilation: as in PyTorch.
      use_bias: with a ``bias`` parameter.
      kernel_init: ``None`` = N(0, 0.01) (the segmenter); ``'torch'`` = PyTorch default.
      bias_init: ``'torch'`` (PyTorch default uniform) or ``'zeros'``.
      dtype: compute dtype; parameters stay float32.
      dilated_impl: how a dilated convolution is computed (see :func:`conv2d`).
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    use_bias: bool = False
    kernel_init: str | None = None
    bias_init: str = "torch"
    dtype: Any = jnp.float32
    dilated_impl: str = "native"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k, cin = self.kernel_size, x.shape[-1]
        fan_in = cin * k * k
        k_init = torch_uniform(fan_in) if self.kernel_init == "torch" else conv_normal_init
        kernel = self.param("kernel", k_init, (k, k, cin, self.features), jnp.float32)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride, padding=self.padding,
                   dilation=self.dilation, dilated_impl=self.dilated_impl)
        if self.use_bias:
            b_init = torch_uniform(fan_in) if self.bias_init == "torch" else nn.initializers.zeros
            bias = self.param("bias", b_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class Linear(nn.Module):
    """PyTorch ``nn.Linear`` with its default init; kernel stored (in, out)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_uniform(fan_in), (fan_in, self.features), jnp.float32)
        bias = self.param("bias", torch_uniform(fan_in), (self.features,), jnp.float32)
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


def max_pool_3x3_s2_ceil(x: jnp.ndarray) -> jnp.ndarray:
    """``nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)`` on NHWC maps.

    Output size ``ceil((n - 1) / 2) + 1`` per axis (PyTorch's ceil-mode rule; the last window
    always starts inside the left-padded input here, so no window is dropped). The extra
    right padding needed by ceil mode is -inf, like the left padding.
    """
    pads = []
    for n in x.shape[1:3]:
        out = -(-(n - 1) // 2) + 1
        pads.append((1, (out - 1) * 2 + 3 - n - 1))
    # A Python -inf init lets JAX pick its differentiable max-pool primitive.
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), pads[0], pads[1], (0, 0)))
