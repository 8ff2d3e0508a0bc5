"""The stage-1 (CPSL) and stage-2/3 (distillation) training steps in PyTorch, for benchmarking.

The same work as :func:`cpsl_jax.train.steps.stage1_step` and :func:`~cpsl_jax.train.steps.distill_step`
for a given config, written the way a PyTorch user runs such a method on one device: eager
NCHW modules (:class:`cpsl_jax.models.torch_reference.ResNet101` with the config's depth,
width, head width and class count), Python loops where the reference loops (per image in
the weak view and the self-labeling scan), host-side random draws (as a data loader
makes them), ``torch.optim.SGD``. ``cpsl_jax.benchmark`` times it against the JAX steps.

Modes (:data:`MODES`):

* ``fp32``: float32 NCHW, as the reference runs (``cudnn.benchmark`` on, TF32 allowed on GPUs);
* ``bf16``: ``torch.autocast(bfloat16)`` around the network passes + ``channels_last``;
* ``compile``: ``bf16`` with the student and teacher wrapped in ``torch.compile``.

Losses and the CPSL pieces always run in float32 (the JAX model also returns float32 maps).

Same as the JAX step (and checked against :mod:`cpsl_jax.cpsl` in ``tests/test_benchmark.py``):
the losses (CE over valid pixels, 0.1 CE + 1.0 RCE on the target crop, prototype
consistency KL, pixel-to-queue contrastive with the reference's quirks, distillation KL with
the probability quirk), cosine prototype scores and rectification, class-balanced Sinkhorn,
the per-image self-labeling scan with queue pushes between images (ring buffers, rows in the
same slots as :func:`cpsl_jax.cpsl.push`), one backward of the summed loss, SGD with
momentum, coupled weight decay, poly decay and the config's per-group multipliers (with
``optim.repeated_updates`` the reference's parameter list with repeated backbone tensors and
``foreach=False``, which is the reference's update exactly), the EMA teacher (parameters;
buffers copied from the student) and the prototype EMA.

What differs (similar cost, simpler arithmetic; none of it changes a shape or a FLOP count of
the networks):

* Sinkhorn runs in the linear domain as the reference (``exp`` after subtracting the
  maximum), not in the log domain; a class with prior 0 gives nan as in the reference.
* Colour transfer: the same sRGB/CIELAB formulas in float32, without Pillow's rounding.
* Weak view: ``F.interpolate(antialias=True)`` of each whole image to (h, w), crop, flip
  (Pillow's 8-bit intermediate rounding skipped); labels nearest.
* Strong view: flip, 5-tap Gaussian blur, colour jitter in a fixed order (brightness,
  contrast, saturation, hue as a YIQ rotation), then the two RandAugment draws with their
  geometric ops composed into one ``grid_sample`` (bilinear, fill 127) applied before the
  photometric ones, then cutout; maps follow with the same affine matrix (nearest, zero
  padding, cutout masked). The JAX view reproduces Pillow op by op in the drawn order.
* Soft pseudo labels reach the crop with one ``grid_sample`` at the composed coordinates
  (the reference chains three bilinear resizes); the teacher's features are moved by
  ``grid_sample`` at the coordinates of the reference's resize-crop-flip (exact).
* Random numbers come from Python's ``random`` (augmentation, CutMix) and torch's generator
  (sampled positions, anchors, dropout), so the two frameworks see different draws.
* The contrastive term is computed only on iterations where it counts (the JAX step
  computes it always and multiplies by 0).

``cpsl.target_running_stats`` and ``kd.target_running_stats`` are followed as in the JAX
steps: the passes they keep from the running statistics run with BatchNorm momentum 0.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cpsl_jax.torch_mirror.network import ResNet101

MODES = ("fp32", "bf16", "compile")
IGNORE_INDEX = 255
FILL = 127.0 / 255.0

# sRGB (D65, 2 degree observer) <-> XYZ, as skimage and cpsl_jax.data.color.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], np.float64)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], np.float64)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)


# -- losses and CPSL pieces (NCHW maps, float32) --------------------------------------------------

def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over valid pixels: logits (B, C, H, W), labels (B, H, W) int64 (255 = ignore)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def reverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's RCE: ``-sum_c clip(p, 1e-7, 1) log clip(onehot, 1e-4, 1)``, sum / (valid + 1e-6)."""
    valid = labels != IGNORE_INDEX
    p = F.softmax(logits.float(), dim=1).clamp(1e-7, 1.0)
    onehot = F.one_hot(torch.where(valid, labels, 0), logits.shape[1]).permute(0, 3, 1, 2).float()
    per_pixel = -(p * torch.log(onehot.clamp(1e-4, 1.0))).sum(dim=1)
    return (per_pixel * valid).sum() / (valid.sum() + 1e-6)


