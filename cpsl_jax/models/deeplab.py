"""DeepLab-v2 (ResNet backbone, output stride 8) with the CPSL ASPP head, in Flax Linen.

Architecture (cpsl-method.md, "Network"):

* stem: 7x7/2 conv (no bias), BN, ReLU, 3x3/2 max-pool with ceil mode and padding 1;
* Caffe-style bottlenecks (stride on the first 1x1 conv), stage sizes per depth in
  :data:`STAGE_SIZES`; layer2 stride 2, layer3 dilation 2, layer4 dilation 4 (stride 1);
  a 1x1 projection shortcut (conv + BN) in the first block of every layer;
* optional ``bn_pretrain`` BatchNorm on the backbone output (SimCLR initialisation);
* head ``layer5``: five conv+GroupNorm(32)+ReLU branches (1x1 and 3x3 with dilation = padding
  = 6, 12, 18, 24), concatenation, squeeze-excitation (reduction 16), 3x3 conv + GroupNorm,
  Dropout2d(0.1) -> **features**, 1x1 classifier without bias -> **logits**.

An HxW input gives maps of ``H3 x W3`` with ``H1 = floor((H-1)/2)+1``,
``H2 = ceil((H1-1)/2)+1``, ``H3 = floor((H2-1)/2)+1``: 512x896 -> 65x113,
1024x2048 -> 129x257.

Parameter names mirror the PyTorch state dict (``layer3_5/conv2`` <-> ``layer3.5.conv2``;
``_<digits>`` becomes ``.<digits>``), so the converter is a mechanical name map.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpsl_jax.models.layers import Conv2d, Linear, max_pool_3x3_s2_ceil
from cpsl_jax.models.norm import BatchNorm

# Bottleneck blocks per layer; 14 is a tiny variant for tests.
STAGE_SIZES: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 14: (1, 1, 1, 1)}
# (stride, dilation) of layer1..layer4: output stride 8.
LAYER_GEOMETRY: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (1, 4))
ASPP_DILATIONS: tuple[int, ...] = (6, 12, 18, 24)
EXPANSION = 4


def output_size(n: int) -> int:
    """Side of the 1/8 output map for an input side ``n`` (conv /2, ceil-mode pool /2, 1x1 /2)."""
    n1 = (n - 1) // 2 + 1
    n2 = -(-(n1 - 1) // 2) + 1
    return (n2 - 1) // 2 + 1


class Bottleneck(nn.Module):
    """Caffe-style bottleneck: 1x1 (stride) -> 3x3 (dilation) -> 1x1 (x4), BN after each."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    axis_name: str | None = None
    dtype: Any = jnp.float32
    dilated_impl: str = "native"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        bn = lambda name: BatchNorm(axis_name=self.axis_name, dtype=self.dtype, name=name)  # noqa: E731
        conv = lambda feat, k, name, **kw: Conv2d(feat, k, dtype=self.dtype, dilated_impl=self.dilated_impl,  # noqa: E731
                                                  name=name, **kw)
        out = nn.relu(bn("bn1")(conv(self.planes, 1, "conv1", stride=self.stride)(x), train))
        out = conv(self.planes, 3, "conv2", padding=self.dilation, dilation=self.dilation)(out)
        out = nn.relu(bn("bn2")(out, train))
        out = bn("bn3")(conv(self.planes * EXPANSION, 1, "conv3")(out), train)
        residual = x
        if self.downsample:
            residual = conv(self.planes * EXPANSION, 1, "downsample_0", stride=self.stride)(x)
            residual = bn("downsample_1")(residual, train)
        return nn.relu(out + residual)


