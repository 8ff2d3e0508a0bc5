"""The device augmentation of the PyTorch steps: colour transfer, weak view, strong view, CutMix.

Random draws are Python values from a ``random.Random`` (as a data loader makes them); the
views and map transports run on the device in float32 (NCHW). Where they differ from
:mod:`cpsl_jax.data.augment` (simpler resampling, one composed ``grid_sample``) is listed in
:mod:`cpsl_jax.torch_mirror`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

FILL = 127.0 / 255.0

# sRGB (D65, 2 degree observer) <-> XYZ, as skimage and cpsl_jax.data.color.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], np.float64)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], np.float64)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)


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