def symmetric_cross_entropy(logits, labels, alpha: float = 0.1, beta: float = 1.0) -> torch.Tensor:
    return alpha * cross_entropy(logits, labels) + beta * reverse_cross_entropy(logits, labels)


def cosine_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """cos(feature, prototype): features (B, D, H, W), prototypes (C, D) -> (B, C, H, W)."""
    return torch.einsum("bdhw,cd->bchw", F.normalize(features, dim=1), F.normalize(prototypes, dim=1))


@torch.no_grad()
def rectify_pseudo_labels(features, soft, prototypes_ema, temperature: float = 0.08,
                          threshold: float = 0.0) -> torch.Tensor:
    """ProDA rectification: argmax of softmax(cos(f, P_ema) / T) * soft; low confidence -> ignore.

    features (B, D, h, w) on the crop, soft (B, C, h, w) -> labels (B, h, w) int64.
    """
    rectified = F.softmax(cosine_scores(features, prototypes_ema) / temperature, dim=1) * soft
    confidence, label = rectified.max(dim=1)
    confidence = confidence / rectified.sum(dim=1)
    return torch.where(confidence < threshold, IGNORE_INDEX, label)


def prototype_consistency(teacher_scores, student_scores, valid, temperature: float = 0.08) -> torch.Tensor:
    """KL(teacher || student) of prototype softmaxes over (B, C, h, w), masked by valid (B, h, w).

    Sum over unmasked (pixel, class) entries / their count (the reference's ``mask.sum()``).
    """
    t = F.softmax(teacher_scores.detach().float() / temperature, dim=1)
    log_s = F.log_softmax(student_scores.float() / temperature, dim=1)
    mask = valid[:, None].expand_as(t)
    kl = F.kl_div(log_s, t, reduction="none")
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def distillation_kl(student_logits, teacher_logits, quirk: bool = True) -> torch.Tensor:
    """``sum t (log t - s) / (B C h w)``; s = softmax (reference quirk) or log-softmax (true KL)."""
    t = F.softmax(teacher_logits.detach().float(), dim=1)
    s = (F.softmax if quirk else F.log_softmax)(student_logits.float(), dim=1)
    return F.kl_div(s, t, reduction="sum") / t.numel()


def queue_contrastive(anchors, anchor_labels, queue, queue_labels, temperature: float = 0.08) -> torch.Tensor:
    """Pixel-to-queue contrastive loss, mean over images: anchors (B, n, D) normalised, labels (B, n).

    Positives: queue rows of the same label (ignore == ignore counts, as the reference).
    """
    positive = (anchor_labels[..., None] == queue_labels).float()  # (B, n, K)
    logits = anchors.float() @ queue.t() / temperature
    logits = logits - logits.max(dim=-1, keepdim=True).values.detach()
    exp = logits.exp()
    negatives = (exp * (1.0 - positive)).sum(dim=-1, keepdim=True)
    log_prob = logits - torch.log(exp + negatives)
    mean_pos = (positive * log_prob).sum(dim=-1) / (positive.sum(dim=-1) + 1e-5)
    return -mean_pos.mean()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, class_prior: torch.Tensor, epsilon: float = 0.05,
             iterations: int = 3) -> torch.Tensor:
    """Class-balanced Sinkhorn-Knopp of the reference: scores (N, C) -> assignments (N, C).

    Q = exp(S / eps)^T / total; ``iterations`` x (rows to pi_c, columns to 1 / N); x N.
    """
    s = scores.float() / epsilon
    q = torch.exp(s - s.max()).t()  # the shift cancels in the division by the total
    q = q / q.sum()
    n = q.shape[1]
    prior = class_prior.float()[:, None]
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) * prior
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


class Queue:
    """Ring buffer of the last K pushed rows (and labels); same slots as ``cpsl_jax.cpsl.push``."""

    def __init__(self, size: int, dim: int, device, with_labels: bool = False):
        self.rows = torch.zeros(size, dim, device=device)
        self.labels = torch.zeros(size, dtype=torch.int64, device=device) if with_labels else None
        self.ptr = 0
        self.count = 0

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    def in_use(self) -> bool:
        return self.count >= self.size

    @torch.no_grad()
    def push(self, rows: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        rows = rows[: self.size]
        n = rows.shape[0]
        idx = (self.ptr + n - 1 - torch.arange(n, device=rows.device)) % self.size  # row 0 newest
        self.rows.index_copy_(0, idx, rows.float())
        if self.labels is not None:
            self.labels.index_copy_(0, idx, labels[:n].long())
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)

    @torch.no_grad()
    def fill_random(self, generator: torch.Generator, num_labels: int) -> None:
        """Full of random unit rows (the steady state after the first K pushes)."""
        rows = torch.randn(self.rows.shape, generator=generator).to(self.rows.device)
        self.rows.copy_(F.normalize(rows, dim=1))
        if self.labels is not None:
            self.labels.copy_(torch.randint(0, num_labels, self.labels.shape, generator=generator))
        self.ptr, self.count = 0, self.size


