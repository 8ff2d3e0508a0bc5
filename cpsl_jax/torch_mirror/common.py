"""What the PyTorch stage-1 and stage-2/3 steps share: modes, network, SGD, BatchNorm switches, views.

:class:`Step` holds the mode, device, host random generators, the poly learning rate and the
source and target views; :class:`~cpsl_jax.torch_mirror.stage1.Stage1Step` and
:class:`~cpsl_jax.torch_mirror.distill.DistillStep` add their networks and their ``step``.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cpsl_jax.torch_mirror.augment import lab_transfer, sample_strong, sample_weak, strong_view, weak_view
from cpsl_jax.torch_mirror.cpsl import cross_entropy, symmetric_cross_entropy
from cpsl_jax.torch_mirror.network import ResNet101

MODES = ("fp32", "bf16", "compile")


def batch_norms(net: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``net`` (found once, not on every step)."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def running_stats_frozen(norms: Sequence[nn.Module], frozen: bool = True):
    """The BatchNorm layers ``norms`` (:func:`batch_norms`) normalise with their batch
    statistics but leave the running ones as they are (momentum 0), as the JAX steps' passes
    that ``cpsl.target_running_stats`` and ``kd.target_running_stats`` keep from updating
    them. ``frozen=False``: no change."""
    layers = list(norms) if frozen else []
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


def configure_backends(mode: str, device: torch.device) -> None:
    """cudnn autotuning and TF32 as the reference runs (GPU only)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_network(config, *, bn_pretrain: bool | None = None) -> ResNet101:
    m = config.model
    return ResNet101(num_classes=m.num_classes, depth=m.depth, width=m.width, head_width=m.head_width,
                     bn_pretrain=m.bn_pretrain if bn_pretrain is None else bn_pretrain, dropout_rate=m.dropout_rate)


def make_sgd(model: ResNet101, config, prototypes: nn.Parameter | None = None) -> torch.optim.SGD:
    """SGD with the config's per-group multipliers (group key ``mult``).

    With ``optim.repeated_updates`` the backbone list is built as the reference builds it (each
    module's parameters yielded once per ancestor: 3-4 copies of a block tensor) and stepped by
    the per-tensor loop (``foreach=False``): the reference's repeated update.
    """
    o, mult = config.optim, config.optim.lr_mult
    if o.repeated_updates:
        backbone = [p for m in model.backbone_modules() for sub in m.modules() for p in sub.parameters()]
    else:
        backbone = [p for m in model.backbone_modules() for p in m.parameters()]
    groups = [dict(params=backbone, mult=mult.backbone), dict(params=list(model.layer5.parameters()), mult=mult.head)]
    if model.bn_pretrain is not None:
        groups.append(dict(params=list(model.bn_pretrain.parameters()), mult=mult.bn_pretrain))
    if prototypes is not None:
        groups.append(dict(params=[prototypes], mult=mult.prototypes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate parameters in a group: the reference's list, on purpose
        return torch.optim.SGD(groups, lr=o.base_lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               foreach=not o.repeated_updates)


def to_device_batch(batch: dict, device) -> dict:
    """A host batch of ``cpsl_jax.benchmark.random_batch`` (NHWC uint8 numpy) -> NCHW torch tensors."""
    def conv(key, x):
        t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        return t.permute(0, 3, 1, 2).contiguous() if key == "image" else t

    return {part: {k: conv(k, v) for k, v in d.items()} for part, d in batch.items()}


class Step:
    """What both stages share: mode, device, networks' memory format, lr schedule, source view."""

    def __init__(self, config, mode: str, device, seed: int):
        self.config, self.mode, self.device = config, mode, torch.device(device)
        configure_backends(mode, self.device)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        w, h = config.data.crop_size
        self.crop_hw = (int(h), int(w))
        self.quarter = (self.crop_hw[0] // 4, self.crop_hw[1] // 4)
        self.step_count = 0

    def _prepare(self, net: nn.Module) -> nn.Module:
        net = net.to(self.device)
        return net.to(memory_format=torch.channels_last) if self.mode != "fp32" else net

    def _compiled(self, net: nn.Module):
        return torch.compile(net) if self.mode == "compile" else net

    def _autocast(self):
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.mode != "fp32" else x

    def _set_lr(self, optimizer) -> None:
        o = self.config.optim
        lr = o.base_lr * max(0.0, 1.0 - self.step_count / o.max_steps) ** o.power
        for group in optimizer.param_groups:
            group["lr"] = lr * group["mult"]

    def _weak(self, images):
        d = self.config.data
        return sample_weak(self.rng, images.shape[0], images.shape[2:], self.crop_hw, d.rescale_base_width,
                           tuple(d.rescale_range))

    def source_view(self, source: dict):
        """Colour transfer (if configured), weak crop: (images (B, 3, h, w) in [0, 1], labels (B, h, w))."""
        images = source["image"]
        if self.config.data.colour_transfer:
            images = lab_transfer(images, source["target_lab"])
        crop = self._weak(images)
        labels = weak_view(source["label"][:, None], crop, self.crop_hw, mode="nearest")[:, 0].long()
        return weak_view(images, crop, self.crop_hw) / 255.0, labels

    def target_views(self, images):
        """(weak crop params, weak crops, strong params, strong views) of the target images."""
        weak = self._weak(images)
        weak_img = weak_view(images, weak, self.crop_hw) / 255.0
        strong = sample_strong(self.rng, images.shape[0], self.crop_hw, self.device)
        return weak, weak_img, strong, strong_view(weak_img, strong, self.crop_hw)

    def _segmentation_loss(self, logits, labels, rce: bool):
        logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=True)
        if rce:
            c = self.config.cpsl
            return symmetric_cross_entropy(logits, labels, c.rce_alpha, c.rce_beta)
        return cross_entropy(logits, labels)