class SqueezeExcitation(nn.Module):
    """Channel gate: global average pool -> Linear(C, C/16) -> ReLU -> Linear -> sigmoid -> scale.

    The two linears are named ``se_0`` and ``se_2`` (PyTorch ``se.0``, ``se.2``); the gate is
    computed in float32.
    """

    reduction: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        gate = nn.relu(Linear(c // self.reduction, name="se_0")(pooled))
        gate = nn.sigmoid(Linear(c, name="se_2")(gate))
        return x * gate[:, None, None, :].astype(x.dtype)


class ASPPHead(nn.Module):
    """The CPSL head ("layer5"). Returns ``(logits, features)`` in the compute dtype.

    ``features`` are taken after Dropout2d (so they are stochastic in train mode), as the
    reference does; dropout zeroes whole channels with the ``'dropout'`` rng stream.
    """

    num_classes: int
    width: int = 256
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    dilated_impl: str = "native"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
        gn = lambda name: nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name=name)  # noqa: E731
        branches = []
        for i, d in enumerate((0,) + ASPP_DILATIONS):
            k = 1 if d == 0 else 3
            y = Conv2d(self.width, k, padding=d, dilation=max(d, 1), use_bias=True, dtype=self.dtype,
                       dilated_impl=self.dilated_impl, name=f"conv2d_list_{i}_0")(x)
            branches.append(nn.relu(gn(f"conv2d_list_{i}_1")(y)))
        y = jnp.concatenate(branches, axis=-1)
        y = SqueezeExcitation(dtype=self.dtype, name="bottleneck_0")(y)
        # The reference's head init zeroes this conv's bias (the branch biases keep PyTorch's default).
        y = Conv2d(self.width, 3, padding=1, use_bias=True, bias_init="zeros", dtype=self.dtype, name="bottleneck_1")(y)
        y = gn("bottleneck_2")(y)
        features = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(y)
        logits = Conv2d(self.num_classes, 1, dtype=self.dtype, name="head_1")(features)
        return logits, features


class DeepLabV2(nn.Module):
    """DeepLab-v2 segmenter of CPSL.

    Attributes:
      num_classes: C.
      depth: key of :data:`STAGE_SIZES` (101 for the paper, 14 for tests).
      bn_pretrain: BatchNorm on the backbone output (SimCLR-initialised students).
      width: base width (64 in the paper; the backbone output has ``32 * width`` channels).
      head_width: ASPP width (256; a multiple of 32 for GroupNorm(32)).
      dtype: compute dtype; parameters and normalisation statistics stay float32.
      axis_name: axis to synchronise BatchNorm over in train mode (None: local statistics).
      remat: rematerialise each bottleneck block in the backward pass.
      dropout_rate: channel dropout before the classifier (0.1).
      dilated_impl: 'native' dilated convolutions, or 'space_to_batch' (same result; faster
        where XLA lowers dilated convolutions as padded ones, e.g. on GPUs).

    ``__call__(images, train)``: ``images`` (N, H, W, 3) float32 RGB in [0, 1]; returns
    ``{'logits': (N, h, w, C), 'features': (N, h, w, head_width)}`` in float32 at
    ``h = output_size(H)``. Train mode needs ``mutable=['batch_stats']`` and a ``'dropout'`` rng.
    """

    num_classes: int = 19
    depth: int = 101
    bn_pretrain: bool = False
    width: int = 64
    head_width: int = 256
    dtype: Any = jnp.float32
    axis_name: str | None = None
    remat: bool = False
    dropout_rate: float = 0.1
    dilated_impl: str = "native"

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"depth={self.depth} is not one of {sorted(STAGE_SIZES)}")
        if self.head_width % 32:
            raise ValueError(f"head_width={self.head_width} must be a multiple of 32 (GroupNorm(32))")
        bn = lambda name: BatchNorm(axis_name=self.axis_name, dtype=self.dtype, name=name)  # noqa: E731
        x = Conv2d(self.width, 7, stride=2, padding=3, dtype=self.dtype, name="conv1")(images)
        x = max_pool_3x3_s2_ceil(nn.relu(bn("bn1")(x, train)))
        block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
        for layer, (blocks, (stride, dilation)) in enumerate(zip(STAGE_SIZES[self.depth], LAYER_GEOMETRY), start=1):
            planes = self.width * 2 ** (layer - 1)
            for i in range(blocks):
                x = block_cls(
                    planes,
                    stride=stride if i == 0 else 1,
                    dilation=dilation,
                    downsample=i == 0,
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    dilated_impl=self.dilated_impl,
                    name=f"layer{layer}_{i}",
                )(x, train)
        if self.bn_pretrain:
            x = bn("bn_pretrain")(x, train)
        logits, features = ASPPHead(self.num_classes, self.head_width, self.dropout_rate, dtype=self.dtype,
                                    dilated_impl=self.dilated_impl, name="layer5")(x, train)
        return {"logits": logits.astype(jnp.float32), "features": features.astype(jnp.float32)}