def self_labeling_loss(features, logits, prototypes, feature_queue: Queue, output_queue: Queue,
                       push_labels, class_prior, temperature: float = 0.08, epsilon: float = 0.05,
                       iterations: int = 3) -> tuple[torch.Tensor, bool]:
    """Per-image self-labeling scan of the reference; pushes the queues in place.

    features (B, n, D) and logits (B, n, C): the teacher's sampled rows; prototypes (C, D) get
    the gradient. Returns (mean over images of term 1 + term 2, the queue's in-use flag as
    checked before the last push).
    """
    f = F.normalize(features.detach().float(), dim=-1)
    o = F.normalize(logits.detach().float(), dim=-1)
    scores = f @ F.normalize(prototypes, dim=-1).t()  # (B, n, C)
    log_p = F.log_softmax(scores / temperature, dim=-1)
    p_detached = prototypes.detach()
    was_in_use, total = False, 0.0
    for i in range(f.shape[0]):
        with torch.no_grad():
            n = f.shape[1]
            s_i = scores[i].detach()
            q_feat = sinkhorn(torch.cat([feature_queue.rows @ p_detached.t(), s_i]) if feature_queue.in_use()
                              else s_i, class_prior, epsilon, iterations)[-n:]
            q_out = sinkhorn(torch.cat([output_queue.rows, o[i]]) if output_queue.in_use() else o[i],
                             class_prior, epsilon, iterations)[-n:]
            was_in_use = was_in_use or feature_queue.in_use()
            feature_queue.push(f[i], push_labels[i])
            output_queue.push(o[i])
        total = total - (q_feat * log_p[i]).sum(-1).mean() - (q_out * log_p[i]).sum(-1).mean()
    return total / f.shape[0], was_in_use


# -- augmentation on the device ------------------------------------------------------------------

@dataclass
class WeakCrop:
    """Per image: rescaled size (h, w), crop corner (y1, x1) in it, flip; Python values."""
    h: list[int]
    w: list[int]
    y1: list[int]
    x1: list[int]
    flip: list[bool]


def sample_weak(rng: random.Random, batch: int, base_hw, crop_hw, base_width: int, scale=(0.5, 1.5)) -> WeakCrop:
    prop = base_hw[1] / base_hw[0]
    ws = [int(rng.uniform(*scale) * base_width) for _ in range(batch)]
    hs = [int(w / prop) for w in ws]
    return WeakCrop(h=hs, w=ws, y1=[rng.randint(0, h - crop_hw[0]) for h in hs],
                    x1=[rng.randint(0, w - crop_hw[1]) for w in ws], flip=[rng.random() < 0.5 for _ in ws])


def weak_view(images: torch.Tensor, crop: WeakCrop, crop_hw, mode: str = "bilinear") -> torch.Tensor:
    """Resize each image (B, K, H0, W0) to its (h, w), crop, flip -> (B, K, *crop_hw) float.

    ``bilinear`` (antialiased, rounded to 8-bit levels) for images in 0..255, ``nearest``
    for label maps.
    """
    ch, cw = crop_hw
    out = []
    for i in range(images.shape[0]):
        x = images[i:i + 1].float()
        if mode == "nearest":
            x = F.interpolate(x, size=(crop.h[i], crop.w[i]), mode="nearest")
        else:
            x = F.interpolate(x, size=(crop.h[i], crop.w[i]), mode="bilinear", align_corners=False, antialias=True)
        x = x[:, :, crop.y1[i]:crop.y1[i] + ch, crop.x1[i]:crop.x1[i] + cw]
        out.append(x.flip(-1) if crop.flip[i] else x)
    out = torch.cat(out)
    return out if mode == "nearest" else out.clamp(0, 255).round()


