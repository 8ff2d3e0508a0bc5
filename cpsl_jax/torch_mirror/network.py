"""PyTorch reference of the CPSL segmenter and discriminator, for parity tests and export.

Written from the architecture description (cpsl-method.md): same layers, same state-dict
names and shapes as the official checkpoints (``conv1``, ``bn1``, ``layer3.5.conv2``,
``layer5.conv2d_list.0.0``, ``layer5.bottleneck.0.se.0``, ``layer5.head.1``,
``bn_pretrain`` ...), with the same small variants as :class:`cpsl_jax.models.DeepLabV2`
(``depth``, ``width``, ``head_width``). Batch norm follows the reference's synchronised-BN
arithmetic on one process (train mode: ``max(biased_var, eps) ** -0.5``, unbiased running
variance, momentum 0.1). Inputs and outputs are NCHW like the reference; ``forward`` returns
``{'out': logits, 'feat': features}``.

Importing this module imports torch. Torch stays inside :mod:`cpsl_jax.torch_mirror`, the
checkpoint converter (:mod:`cpsl_jax.convert`, which imports it lazily and does not use this
network) and the benchmark's torch variants; :mod:`cpsl_jax.models` never imports it.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cpsl_jax.models.deeplab import ASPP_DILATIONS, EXPANSION, LAYER_GEOMETRY, STAGE_SIZES


class RefBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the reference sync-BN train-mode arithmetic (single process)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        n = x.numel() // x.shape[1]
        mean = x.mean(dim=(0, 2, 3))
        sumvar = ((x - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * sumvar.detach() / (n - 1))
            self.num_batches_tracked.add_(1)
        inv = sumvar.div(n).clamp(min=self.eps).rsqrt()
        return (x - mean[None, :, None, None]) * (inv * self.weight)[None, :, None, None] + self.bias[None, :, None, None]


class Bottleneck(nn.Module):
    """Stride on the first 1x1 conv; dilation = padding on the 3x3."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = RefBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = RefBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = RefBatchNorm2d(planes * EXPANSION)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class SEBlock(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.se = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(), nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.se(x.mean(dim=(2, 3)))[:, :, None, None]


class ASPPHead(nn.Module):
    """``layer5``: 5 conv+GN+ReLU branches, concat, SE, 3x3 conv+GN, Dropout2d, 1x1 classifier."""

    def __init__(self, inplanes: int, num_classes: int, width: int = 256, dropout_rate: float = 0.1):
        super().__init__()
        self.conv2d_list = nn.ModuleList()
        for d in (0,) + ASPP_DILATIONS:
            conv = nn.Conv2d(inplanes, width, 1, bias=True) if d == 0 else nn.Conv2d(inplanes, width, 3, padding=d, dilation=d, bias=True)
            self.conv2d_list.append(nn.Sequential(conv, nn.GroupNorm(32, width), nn.ReLU()))
        cat = width * (len(ASPP_DILATIONS) + 1)
        self.bottleneck = nn.Sequential(SEBlock(cat), nn.Conv2d(cat, width, 3, padding=1, bias=True), nn.GroupNorm(32, width))
        nn.init.zeros_(self.bottleneck[1].bias)
        self.head = nn.Sequential(nn.Dropout2d(dropout_rate), nn.Conv2d(width, num_classes, 1, bias=False))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = torch.cat([branch(x) for branch in self.conv2d_list], dim=1)
        feat = self.head[0](self.bottleneck(y))
        return {"feat": feat, "out": self.head[1](feat)}


class ResNet101(nn.Module):
    """The reference segmenter (class name as the checkpoint key ``'ResNet101'``), any depth/width."""

    def __init__(self, num_classes: int = 19, depth: int = 101, bn_pretrain: bool = False, width: int = 64,
                 head_width: int = 256, dropout_rate: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = RefBatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        inplanes = width
        for layer, (blocks, (stride, dilation)) in enumerate(zip(STAGE_SIZES[depth], LAYER_GEOMETRY), start=1):
            planes = width * 2 ** (layer - 1)
            down = nn.Sequential(nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False), RefBatchNorm2d(planes * EXPANSION))
            mods = [Bottleneck(inplanes, planes, stride, dilation, down)]
            inplanes = planes * EXPANSION
            mods += [Bottleneck(inplanes, planes, 1, dilation) for _ in range(1, blocks)]
            setattr(self, f"layer{layer}", nn.Sequential(*mods))
        self.layer5 = ASPPHead(inplanes, num_classes, head_width, dropout_rate)
        self.bn_pretrain = RefBatchNorm2d(inplanes) if bn_pretrain else None
        for m in self.modules():  # the reference's blanket init of every conv weight
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.bn_pretrain is not None:
            x = self.bn_pretrain(x)
        return self.layer5(x)

    def backbone_modules(self) -> list[nn.Module]:
        """The modules the reference hands to its 1x-lr parameter generator, in order."""
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]


class FCDiscriminator(nn.Module):
    """Patch discriminator: 4 x (3x3/2 conv), ReLU x3 then LeakyReLU(0.2), 1x1 conv to 1."""

    def __init__(self, inplanes: int = 19, planes: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(planes, planes * 2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(planes * 2, planes * 4, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(planes * 4, planes * 8, 3, stride=2, padding=1)
        self.classifier = nn.Conv2d(planes * 8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.leaky_relu(self.conv4(x), 0.2)
        return self.classifier(x)


def count_flops(net: nn.Module, input_shape: Sequence[int]) -> int:
    """Dense forward FLOPs of ``net`` (convolutions and linear layers, every tap counted), on the meta device.

    Convolution: 2 x N x C_out x H_out x W_out x C_in / groups x k_h x k_w; linear: 2 x rows x in x out.
    """
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * m.in_features

    meta = copy.deepcopy(net).to("meta").eval()
    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        meta(torch.empty(*input_shape, device="meta"))
    for h in handles:
        h.remove()
    return total