# Spatial size of the dummy input that initialisation traces with: parameter shapes do not depend on it.
INIT_HW = (1, 1)


def init_variables(model: nn.Module, rng: jax.Array) -> dict:
    """Fresh variables of ``model`` (the reference's initialisation), computed as one jitted program.

    Flax's ``init`` run eagerly dispatches every initialiser and layer as its own small program
    (about 400 for the demo's network). Compiling them as one takes about as long on a CPU
    (16 s against 18 s on one core, most of it the random-number code), but the one program is
    kept by JAX's persistent compilation cache, so a later process reuses it. The forward pass
    it traces returns nothing and XLA drops it. Values equal the eager ones to 4e-9.
    """
    x = jnp.zeros((1, *INIT_HW, 3), jnp.float32)
    return dict(jax.jit(functools.partial(model.init, train=False))(rng, x))


def variable_shapes(model: nn.Module) -> dict:
    """``model``'s variables as ``jax.ShapeDtypeStruct`` leaves, computing nothing."""
    x = jax.ShapeDtypeStruct((1, *INIT_HW, 3), jnp.float32)
    return dict(jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x))


def _top_key(path: tuple) -> str:
    return str(getattr(path[0], "key", path[0]))


def param_labels(params: Mapping[str, Any]) -> Any:
    """Optimiser group of every parameter: ``'backbone'`` | ``'head'`` | ``'bn_pretrain'``.

    Same pytree structure as ``params`` (the ``'params'`` collection of :class:`DeepLabV2`).
    The head is ``layer5``; the reference gives the head (and, with ``--finetune``,
    ``bn_pretrain``) the larger learning rate.
    """

    def label(path: tuple, _: Any) -> str:
        top = _top_key(path)
        return {"layer5": "head", "bn_pretrain": "bn_pretrain"}.get(top, "backbone")

    return jax.tree_util.tree_map_with_path(label, params)


def backbone_multiplicity(params: Mapping[str, Any]) -> Any:
    """How many times the reference's SGD parameter list holds each tensor (reference quirk).

    Read from the reference ``models/deeplabv2.py`` (``get_1x_lr_params``): it appends the
    modules ``conv1, bn1, layer1 .. layer4``, then for each walks ``module.modules()`` (the
    module itself and every descendant) and yields ``descendant.parameters()``, which is
    itself recursive. A tensor is therefore yielded once per module on its ancestry path
    from the appended module down to its owner: the stem ``conv1``/``bn1`` once; a tensor
    of a bottleneck's conv/BN three times (layerN, the block, the layer that owns it); a
    tensor of a projection shortcut four times (layerN, block, ``downsample`` Sequential,
    conv/BN). ``get_10x_lr_params`` yields ``layer5.parameters()`` and
    ``bn_pretrain.parameters()`` once each. Returns a pytree of ints shaped like ``params``.
    """

    def count(path: tuple, _: Any) -> int:
        top = _top_key(path)
        if not (top.startswith("layer") and "_" in top):  # conv1, bn1, layer5, bn_pretrain
            return 1
        keys = [str(getattr(p, "key", p)) for p in path]
        return 4 if any(k.startswith("downsample") for k in keys) else 3

    return jax.tree_util.tree_map_with_path(count, params)