def _align_corners_grid(pos: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel positions -> grid_sample's [-1, 1] coordinates under align_corners=True."""
    return 2.0 * pos / max(size - 1, 1) - 1.0


def _weak_grid(crop: WeakCrop, out_hw, crop_hw, device) -> torch.Tensor:
    """Sampling grid (B, h, w, 2) on any map covering the whole base image (align_corners).

    Output pixel (i, j) of the crop at ``out_hw``: crop position by an align_corners resize of
    the crop, then the rescaled image's (y1 + ., x1 + .) (flipped), then the base image, then
    the map; the whole chain as one coordinate map.
    """
    oh, ow = out_hw
    ch, cw = crop_hw
    grids = []
    for i in range(len(crop.h)):
        ys = torch.arange(oh, device=device, dtype=torch.float32) * ((ch - 1) / max(oh - 1, 1))
        xs = torch.arange(ow, device=device, dtype=torch.float32) * ((cw - 1) / max(ow - 1, 1))
        if crop.flip[i]:
            xs = (cw - 1) - xs
        ys = (crop.y1[i] + ys) / max(crop.h[i] - 1, 1)  # fraction of the rescaled image
        xs = (crop.x1[i] + xs) / max(crop.w[i] - 1, 1)
        gy, gx = torch.meshgrid(2.0 * ys - 1.0, 2.0 * xs - 1.0, indexing="ij")
        grids.append(torch.stack([gx, gy], dim=-1))
    return torch.stack(grids)


def soft_label_to_weak(soft: torch.Tensor, crop: WeakCrop, crop_hw, out_hw) -> torch.Tensor:
    """Stored soft labels (B, C, h8, w8) of the whole image -> the crop at ``out_hw`` (one grid_sample)."""
    grid = _weak_grid(crop, out_hw, crop_hw, soft.device)
    return F.grid_sample(soft.float(), grid, mode="bilinear", align_corners=True)


def full2weak(maps: torch.Tensor, crop: WeakCrop, crop_hw) -> torch.Tensor:
    """The reference's ``full2weak``: maps at 1/4 of the base image (B, K, H0/4, W0/4) -> crop/4.

    Bilinear (align_corners) to (h/4, w/4), crop at (y1/4, x1/4), flip: evaluated as a
    grid_sample at exactly those coordinates.
    """
    qh, qw = crop_hw[0] // 4, crop_hw[1] // 4
    in_h, in_w = maps.shape[2:]
    grids = []
    for i in range(maps.shape[0]):
        sh, sw = crop.h[i] // 4, crop.w[i] // 4
        ys = torch.arange(qh, device=maps.device, dtype=torch.float32) + crop.y1[i] // 4
        xs = torch.arange(qw, device=maps.device, dtype=torch.float32)
        if crop.flip[i]:
            xs = (qw - 1) - xs
        xs = xs + crop.x1[i] // 4
        # Position in the (sh, sw) resize -> position in the input map (align_corners).
        ys, xs = ys * (in_h - 1) / max(sh - 1, 1), xs * (in_w - 1) / max(sw - 1, 1)
        gy, gx = torch.meshgrid(_align_corners_grid(ys, in_h), _align_corners_grid(xs, in_w), indexing="ij")
        grids.append(torch.stack([gx, gy], dim=-1))
    return F.grid_sample(maps, torch.stack(grids), mode="bilinear", align_corners=True)


def lab_transfer(images: torch.Tensor, target_lab: torch.Tensor) -> torch.Tensor:
    """CIELAB colour transfer of uint8 images (B, 3, H, W) to target (B, 2, 3) mean/std -> levels 0..255."""
    dev = images.device
    rgb = images.float() / 255.0
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", torch.tensor(_XYZ_FROM_RGB / _WHITE_D65[:, None], dtype=torch.float32,
                                                     device=dev), lin)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    lab = torch.stack([116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])], dim=1)
    mean = lab.mean(dim=(2, 3), keepdim=True)
    std = lab.std(dim=(2, 3), unbiased=False, keepdim=True)
    lab = (lab - mean) / std.clamp(min=1e-6) * target_lab[:, 1, :, None, None] + target_lab[:, 0, :, None, None]
    y = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack([lab[:, 1] / 500.0 + y, y, (y - lab[:, 2] / 200.0).clamp(min=0)], dim=1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
    lin = torch.einsum("ij,bjhw->bihw", torch.tensor(_RGB_FROM_XYZ * _WHITE_D65[None, :], dtype=torch.float32,
                                                     device=dev), xyz)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055, lin * 12.92)
    return (rgb.clamp(0, 1) * 255.0).floor()


# RandAugment pool of the reference; geometric ops become one affine matrix per image.
PHOTOMETRIC = ("autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize",
               "sharpness", "solarize")
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
POOL = PHOTOMETRIC + GEOMETRIC


@dataclass
class StrongAug:
    """Strong view of each crop. Tensors (B, ...) on the device; ``ops`` per image: [(name, magnitude)]."""
    flip: torch.Tensor        # (B,) bool
    blur: torch.Tensor        # (B,) bool
    jitter: torch.Tensor      # (B,) bool
    factors: torch.Tensor     # (B, 4): brightness, contrast, saturation in [0.6, 1.4], hue in [-0.4, 0.4]
    theta: torch.Tensor       # (B, 2, 3) composed geometric ops (output -> input, normalised coordinates)
    ops: list                 # per image, the applied photometric draws [(name, magnitude)]
    cutout: torch.Tensor      # (B, 4) x0, y0, x1, y1 (end exclusive)


def _op_matrix(name: str, mag: int, sign: int, hw) -> np.ndarray:
    """3x3 normalised-coordinate matrix of a geometric op (the reference's ``affine_sample``)."""
    h, w = float(hw[0]), float(hw[1])
    m = np.eye(3)
    if name == "rotate":
        a = math.radians(int(mag * 30 / 10) * sign)
        m[:2, :2] = [[math.cos(a), -math.sin(a) * h / w], [math.sin(a) * w / h, math.cos(a)]]
    elif name == "shear_x":
        m[0, 1] = mag * 0.3 / 10 * sign * h / w
    elif name == "shear_y":
        m[1, 0] = mag * 0.3 / 10 * sign * w / h
    elif name == "translate_x":
        m[0, 2] = 2.0 * int(mag * 0.3 / 10 * w) * sign / w
    elif name == "translate_y":
        m[1, 2] = 2.0 * int(mag * 0.3 / 10 * h) * sign / h
    return m


def sample_strong(rng: random.Random, batch: int, crop_hw, device, n_ops: int = 2) -> StrongAug:
    h, w = crop_hw
    thetas, ops, boxes = [], [], []
    for _ in range(batch):
        theta, photometric = np.eye(3), []
        for name in rng.choices(POOL, k=n_ops):  # with replacement
            mag, sign, on = rng.randint(1, 9), rng.choice((-1, 1)), rng.random() < 0.5
            if not on:
                continue
            if name in GEOMETRIC:
                theta = theta @ _op_matrix(name, mag, sign, crop_hw)
            else:
                photometric.append((name, mag))
        thetas.append(theta[:2])
        ops.append(photometric)
        side = min(h, w) // 3
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        x0, y0 = int(max(0.0, cx - side / 2)), int(max(0.0, cy - side / 2))
        boxes.append((x0, y0, min(w, x0 + side), min(h, y0 + side)))
    coins = torch.tensor([[rng.random() < 0.5 for _ in range(3)] for _ in range(batch)], device=device)
    factors = [[rng.uniform(0.6, 1.4) for _ in range(3)] + [rng.uniform(-0.4, 0.4)] for _ in range(batch)]
    return StrongAug(flip=coins[:, 0], blur=coins[:, 1], jitter=coins[:, 2],
                     factors=torch.tensor(factors, dtype=torch.float32, device=device),
                     theta=torch.tensor(np.stack(thetas), dtype=torch.float32, device=device), ops=ops,
                     cutout=torch.tensor(boxes, dtype=torch.int64, device=device))


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _blend(degenerate, x, factor):
    return (degenerate + factor * (x - degenerate)).clamp(0, 1)


def _filter3(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-D filtering of (B, 3, H, W) with a separable 1-D kernel, edges replicated."""
    k = kernel.numel()
    x = F.pad(x, (k // 2,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, k).expand(3, 1, 1, k), groups=3)
    return F.conv2d(x, kernel.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)


_YIQ_FROM_RGB = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_matrices(hue: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) RGB -> RGB rotation of the chroma plane (YIQ) by ``hue`` turns."""
    yiq = torch.tensor(_YIQ_FROM_RGB, dtype=torch.float32, device=hue.device)
    rgb = torch.tensor(np.linalg.inv(_YIQ_FROM_RGB), dtype=torch.float32, device=hue.device)
    a = hue * 2 * math.pi
    rot = torch.zeros(hue.shape[0], 3, 3, device=hue.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    return rgb @ rot @ yiq


def _photometric(x: torch.Tensor, name: str, mag: int) -> torch.Tensor:
    """One RandAugment photometric op on one image (3, H, W) in [0, 1]."""
    factor = mag * 0.9 / 10 + 0.05
    if name == "autocontrast":
        lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)
    if name == "brightness":
        return _blend(torch.zeros_like(x), x, factor)
    if name == "color":
        return _blend(_luma(x[None])[0], x, factor)
    if name == "contrast":
        return _blend(_luma(x[None]).mean(), x, factor)
    if name == "equalize":
        q = (x * 255).round().long()
        out = []
        for c in range(3):
            cdf = torch.bincount(q[c].flatten(), minlength=256).cumsum(0).float()
            lut = (cdf - cdf[0]) / (cdf[-1] - cdf[0]).clamp(min=1)
            out.append(lut[q[c]])
        return torch.stack(out)
    if name == "posterize":
        div = 2 ** (8 - (int(mag * 4 / 10) + 4))
        return torch.floor(x * 255 / div) * div / 255
    if name == "sharpness":
        smooth = torch.tensor([1.0, 5.0 ** 0.5, 1.0], device=x.device)
        return _blend(_filter3(x[None], smooth / smooth.sum())[0], x, factor)
    if name == "solarize":
        threshold = (256 - int(mag * 256 / 10)) / 255.0
        return torch.where(x >= threshold, 1.0 - x, x)
    return x  # identity


def strong_view(crops: torch.Tensor, aug: StrongAug, size_hw) -> torch.Tensor:
    """Weak crops (B, 3, h, w) in [0, 1] -> strong views, the same shape."""
    b = crops.shape[0]
    on = lambda m: m.view(b, 1, 1, 1)  # noqa: E731
    x = torch.where(on(aug.flip), crops.flip(-1), crops)
    gauss = torch.exp(-torch.arange(-2, 3, device=x.device, dtype=torch.float32) ** 2 / 2)
    x = torch.where(on(aug.blur), _filter3(x, gauss / gauss.sum()), x)
    f = aug.factors
    y = _blend(torch.zeros_like(x), x, f[:, 0].view(b, 1, 1, 1))
    y = _blend(_luma(y).mean(dim=(2, 3), keepdim=True), y, f[:, 1].view(b, 1, 1, 1))
    y = _blend(_luma(y), y, f[:, 2].view(b, 1, 1, 1))
    y = torch.einsum("bij,bjhw->bihw", _hue_matrices(f[:, 3]), y).clamp(0, 1)
    x = torch.where(on(aug.jitter), y, x)
    grid = F.affine_grid(aug.theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + FILL
    x = torch.stack([_apply_ops(warped[i], aug.ops[i]) for i in range(b)])
    return torch.where(_box_mask(aug.cutout, size_hw, 1)[:, None], FILL, x)


def _apply_ops(x: torch.Tensor, ops) -> torch.Tensor:
    for name, mag in ops:
        x = _photometric(x, name, mag)
    return x


def _box_mask(boxes: torch.Tensor, hw, scale: int) -> torch.Tensor:
    """(B, h, w) bool: inside the cutout box (x0, y0, x1, y1) given at ``scale`` x the map."""
    b = torch.div(boxes, scale, rounding_mode="floor")
    yy = torch.arange(hw[0], device=boxes.device).view(1, -1, 1)
    xx = torch.arange(hw[1], device=boxes.device).view(1, 1, -1)
    return ((yy >= b[:, 1, None, None]) & (yy < b[:, 3, None, None])
            & (xx >= b[:, 0, None, None]) & (xx < b[:, 2, None, None]))


def move_to_strong(maps: torch.Tensor, aug: StrongAug, crop_hw) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``label_strong_T``: weak-crop maps (B, K, h, w) -> strong view, (maps, valid (B, h, w))."""
    b, _, h, w = maps.shape
    maps = torch.where(aug.flip.view(b, 1, 1, 1), maps.flip(-1), maps)
    grid = F.affine_grid(aug.theta, [b, 1, h, w], align_corners=False)
    moved = F.grid_sample(maps.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(maps[:, :1], dtype=torch.float32), grid, mode="nearest",
                           padding_mode="zeros", align_corners=False)[:, 0] > 0.5
    valid = inside & ~_box_mask(aug.cutout, (h, w), crop_hw[0] // h)
    return moved * valid[:, None], valid


def sample_cutmix(rng: random.Random, hw, prob: float = 0.5, area: float = 0.5):
    """(apply, (y0, x0, y1, x1)): one coin and one box for the batch (the reference's ``rand_bbox``)."""
    apply = rng.random() < prob
    h_frac = area ** rng.random()
    size_y, size_x = round(h_frac * hw[0]), round(area / h_frac * hw[1])
    y0, x0 = round((hw[0] - size_y) * rng.random()), round((hw[1] - size_x) * rng.random())
    return apply, (y0, x0, y0 + size_y, x0 + size_x)


def mix_labels(target_low: torch.Tensor, source_full: torch.Tensor, box) -> torch.Tensor:
    """Low-resolution target labels (B, h, w) with the source's (B, H, W) pasted inside the box (nearest)."""
    (h, w), (big_h, big_w) = target_low.shape[1:], source_full.shape[1:]
    ys = torch.floor(torch.arange(h, device=target_low.device) * (big_h / h)).long()
    xs = torch.floor(torch.arange(w, device=target_low.device) * (big_w / w)).long()
    inside = (((ys >= box[0]) & (ys < box[2]))[:, None] & ((xs >= box[1]) & (xs < box[3]))[None])
    return torch.where(inside, source_full[:, ys][:, :, xs], target_low)


# -- the steps ------------------------------------------------------------------------------------

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


class _Step:
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


class Stage1Step(_Step):
    """CPSL stage 1 (``steps.stage1_step``): ``step(batch)`` runs one iteration and returns loss parts."""

    def __init__(self, config, mode: str = "fp32", device="cpu", seed: int = 0):
        super().__init__(config, mode, device, seed)
        torch.manual_seed(seed)
        c, m = config.cpsl, config.model
        self.student = self._prepare(build_network(config))
        self.student_norms = batch_norms(self.student)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.student_fwd, self.teacher_fwd = self._compiled(self.student), self._compiled(self.teacher)
        protos = torch.randn(m.num_classes, m.head_width, generator=self.generator)
        self.prototypes = nn.Parameter(protos.to(self.device))
        self.prototypes_ema = protos.clone().to(self.device)
        self.feature_queue = Queue(c.queue_size, m.head_width, self.device, with_labels=True)
        self.output_queue = Queue(c.queue_size, m.num_classes, self.device)
        self.class_prior = torch.full((m.num_classes,), 1.0 / m.num_classes, device=self.device)
        self.optimizer = make_sgd(self.student, config, self.prototypes)

    def fill_queues(self) -> None:
        """Start from full queues (training's steady state: after 64 iterations at the paper's sizes)."""
        self.feature_queue.fill_random(self.generator, self.config.model.num_classes)
        self.output_queue.fill_random(self.generator, self.config.model.num_classes)

    def _teacher_maps(self, target, weak, strong):
        """Teacher pass and every map derived from it (no gradient)."""
        c = self.config.cpsl
        self.teacher.train(c.teacher_train_mode)
        with self._autocast():
            out = self.teacher_fwd(self._input(target["image"].float() / 255.0))
        logits, feats = out["out"].float(), out["feat"].float()
        base_hw = target["image"].shape[2:]
        feats_quarter = F.interpolate(feats, size=(base_hw[0] // 4, base_hw[1] // 4), mode="bilinear",
                                      align_corners=True)
        feats_weak = full2weak(feats_quarter, weak, self.crop_hw)
        soft = soft_label_to_weak(target["soft_label"], weak, self.crop_hw, self.quarter)
        if c.rectify:
            label_sl = rectify_pseudo_labels(feats_weak, soft, self.prototypes_ema, c.temperature, c.rectify_threshold)
        else:
            label_sl = soft.argmax(dim=1)
        label_sl_teacher = F.interpolate(label_sl[:, None].float(), size=feats.shape[2:], mode="nearest")[:, 0].long()
        scores_strong, valid = move_to_strong(cosine_scores(feats_weak, self.prototypes_ema), strong, self.crop_hw)
        return logits, feats, label_sl, label_sl_teacher, scores_strong, valid

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config.cpsl
        n = c.samples_per_image
        self._set_lr(self.optimizer)
        with torch.no_grad():
            src_img, src_lbl = self.source_view(batch["source"])
            weak, weak_img, strong, strong_img = self.target_views(batch["target"]["image"])
            cutmix, box = sample_cutmix(self.rng, self.crop_hw, c.cutmix_prob)
            mixed_img = weak_img
            if cutmix:
                mixed_img = weak_img.clone()
                mixed_img[:, :, box[0]:box[2], box[1]:box[3]] = src_img[:, :, box[0]:box[2], box[1]:box[3]]
            t_logits, t_feats, label_sl, label_sl_teacher, t_scores_strong, strong_valid = self._teacher_maps(
                batch["target"], weak, strong)
            target_lbl = mix_labels(label_sl, src_lbl, box) if cutmix else label_sl
            positions = torch.randperm(t_feats.shape[2] * t_feats.shape[3], generator=self.generator)[:n]
            positions = positions.to(self.device)
            sl_feats = t_feats.flatten(2)[:, :, positions].transpose(1, 2)
            sl_logits = t_logits.flatten(2)[:, :, positions].transpose(1, 2)
            flat_sl = label_sl_teacher.flatten(1)
            push_labels = flat_sl[:, :n] if c.queue_label_quirk else flat_sl[:, positions]

        # With ``target_running_stats`` only the weak target pass moves the running statistics.
        with self._autocast():
            with running_stats_frozen(self.student_norms, c.target_running_stats):
                out_s = self.student_fwd(self._input(src_img))
            out_w = self.student_fwd(self._input(mixed_img))
            with running_stats_frozen(self.student_norms, c.target_running_stats):
                out_st = self.student_fwd(self._input(strong_img))
        source_ce = self._segmentation_loss(out_s["out"].float(), src_lbl, rce=False)
        target_ce = self._segmentation_loss(out_w["out"].float(), target_lbl, rce=c.rce)
        sl, was_in_use = self_labeling_loss(sl_feats, sl_logits, self.prototypes, self.feature_queue,
                                            self.output_queue, push_labels, self.class_prior, c.temperature,
                                            c.epsilon, c.sinkhorn_iterations)
        contrast = torch.zeros((), device=self.device)
        if was_in_use and not cutmix:
            feats_w = out_w["feat"].float()
            b, d, fh, fw = feats_w.shape
            idx = torch.stack([torch.randperm(fh * fw, generator=self.generator)[:n] for _ in range(b)])
            idx = idx.to(self.device)
            anchors = F.normalize(torch.gather(feats_w.flatten(2), 2, idx[:, None].expand(b, d, n)), dim=1)
            a_map = label_sl_teacher if c.anchor_label_quirk else F.interpolate(
                label_sl[:, None].float(), size=(fh, fw), mode="nearest")[:, 0].long()
            a_labels = torch.gather(a_map.flatten(1), 1, idx)
            contrast = queue_contrastive(anchors.transpose(1, 2), a_labels, self.feature_queue.rows,
                                         self.feature_queue.labels, c.temperature)
        s_feats = F.interpolate(out_st["feat"].float(), size=self.quarter, mode="bilinear", align_corners=True)
        consistency = prototype_consistency(t_scores_strong, cosine_scores(s_feats, self.prototypes_ema),
                                            strong_valid, c.temperature)
        total = (source_ce + target_ce + c.sl_weight * sl + c.contrastive_weight * contrast
                 + c.consistency_weight * consistency)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self._ema()
        self.step_count += 1
        return dict(loss=total.detach(), source_ce=source_ce.detach(), target_ce=target_ce.detach(),
                    self_labeling=sl.detach(), contrastive=contrast.detach(), consistency=consistency.detach())

    @torch.no_grad()
    def _ema(self) -> None:
        c = self.config.cpsl
        t_params, s_params = list(self.teacher.parameters()), list(self.student.parameters())
        torch._foreach_mul_(t_params, c.teacher_ema)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - c.teacher_ema)
        for t_buf, s_buf in zip(self.teacher.buffers(), self.student.buffers()):
            t_buf.copy_(s_buf)
        self.prototypes_ema.mul_(c.prototype_ema).add_(self.prototypes.detach(), alpha=1.0 - c.prototype_ema)


class DistillStep(_Step):
    """Stages 2/3 (``steps.distill_step``): student on the source crop and the strong view, frozen teacher."""

    def __init__(self, config, mode: str = "fp32", device="cpu", seed: int = 0):
        super().__init__(config, mode, device, seed)
        torch.manual_seed(seed)
        self.student = self._prepare(build_network(config))
        self.student_norms = batch_norms(self.student)
        self.teacher = self._prepare(build_network(config, bn_pretrain=False)).eval().requires_grad_(False)
        self.student_fwd, self.teacher_fwd = self._compiled(self.student), self._compiled(self.teacher)
        self.optimizer = make_sgd(self.student, config)

    def fill_queues(self) -> None:
        pass

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        kd = self.config.kd
        self._set_lr(self.optimizer)
        with torch.no_grad():
            src_img, src_lbl = self.source_view(batch["source"])
            target = batch["target"]
            weak, _, strong, strong_img = self.target_views(target["image"])
            # Hard pseudo label: onto the crop, x0.25 nearest, onto the strong view (outside -> ignore).
            label = weak_view(target["pseudo_label"][:, None], weak, self.crop_hw, mode="nearest")
            label = F.interpolate(label, size=self.quarter, mode="nearest")
            label, valid = move_to_strong(label, strong, self.crop_hw)
            label = torch.where(valid, label[:, 0].long(), IGNORE_INDEX)
            with self._autocast():
                t_logits = self.teacher_fwd(self._input(strong_img))["out"].float()
            t_logits = F.interpolate(t_logits, size=self.quarter, mode="bilinear", align_corners=True)
        with self._autocast():
            with running_stats_frozen(self.student_norms, self.config.kd.target_running_stats):
                out_s = self.student_fwd(self._input(src_img))
            out_t = self.student_fwd(self._input(strong_img))
        source_ce = self._segmentation_loss(out_s["out"].float(), src_lbl, rce=False)
        s_logits = F.interpolate(out_t["out"].float(), size=self.quarter, mode="bilinear", align_corners=True)
        target_ce = self._segmentation_loss(s_logits, label, rce=kd.rce)
        kl = distillation_kl(s_logits, t_logits, quirk=kd.quirk)
        total = source_ce + target_ce + kd.weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.step_count += 1
        return dict(loss=total.detach(), source_ce=source_ce.detach(), target_ce=target_ce.detach(), kd=kl.detach())


def make_step(config, mode: str = "fp32", device: Any = "cpu", seed: int = 0) -> _Step:
    """The PyTorch step object of ``config.stage`` (stage1, stage2 or stage3)."""
    if config.stage == "stage1":
        return Stage1Step(config, mode, device, seed)
    if config.stage in ("stage2", "stage3"):
        return DistillStep(config, mode, device, seed)
    raise ValueError(f"no PyTorch step for stage {config.stage!r}")


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
