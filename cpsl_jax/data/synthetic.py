"""A built-in synthetic domain-shift benchmark: rendered-looking source, photo-like target.

Street scenes are drawn procedurally with the 19 Cityscapes classes under a pinhole
camera over a flat ground plane (horizon row ``yh``; a ground point at lateral offset X
metres on row y is at column ``xv + X * (y - yh) / cam_h``, so object sizes scale with
``y - yh``). Everything is painted into an *instance map* with the painter's algorithm
(far to near), so the label map is exactly what was drawn: ``label = class_of[instance]``.

Two domains share the geometry and differ like GTA5 and Cityscapes do:

* ``source``: flat per-class colours with a small per-instance jitter, clean edges, more
  cars, fewer people and less vegetation.
* ``target``: shifted per-class palette, per-class textures, white balance / contrast /
  saturation change, lighting gradient and vignetting, slight blur, sensor noise, an
  ego-vehicle hood (ignore label) and different class frequencies.

Item ``i`` is generated from ``numpy.random.SeedSequence([seed, domain, split, i])`` only,
so it never depends on other items. :func:`write_layout` writes items in the published
Cityscapes / GTA5 folder layouts with real label ids; ``python -m cpsl_jax.data.synthetic``
is the command-line front end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image

from cpsl_jax.data import layouts

CLASS_NAMES: tuple[str, ...] = layouts.CLASS_NAMES_19
# Cityscapes / GTA5 label id of each train id, for the 19-, 16- and 13-class protocols.
LABEL_IDS: dict[int, tuple[int, ...]] = layouts.CITYSCAPES_IDS
IGNORE = layouts.IGNORE_LABEL
Rng = np.random.Generator

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY,
 PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)
# Appearance keys beyond the 19 classes: parts drawn with their own colour but labelled
# with their object's class (windows, lane markings, tyres, skin, the ego hood).
WINDOW, MARKING, TYRE, SKIN, HOOD = range(19, 24)

DOMAINS = ('source', 'target')
SPLITS = ('train', 'val')
DEFAULT_LENGTH = {('source', 'train'): 400, ('source', 'val'): 50,
                  ('target', 'train'): 200, ('target', 'val'): 50}

# Rendered (game-like) palette: saturated and clean. Rows: 19 classes then the extra keys.
_SOURCE_PALETTE = np.array([
    (80, 80, 86), (175, 162, 148), (152, 108, 84), (190, 178, 150), (125, 92, 62),
    (105, 105, 112), (45, 45, 38), (225, 190, 35), (55, 145, 40), (150, 175, 75),
    (105, 165, 240), (175, 70, 65), (200, 95, 45), (35, 70, 170), (175, 175, 188),
    (215, 125, 35), (95, 120, 160), (85, 40, 105), (150, 35, 45),
    (55, 80, 115), (235, 235, 228), (25, 25, 25), (215, 170, 140), (30, 30, 34),
], np.float32)
# Photo-like class colours at full domain shift (before ``render_target``'s photometric
# change). After that change several of them land on another class's source colour (sky on
# truck, people on fence): at full shift a source model is confidently wrong.
_PHOTO_PALETTE = np.array([
    (104, 100, 98), (160, 156, 160), (128, 112, 104), (170, 160, 140), (104, 96, 74),
    (120, 118, 112), (50, 50, 42), (200, 170, 70), (70, 122, 52), (140, 150, 88),
    (150, 182, 228), (120, 76, 80), (150, 86, 64), (58, 76, 130), (160, 160, 164),
    (190, 130, 60), (100, 116, 140), (78, 50, 90), (130, 58, 56),
    (66, 80, 100), (205, 205, 196), (30, 30, 30), (196, 156, 132), (22, 22, 26),
], np.float32)
# The photometric change of ``render_target``: white-balance gain (times U(0.95, 1.05) per
# channel), then saturation and contrast factors drawn uniformly from these ranges.
_GAIN = (1.04, 1.0, 0.93)
_SATURATION = (0.7, 0.85)
_CONTRAST = (0.8, 0.92)
DEFAULT_DOMAIN_SHIFT = 0.35


def target_palette(shift: float = DEFAULT_DOMAIN_SHIFT) -> np.ndarray:
    """The target's class colours before ``render_target``'s photometric change, (24, 3).

    After the mean photometric change each colour lands at ``source + shift * (tone - source)``:
    0 keeps the source colours (only the photometric change, textures, lighting and noise
    differ), 1 puts every class on its photo-like tone. At the default third of the way every
    class stays nearer its own source colour than any other class's (wall excepted, which
    lands near the source's sidewalk): a source model is uncertain on the target rather than
    confidently wrong, which is what self-training can correct.
    """
    # The mean photometric change as an affine map c -> c A^T + b (gain, then saturation
    # toward the grey level, then contrast toward 118).
    gain, sat, con = np.array(_GAIN), np.mean(_SATURATION), np.mean(_CONTRAST)
    a = con * (sat * np.diag(gain) + (1 - sat) * np.outer(np.ones(3), gain) / 3)
    b = 118.0 * (1 - con)
    source = _SOURCE_PALETTE.astype(np.float64)
    aim = source + float(shift) * (_PHOTO_PALETTE @ a.T + b - source)
    colours = np.linalg.solve(a, (aim - b).T).T
    return np.clip(np.round(colours), 0, 255).astype(np.float32)


# Target textures, per class (index 19 = ignore): amplitude of smooth luminance noise,
# of fine grain and of horizontal streaks (grey levels).
_TARGET_TEXTURE = np.array([
    (10, 6, 2), (10, 5, 6), (14, 5, 8), (10, 4, 3), (8, 10, 2), (6, 3, 0), (4, 3, 0),
    (6, 2, 0), (26, 18, 0), (18, 12, 0), (8, 1, 0), (14, 6, 0), (12, 6, 0), (8, 3, 0),
    (8, 3, 4), (8, 3, 4), (8, 3, 6), (8, 4, 0), (6, 4, 0), (4, 2, 0),
], np.float32)


@dataclasses.dataclass(frozen=True)
class SceneStats:
    """Expected number of objects per image (Poisson means) and layout probabilities."""

    cars: float
    trucks: float
    buses: float
    train_p: float
    persons: float
    cyclists: float
    motorcyclists: float
    parked_bicycles: float
    poles: float
    trees: float
    skyline_vegetation_p: float
    side_terrain_p: float
    side_vegetation_p: float
    facade_p: float
    wall_p: float
    fence_p: float
    ego_p: float


# Long-tailed on purpose: road/building/sky/vegetation dominate, trains and two-wheelers
# are rare. The target has more people and vegetation and fewer vehicles.
SOURCE_STATS = SceneStats(
    cars=4.0, trucks=0.25, buses=0.15, train_p=0.06, persons=2.5, cyclists=0.12,
    motorcyclists=0.1, parked_bicycles=0.1, poles=3.0, trees=2.0,
    skyline_vegetation_p=0.35, side_terrain_p=0.3, side_vegetation_p=0.2, facade_p=0.6,
    wall_p=0.3, fence_p=0.3, ego_p=0.0)
TARGET_STATS = SceneStats(
    cars=2.5, trucks=0.12, buses=0.1, train_p=0.1, persons=5.0, cyclists=0.25,
    motorcyclists=0.06, parked_bicycles=0.3, poles=4.0, trees=3.0,
    skyline_vegetation_p=0.55, side_terrain_p=0.4, side_vegetation_p=0.3, facade_p=0.5,
    wall_p=0.25, fence_p=0.45, ego_p=0.7)


# ----------------------------------------------------------------------------- drawing
def _polygon_mask(pts: np.ndarray, h: int, w: int):
    """Even-odd fill of polygon ``pts`` (n, 2) as (x, y) pixel coordinates.

    Returns ``(y0, x0, mask)`` with ``mask`` covering the clipped bounding box (pixel
    centres tested), or ``None`` when nothing is inside the image.
    """
    xs_, ys_ = pts[:, 0], pts[:, 1]
    x0, x1 = max(int(np.floor(xs_.min())), 0), min(int(np.ceil(xs_.max())), w)
    y0, y1 = max(int(np.floor(ys_.min())), 0), min(int(np.ceil(ys_.max())), h)
    if x1 <= x0 or y1 <= y0:
        return None
    yc = np.arange(y0, y1, dtype=np.float64) + 0.5
    xc = np.arange(x0, x1, dtype=np.float64) + 0.5
    nxt = np.r_[1:len(pts), 0]
    xa, ya = xs_[:, None], ys_[:, None]
    xb, yb = xs_[nxt][:, None], ys_[nxt][:, None]
    crosses = (ya > yc) != (yb > yc)                              # (edges, rows)
    with np.errstate(divide='ignore', invalid='ignore'):
        x_int = xa + (yc - ya) * (xb - xa) / (yb - ya)           # (edges, rows)
    hits = crosses[:, :, None] & (xc[None, None, :] < x_int[:, :, None])
    mask = (hits.sum(axis=0) % 2).astype(bool)
    return y0, x0, mask


def _ellipse_mask(cx: float, cy: float, rx: float, ry: float, h: int, w: int,
                  inner: float = 0.0):
    """Filled ellipse (or ring when ``inner`` > 0: the inner radii are ``inner`` * r)."""
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    x0, x1 = max(int(np.floor(cx - rx)), 0), min(int(np.ceil(cx + rx)), w)
    y0, y1 = max(int(np.floor(cy - ry)), 0), min(int(np.ceil(cy + ry)), h)
    if x1 <= x0 or y1 <= y0:
        return None
    dy = ((np.arange(y0, y1) + 0.5 - cy) / ry)[:, None]
    dx = ((np.arange(x0, x1) + 0.5 - cx) / rx)[None, :]
    r2 = dx * dx + dy * dy
    mask = r2 <= 1.0
    if inner > 0:
        mask &= r2 >= inner * inner
    return y0, x0, mask


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float64)


class _Canvas:
    """Instance map plus, per instance, its class (train id or 255) and appearance key."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.inst = np.zeros((h, w), np.int32)
        self.classes: list[int] = [SKY]
        self.keys: list[int] = [SKY]

    def new(self, cls: int, key: int | None = None) -> int:
        self.classes.append(cls)
        self.keys.append(cls if key is None else key)
        return len(self.classes) - 1

    def paint(self, drawn, k: int) -> None:
        if drawn is None:
            return
        y0, x0, mask = drawn
        view = self.inst[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        view[mask] = k

    def poly(self, pts, k: int) -> None:
        self.paint(_polygon_mask(np.asarray(pts, np.float64), self.h, self.w), k)

    def ellipse(self, cx, cy, rx, ry, k: int, inner: float = 0.0) -> None:
        self.paint(_ellipse_mask(cx, cy, rx, ry, self.h, self.w, inner), k)


@dataclasses.dataclass
class _Street:
    """Ground-plane geometry of one scene (pixel rows, metres laterally)."""

    h: int
    w: int
    yh: float        # horizon row
    xv: float        # vanishing column
    cam_h: float     # camera height (m): pixels per metre at row y = (y - yh) / cam_h
    road_l: float    # lateral road edges (m, negative = left)
    road_r: float
    side_l: float    # outer sidewalk edges (m)
    side_r: float

    def col(self, x_m, y):
        """Image column of ground point at lateral ``x_m`` metres on row ``y``."""
        return self.xv + x_m * (y - self.yh) / self.cam_h

    def ppm(self, y):
        return (y - self.yh) / self.cam_h

    def row(self, t):
        """Ground row at fraction ``t`` of the way from the horizon to the bottom."""
        return self.yh + t * (self.h - self.yh)


# ----------------------------------------------------------------------------- objects
def _draw_person(cv: _Canvas, cx: float, yb: float, s: float, cls: int, rng: Rng,
                 seated: bool = False) -> None:
    """Person (or rider) standing at (cx, yb) with ``s`` pixels per metre."""
    hgt = rng.uniform(1.55, 1.9) * s * (0.75 if seated else 1.0)
    bw = 0.45 * s
    k = cv.new(cls)
    if not seated:  # two legs
        cv.poly(_rect(cx - bw * 0.45, yb - 0.48 * hgt, cx - bw * 0.05, yb), k)
        cv.poly(_rect(cx + bw * 0.05, yb - 0.48 * hgt, cx + bw * 0.45, yb), k)
    torso_bottom = yb - (0.48 if not seated else 0.2) * hgt
    cv.poly([(cx - bw * 0.5, torso_bottom), (cx + bw * 0.5, torso_bottom),
             (cx + bw * 0.4, yb - 0.85 * hgt), (cx - bw * 0.4, yb - 0.85 * hgt)], k)
    cv.ellipse(cx, yb - 0.92 * hgt, 0.12 * s, 0.15 * s, cv.new(cls, SKIN))


def _draw_two_wheeler(cv: _Canvas, cx: float, yb: float, s: float, cls: int, rng: Rng,
                      rider: bool) -> None:
    """Bicycle or motorcycle seen from the side, optionally with a rider on it."""
    motor = cls == MOTORCYCLE
    r = (0.33 if motor else 0.34) * s
    half = (0.7 if motor else 0.55) * s
    k = cv.new(cls)
    kt = cv.new(cls, TYRE) if motor else k
    for wx in (cx - half, cx + half):
        cv.ellipse(wx, yb - r, r, r, kt, inner=0.0 if motor else 0.75)
    if motor:
        cv.ellipse(cx, yb - 1.25 * r, half * 0.95, 0.45 * r, k)
    else:
        frame = 0.06 * s + 0.6
        cv.poly([(cx - half, yb - r), (cx, yb - r - frame), (cx + half * 0.8, yb - 2.2 * r),
                 (cx + half * 0.8, yb - 2.2 * r + frame), (cx, yb - r + frame)], k)
    if rider:
        _draw_person(cv, cx - 0.1 * s, yb - 1.6 * r, s, RIDER, rng, seated=True)


def _draw_vehicle(cv: _Canvas, cx: float, yb: float, s: float, cls: int, rng: Rng) -> None:
    """Car / truck / bus from behind or from the side; windows and tyres keep the label."""
    side = rng.random() < 0.3
    if cls == CAR:
        w, hgt = (rng.uniform(3.8, 4.6) if side else rng.uniform(1.7, 1.9)), rng.uniform(1.4, 1.6)
    elif cls == TRUCK:
        w, hgt = (rng.uniform(6, 9) if side else 2.5), rng.uniform(2.8, 3.6)
    else:
        w, hgt = (rng.uniform(10, 12) if side else 2.55), rng.uniform(3.0, 3.3)
    w, hgt = w * s, hgt * s
    k, kw, kt = cv.new(cls), cv.new(cls, WINDOW), cv.new(cls, TYRE)
    tyre = 0.32 * s
    for tx in ((cx - w * 0.35, cx + w * 0.35) if side else (cx - w * 0.4, cx + w * 0.4)):
        cv.poly(_rect(tx - 0.2 * s, yb - tyre, tx + 0.2 * s, yb), kt)
    if cls == CAR:
        body = 0.55 * hgt
        cv.poly(_rect(cx - w / 2, yb - body - 0.1 * s, cx + w / 2, yb - 0.15 * s), k)
        top = 0.3 if side else 0.4
        cv.poly([(cx - w * 0.45, yb - body), (cx + w * 0.45, yb - body),
                 (cx + w * top, yb - hgt), (cx - w * top, yb - hgt)], k)
        cv.poly([(cx - w * 0.38, yb - body - 0.05 * s), (cx + w * 0.38, yb - body - 0.05 * s),
                 (cx + w * (top - 0.05), yb - hgt + 0.1 * s),
                 (cx - w * (top - 0.05), yb - hgt + 0.1 * s)], kw)
    else:
        cv.poly(_rect(cx - w / 2, yb - hgt, cx + w / 2, yb - 0.15 * s), k)
        if cls == BUS:  # a band of windows
            cv.poly(_rect(cx - w * 0.45, yb - 0.85 * hgt, cx + w * 0.45, yb - 0.55 * hgt), kw)
        elif side:       # truck cab window
            cv.poly(_rect(cx + w * 0.3, yb - 0.8 * hgt, cx + w * 0.45, yb - 0.6 * hgt), kw)


def _draw_pole(cv: _Canvas, cx: float, yb: float, s: float, rng: Rng, to_road: float,
               scale: float = 1.0) -> None:
    """Pole with, sometimes, a traffic sign or a traffic light near its top; ``scale`` widens
    the pole and enlarges the sign or light."""
    hgt = rng.uniform(3.5, 6.0) * s
    s = s * scale
    half = max(0.07 * s, 0.5)
    cv.poly(_rect(cx - half, yb - hgt, cx + half, yb), cv.new(POLE))
    u = rng.random()
    if u < 0.45:
        k, size = cv.new(SIGN), rng.uniform(0.5, 0.8) * s
        top = yb - hgt + rng.uniform(0, 0.2) * hgt
        shape = rng.integers(3)
        if shape == 0:
            cv.ellipse(cx, top + size / 2, size / 2, size / 2, k)
        elif shape == 1:
            cv.poly(_rect(cx - size / 2, top, cx + size / 2, top + size), k)
        else:
            cv.poly([(cx - size / 2, top), (cx + size / 2, top), (cx, top + size)], k)
    elif u < 0.75:
        k = cv.new(LIGHT)
        lx = cx + to_road * rng.uniform(0, 1.5) * s
        if abs(lx - cx) > half:  # a short arm carries it over the road
            cv.poly(_rect(min(cx, lx), yb - hgt, max(cx, lx), yb - hgt + max(0.1 * s, 0.6)),
                    cv.new(POLE))
        cv.poly(_rect(lx - 0.18 * s, yb - hgt, lx + 0.18 * s, yb - hgt + 0.95 * s), k)


def _draw_tree(cv: _Canvas, cx: float, yb: float, s: float, rng: Rng) -> None:
    """Tree on the sidewalk edge: trunk and crown are both vegetation (Cityscapes rule)."""
    k = cv.new(VEGETATION)
    hgt = rng.uniform(5, 9) * s
    cv.poly(_rect(cx - 0.15 * s, yb - 0.5 * hgt, cx + 0.15 * s, yb), k)
    r = rng.uniform(1.5, 2.8) * s
    for _ in range(3):
        cv.ellipse(cx + rng.uniform(-0.5, 0.5) * r, yb - hgt + r + rng.uniform(-0.3, 0.3) * r,
                   r * rng.uniform(0.7, 1.0), r * rng.uniform(0.6, 0.9), k)


# ----------------------------------------------------------------------------- scenes
def _sample_street(h: int, w: int, rng: Rng) -> _Street:
    road_half = rng.uniform(3.0, 7.5)
    offset = rng.uniform(-0.5, 0.5) * road_half  # camera not on the road's centre line
    return _Street(
        h=h, w=w, yh=h * rng.uniform(0.36, 0.5), xv=w * (0.5 + rng.uniform(-0.12, 0.12)),
        cam_h=rng.uniform(1.2, 1.8), road_l=-road_half + offset, road_r=road_half + offset,
        side_l=-road_half + offset - rng.uniform(2.0, 5.0),
        side_r=road_half + offset + rng.uniform(2.0, 5.0))


def _draw_skyline(cv: _Canvas, st: _Street, stats: SceneStats, rng: Rng) -> None:
    """Distant buildings and tree lines standing on the horizon."""
    x = -rng.uniform(0, 0.1) * st.w
    while x < st.w:
        bw = st.w * rng.uniform(0.06, 0.25)
        top = st.yh - st.h * rng.uniform(0.04, 0.3)
        if rng.random() < stats.skyline_vegetation_p:
            k = cv.new(VEGETATION)
            cv.poly(_rect(x, top + 0.3 * (st.yh - top), x + bw, st.yh + 1), k)
            for _ in range(2):
                cv.ellipse(x + bw * rng.uniform(0.2, 0.8), top + 0.4 * (st.yh - top),
                           bw * rng.uniform(0.3, 0.6), 0.45 * (st.yh - top), k)
        else:
            k = cv.new(BUILDING)
            cv.poly(_rect(x, top, x + bw, st.yh + 1), k)
            drawn = _polygon_mask(_rect(x, top, x + bw, st.yh + 1), st.h, st.w)
            if drawn is not None:  # a window grid, same label
                y0, x0, mask = drawn
                period = max(3, int(st.h * 0.035))
                yy = (np.arange(y0, y0 + mask.shape[0]) - int(top))[:, None] % period
                xx = (np.arange(x0, x0 + mask.shape[1]) - int(x))[None, :] % period
                cv.paint((y0, x0, mask & (yy >= period // 2) & (xx >= period // 2)),
                         cv.new(BUILDING, WINDOW))
        x += bw


def _draw_ground(cv: _Canvas, st: _Street, stats: SceneStats, rng: Rng) -> None:
    """Road between two sidewalks and a verge on each side, all through the vanishing point."""
    def side_class():
        u = rng.random()
        if u < stats.side_terrain_p:
            return TERRAIN
        return VEGETATION if u < stats.side_terrain_p + stats.side_vegetation_p else SIDEWALK
    ids = np.array([cv.new(side_class()), cv.new(SIDEWALK), cv.new(ROAD), cv.new(SIDEWALK),
                    cv.new(side_class())], np.int32)
    r0 = int(np.ceil(st.yh - 0.5))
    y = np.arange(r0, st.h, dtype=np.float64)[:, None] + 0.5
    x = np.arange(st.w, dtype=np.float64)[None, :] + 0.5
    region = sum((x >= st.col(b, y)).astype(np.int32)
                 for b in (st.side_l, st.road_l, st.road_r, st.side_r))
    cv.inst[r0:] = ids[region]
    # Dashed centre line (road label, marking colour).
    if rng.random() < 0.7:
        km, xm = cv.new(ROAD, MARKING), 0.5 * (st.road_l + st.road_r)
        phase = rng.uniform(0, 1)
        for t0 in np.arange(0.02, 1.2, 0.12):
            ta, tb = t0 * (1 + phase * 0.1), t0 * (1 + phase * 0.1) + 0.05 + 0.1 * t0
            ya, yb = st.row(min(ta, 1.3)), st.row(min(tb, 1.3))
            cv.poly([(st.col(xm - 0.08, ya), ya), (st.col(xm + 0.08, ya), ya),
                     (st.col(xm + 0.08, yb), yb), (st.col(xm - 0.08, yb), yb)], km)


def _draw_flanks(cv: _Canvas, st: _Street, stats: SceneStats, rng: Rng, scale: float = 1.0) -> None:
    """Facades, walls and fences (``scale`` times their height) on the outer sidewalk edges."""
    for x_m in (st.side_l, st.side_r):
        if rng.random() < stats.facade_p:
            _draw_wall_strip(cv, st, x_m, rng.uniform(0.02, 0.25), 4.0,
                             rng.uniform(8, 25), BUILDING, windows=True)
        for cls, p, hgt in ((WALL, stats.wall_p, scale * rng.uniform(1.0, 2.2)),
                            (FENCE, stats.fence_p, scale * rng.uniform(0.8, 1.6))):
            if rng.random() < p:
                t0 = rng.uniform(0.05, 0.6)
                _draw_wall_strip(cv, st, x_m, t0, t0 + rng.uniform(0.2, 1.5), hgt, cls,
                                 windows=False)


def _draw_wall_strip(cv: _Canvas, st: _Street, x_m: float, t0: float, t1: float,
                     height_m: float, cls: int, windows: bool) -> None:
    """Vertical plane at lateral ``x_m`` from ground fraction t0 to t1, ``height_m`` tall."""
    ya, yb = st.row(t0), st.row(t1)
    xa, xb = st.col(x_m, ya), st.col(x_m, yb)
    pts = np.array([(xa, ya), (xb, yb), (xb, yb - height_m * st.ppm(yb)),
                    (xa, ya - height_m * st.ppm(ya))])
    drawn = _polygon_mask(pts, st.h, st.w)
    k = cv.new(cls)
    cv.paint(drawn, k)
    if drawn is None:
        return
    y0, x0, mask = drawn
    # Plane coordinates of each pixel: ground row of its column gives the depth scale.
    xc = np.arange(x0, x0 + mask.shape[1]) + 0.5
    yg = st.yh + (xc - st.xv) * st.cam_h / x_m            # ground row under the column
    s = np.maximum((yg - st.yh) / st.cam_h, 1e-3)
    up = (yg[None, :] - (np.arange(y0, y0 + mask.shape[0]) + 0.5)[:, None]) / s[None, :]
    depth = st.w / s                                       # metres, up to a constant
    if windows:
        pattern = ((up % 3.2) > 1.1) & ((up % 3.2) < 2.5) & ((depth % 4.0) < 2.2)
        cv.paint((y0, x0, mask & pattern & (up > 0.5)), cv.new(BUILDING, WINDOW))
    elif cls == FENCE:
        # Lattice: the gaps between the bars keep the fence label but are drawn dark.
        pattern = ((depth * 4.0) % 1.0 < 0.35) | ((up * 3.0) % 1.0 < 0.25)
        cv.paint((y0, x0, mask & ~pattern), cv.new(FENCE, TYRE))


def _draw_objects(cv: _Canvas, st: _Street, stats: SceneStats, rng: Rng, scale: float = 1.0) -> None:
    """Vehicles, people, two-wheelers, poles and trees, painted far to near. People and
    two-wheelers are ``scale`` times their metric size, and so are the width of poles and the
    size of the signs and lights they carry (not their height)."""
    jobs = []  # (base row, draw callable)

    def on_ground(lo_m, hi_m, t_hi=1.05, power=1.0):
        # power > 1 favours far (small) objects, as a street seen from a car does.
        t = 0.04 + (t_hi - 0.04) * rng.random() ** power
        y = st.row(t)
        x_m = rng.uniform(lo_m, hi_m)
        return st.col(x_m, y), y, st.ppm(y), x_m

    road = (st.road_l + 1.0, st.road_r - 1.0)
    for cls, n in ((CAR, stats.cars), (TRUCK, stats.trucks), (BUS, stats.buses)):
        for _ in range(rng.poisson(n)):
            cx, y, s, _ = on_ground(*road, t_hi=0.95, power=1.6)
            jobs.append((y, lambda cv, cx=cx, y=y, s=s, cls=cls:
                         _draw_vehicle(cv, cx, y, s, cls, rng)))
    walk = [(st.side_l + 0.5, st.road_l - 0.3), (st.road_r + 0.3, st.side_r - 0.5)]
    for _ in range(rng.poisson(stats.persons)):
        cx, y, s, _ = on_ground(*walk[rng.integers(2)])
        jobs.append((y, lambda cv, cx=cx, y=y, s=s * scale: _draw_person(cv, cx, y, s, PERSON, rng)))
    for cls, n, rider in ((BICYCLE, stats.cyclists, True), (MOTORCYCLE, stats.motorcyclists, True),
                          (BICYCLE, stats.parked_bicycles, False)):
        for _ in range(rng.poisson(n)):
            lane = road if rider else walk[rng.integers(2)]
            cx, y, s, _ = on_ground(*lane)
            jobs.append((y, lambda cv, cx=cx, y=y, s=s * scale, cls=cls, r=rider:
                         _draw_two_wheeler(cv, cx, y, s, cls, rng, r)))
    for _ in range(rng.poisson(stats.poles)):
        left = rng.random() < 0.5
        x_m = (st.road_l - 0.4) if left else (st.road_r + 0.4)
        y = st.row(rng.uniform(0.05, 1.0))
        jobs.append((y, lambda cv, x=st.col(x_m, y), y=y, s=st.ppm(y), d=(1 if left else -1):
                     _draw_pole(cv, x, y, s, rng, d, scale)))
    for _ in range(rng.poisson(stats.trees)):
        x_m = (st.side_l + 0.8) if rng.random() < 0.5 else (st.side_r - 0.8)
        y = st.row(rng.uniform(0.05, 0.9))
        jobs.append((y, lambda cv, x=st.col(x_m, y), y=y, s=st.ppm(y):
                     _draw_tree(cv, x, y, s, rng)))
    if rng.random() < stats.train_p:  # a tram/train crossing far away
        y = st.row(rng.uniform(0.03, 0.12))
        s = st.ppm(y)
        x0 = st.w * rng.uniform(-0.2, 0.6)
        jobs.append((y, lambda cv, x0=x0, y=y, s=s: _draw_train(cv, x0, y, s, rng)))
    jobs.sort(key=lambda job: job[0])
    for _, draw in jobs:
        draw(cv)


def _draw_train(cv: _Canvas, x0: float, yb: float, s: float, rng: Rng) -> None:
    length = cv.w * rng.uniform(0.3, 0.7)
    hgt = rng.uniform(3.5, 4.2) * s
    cv.poly(_rect(x0, yb - hgt, x0 + length, yb), cv.new(TRAIN))
    cv.poly(_rect(x0 + 0.02 * length, yb - 0.8 * hgt, x0 + 0.98 * length, yb - 0.5 * hgt),
            cv.new(TRAIN, WINDOW))


def _draw_ego(cv: _Canvas, rng: Rng) -> None:
    """Ego-vehicle hood at the bottom edge, labelled ignore (as in Cityscapes)."""
    depth = cv.h * rng.uniform(0.03, 0.07)
    bulge = cv.h * rng.uniform(0.0, 0.04)
    xs = np.linspace(-0.05 * cv.w, 1.05 * cv.w, 9)
    top = cv.h - depth - bulge * (1 - ((xs - cv.w / 2) / (cv.w / 2)) ** 2)
    bottom = [(1.05 * cv.w, cv.h + 1), (-0.05 * cv.w, cv.h + 1)]
    pts = np.concatenate([np.stack([xs, top], 1), bottom])
    cv.poly(pts, cv.new(IGNORE, HOOD))


def draw_scene(h: int, w: int, stats: SceneStats, rng: Rng, object_scale: float = 1.0) -> _Canvas:
    """Lay out one street scene; returns the canvas (instance map, classes, keys).

    ``object_scale`` > 1 draws people, two-wheelers, pole widths, signs, lights, walls and
    fences larger than their metric size where they stand (vehicles, trees and the street keep
    theirs): at small image sizes it keeps the thin and small classes wider than a few output
    strides of the network, so that they can be learned at all."""
    cv = _Canvas(h, w)
    st = _sample_street(h, w, rng)
    _draw_skyline(cv, st, stats, rng)
    _draw_ground(cv, st, stats, rng)
    _draw_flanks(cv, st, stats, rng, object_scale)
    _draw_objects(cv, st, stats, rng, object_scale)
    if rng.random() < stats.ego_p:
        _draw_ego(cv, rng)
    return cv


# ----------------------------------------------------------------------------- rendering
def _smooth_noise(h: int, w: int, cell: int, rng: Rng, channels: int = 1) -> np.ndarray:
    """Roughly unit-variance noise, smooth over ``cell`` pixels: (h, w, channels) float32.

    A coarse grid of normal draws, quantised to uint8 and upsampled by PIL bilinear.
    """
    grid = rng.standard_normal((h // cell + 2, w // cell + 2, channels), dtype=np.float32)
    grid = np.clip(128.0 + 40.0 * grid, 0, 255).astype(np.uint8)
    mode = 'RGB' if channels == 3 else 'L'
    img = Image.fromarray(grid if channels == 3 else grid[..., 0], mode)
    out = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32)
    return ((out - 128.0) / 40.0).reshape(h, w, channels)


def _blur3(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication: (h, w, c) -> (h, w, c)."""
    for axis in (0, 1):
        a = np.moveaxis(img, axis, 0)
        out = 0.5 * a
        out[1:] += 0.25 * a[:-1]
        out[:-1] += 0.25 * a[1:]
        out[0] += 0.25 * a[0]
        out[-1] += 0.25 * a[-1]
        img = np.moveaxis(out, 0, axis)
    return img


def render_source(cv: _Canvas, rng: Rng) -> np.ndarray:
    """Game-like look: flat per-instance colours (palette + small jitter), clean edges."""
    n = len(cv.keys)
    keys = np.asarray(cv.keys)
    colours = _SOURCE_PALETTE[keys] * rng.uniform(0.9, 1.1, (n, 1))   # brightness jitter
    colours += rng.normal(0.0, 6.0, (n, 3))                           # hue jitter
    colours *= rng.uniform(0.92, 1.08)                                # time of day
    return np.clip(colours, 0, 255).astype(np.uint8)[cv.inst]


def render_target(cv: _Canvas, label: np.ndarray, rng: Rng, palette: np.ndarray | None = None,
                  exposure: float = 1.0, texture: float = 1.0) -> np.ndarray:
    """Photo-like look: shifted palette, per-class textures, white balance, lower
    saturation and contrast, lighting gradient, vignetting, blur, exposure and sensor noise.

    ``palette``: the class colours (``target_palette()``); ``exposure`` scales every level
    before the sensor noise (< 1: darker photos than the rendered source); ``texture`` scales
    the per-class texture amplitudes (``_TARGET_TEXTURE``; 0: flat classes).
    """
    h, w = label.shape
    n = len(cv.keys)
    keys = np.asarray(cv.keys)
    palette = target_palette() if palette is None else palette
    colours = palette[keys] * rng.uniform(0.85, 1.15, (n, 1))
    colours += rng.normal(0.0, 9.0, (n, 3))
    img = colours.astype(np.float32)[cv.inst]
    # Per-class texture: smooth blotches, fine grain and horizontal streaks (grey levels).
    tex = np.float32(texture) * _TARGET_TEXTURE[np.minimum(label, 19)]  # (h, w, 3)
    lum = tex[..., 0] * _smooth_noise(h, w, 6, rng)[..., 0]
    lum += tex[..., 1] * rng.standard_normal((h, w), dtype=np.float32)
    lum += tex[..., 2] * np.sin(np.arange(h, dtype=np.float32) * 2.1)[:, None]
    img += lum[..., None]
    img += 4.0 * _smooth_noise(h, w, 24, rng, 3)
    # Global photometric change as one affine map per pixel: white balance (gain), then
    # saturation (towards the grey level), then contrast (towards 118).
    gain = np.array(_GAIN, np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    sat, con = np.float32(rng.uniform(*_SATURATION)), np.float32(rng.uniform(*_CONTRAST))
    img *= gain
    grey = img.mean(-1, keepdims=True)
    img *= con * sat
    img += con * (1 - sat) * grey + np.float32(118.0 * (1 - con))
    # Lighting: a linear gradient in a random direction and vignetting.
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h - 0.5
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w - 0.5
    ang = rng.uniform(0, 2 * np.pi)
    light = 1.0 + np.float32(0.25 * np.cos(ang)) * xx + np.float32(0.25 * np.sin(ang)) * yy
    light -= 0.35 * (xx * xx + yy * yy)
    img *= light[..., None]
    img = _blur3(img)
    if exposure != 1.0:  # the camera's exposure relative to the rendered look
        img *= np.float32(exposure)
    img += 3.0 * rng.standard_normal(img.shape, dtype=np.float32)    # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- dataset
def _subset_table(num_classes: int) -> np.ndarray:
    """Train id (19 classes, 255) -> train id of the ``num_classes`` protocol (or 255)."""
    if num_classes not in LABEL_IDS:
        raise ValueError(f'num_classes must be one of {sorted(LABEL_IDS)}, got {num_classes}')
    table = np.full(256, IGNORE, np.uint8)
    table[list(layouts.TO_19[num_classes])] = np.arange(num_classes, dtype=np.uint8)
    return table


def _stats_for(domain: str, num_classes: int) -> SceneStats:
    stats = SOURCE_STATS if domain == 'source' else TARGET_STATS
    if num_classes < 19:  # do not draw what the protocol drops (terrain, truck, train, ...)
        stats = dataclasses.replace(stats, trucks=0.0, train_p=0.0,
                                    side_terrain_p=0.0)
    if num_classes < 16:
        stats = dataclasses.replace(stats, wall_p=0.0, fence_p=0.0)
    return stats


class SyntheticDataset:
    """Procedural street scenes of one domain and split, random access.

    ``ds[i]`` is ``{'image': uint8 (H, W, 3) RGB, 'label': uint8 (H, W) train ids
    (0..num_classes-1, 255 = ignore), 'name': str}``, a pure function of
    ``(seed, domain, split, i)``.
    """

    def __init__(self, domain: str, split: str, num_classes: int = 19, seed: int = 0,
                 size: Sequence[int] = (128, 256), length: int | None = None, object_scale: float = 1.0,
                 domain_shift: float = DEFAULT_DOMAIN_SHIFT, exposure: float = 1.0, texture: float = 1.0):
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f'size must be (H, W) with both >= 16, got {size}')
        if not object_scale > 0:
            raise ValueError(f'object_scale must be positive, got {object_scale}')
        if not 0 <= domain_shift <= 1:
            raise ValueError(f'domain_shift must be in [0, 1], got {domain_shift}')
        if not 0 < exposure <= 2:
            raise ValueError(f'exposure must be in (0, 2], got {exposure}')
        if not 0 <= texture <= 10:
            raise ValueError(f'texture must be in [0, 10], got {texture}')
        self.object_scale = float(object_scale)
        self.domain_shift = float(domain_shift)
        self.exposure = float(exposure)
        self.texture = float(texture)
        self._palette = target_palette(domain_shift) if domain == 'target' else None
        self.domain, self.split, self.seed = domain, split, int(seed)
        self.num_classes = num_classes
        self.size = (int(size[0]), int(size[1]))
        self.length = DEFAULT_LENGTH[(domain, split)] if length is None else int(length)
        self._table = _subset_table(num_classes)
        self._stats = _stats_for(domain, num_classes)
        # Items are pure functions of their index: drawn once per process, then served from
        # memory (a 96x192 item is 74 kB; every epoch after the first costs nothing to draw),
        # as long as the whole split stays under 256 MB.
        self._cache: dict[int, dict] | None = {} if self.length * self.size[0] * self.size[1] * 4 <= 2**28 else None

    def __repr__(self) -> str:
        # Stable across processes: grain checks a restored iterator against repr(data_source).
        return (f"SyntheticDataset(domain={self.domain!r}, split={self.split!r}, num_classes={self.num_classes}, "
                f"seed={self.seed}, size={self.size}, length={self.length}"
                + (f", object_scale={self.object_scale}" if self.object_scale != 1.0 else "")
                + (f", domain_shift={self.domain_shift}"
                   if self.domain == 'target' and self.domain_shift != DEFAULT_DOMAIN_SHIFT else "")
                + (f", exposure={self.exposure}" if self.domain == 'target' and self.exposure != 1.0 else "")
                + (f", texture={self.texture}" if self.domain == 'target' and self.texture != 1.0 else "") + ")")

    def __len__(self) -> int:
        return self.length

    def rng(self, i: int) -> Rng:
        """The generator of item ``i`` (depends on seed, domain, split and i only)."""
        ss = np.random.SeedSequence(
            [self.seed, DOMAINS.index(self.domain), SPLITS.index(self.split), int(i)])
        return np.random.default_rng(ss)

    def __getitem__(self, i: int) -> dict:
        if not -self.length <= i < self.length:
            raise IndexError(f'index {i} out of range for {self.length} items')
        i = i % self.length
        if self._cache is None:
            return self._draw(i)
        if i not in self._cache:
            self._cache[i] = self._draw(i)
        item = self._cache[i]
        return {'image': item['image'].copy(), 'label': item['label'].copy(), 'name': item['name']}

    def _draw(self, i: int) -> dict:
        rng = self.rng(i)
        cv = draw_scene(*self.size, self._stats, rng, self.object_scale)
        label19 = np.asarray(cv.classes, np.uint8)[cv.inst]
        if self.domain == 'source':
            image = render_source(cv, rng)
        else:
            image = render_target(cv, label19, rng, self._palette, self.exposure, self.texture)
        return {'image': image, 'label': self._table[label19],
                'name': f'{self.domain}_{self.split}_{i:06d}'}


# ----------------------------------------------------------------------------- layouts
def train_to_label_ids(label: np.ndarray, num_classes: int = 19) -> np.ndarray:
    """Train ids (255 = ignore) -> Cityscapes/GTA5 label ids (ignore -> 0, 'unlabeled')."""
    table = np.zeros(256, np.uint8)
    table[:num_classes] = LABEL_IDS[num_classes]
    return table[label]


def write_layout(dataset: SyntheticDataset, root: str, layout: str, split: str | None = None,
                 city: str = 'synthetic') -> list[tuple[str, str]]:
    """Write every item of ``dataset`` under ``root`` in a published layout.

    ``cityscapes``: ``leftImg8bit/<split>/<city>/<city>_000000_<i:06d>_leftImg8bit.png``
    and ``gtFine/<split>/<city>/<city>_000000_<i:06d>_gtFine_labelIds.png``.
    ``gta5``: ``images/<i+1:05d>.png`` and ``labels/<i+1:05d>.png`` (GTA5 counts from 1).
    Labels hold label ids (train id -> id by the class list, ignore -> 0). ``split``
    defaults to the dataset's split. Returns the written (image, label) paths.
    """
    split = dataset.split if split is None else split
    pairs = []
    for i in range(len(dataset)):
        item = dataset[i]
        if layout == 'cityscapes':
            stem = f'{city}_000000_{i:06d}'
            img_path = os.path.join(root, 'leftImg8bit', split, city, f'{stem}_leftImg8bit.png')
            lab_path = os.path.join(root, 'gtFine', split, city, f'{stem}_gtFine_labelIds.png')
        elif layout == 'gta5':
            img_path = os.path.join(root, 'images', f'{i + 1:05d}.png')
            lab_path = os.path.join(root, 'labels', f'{i + 1:05d}.png')
        else:
            raise ValueError(f"layout must be 'cityscapes' or 'gta5', got {layout!r}")
        for path in (img_path, lab_path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(item['image'], 'RGB').save(img_path)
        Image.fromarray(train_to_label_ids(item['label'], dataset.num_classes), 'L').save(lab_path)
        pairs.append((img_path, lab_path))
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cpsl_jax.data.synthetic --out DIR --layout cityscapes --domain target``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', required=True, help='root folder of the written layout')
    p.add_argument('--layout', choices=('cityscapes', 'gta5'), required=True)
    p.add_argument('--domain', choices=DOMAINS, required=True)
    p.add_argument('--splits', nargs='+', choices=SPLITS, default=None,
                   help="default: train and val for cityscapes, train for gta5")
    p.add_argument('--num', type=int, default=None, help='items per split (default per split)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--size', type=int, nargs=2, default=(128, 256), metavar=('H', 'W'))
    p.add_argument('--num-classes', type=int, default=19, choices=sorted(LABEL_IDS))
    p.add_argument('--object-scale', type=float, default=1.0,
                   help='people, two-wheelers, poles, signs, lights, walls and fences drawn this many '
                        'times their metric size')
    p.add_argument('--domain-shift', type=float, default=DEFAULT_DOMAIN_SHIFT,
                   help='how far the target class colours move toward their photo-like tones (0-1)')
    p.add_argument('--exposure', type=float, default=1.0,
                   help='brightness of the target images relative to the rendered look (< 1: darker)')
    p.add_argument('--texture', type=float, default=1.0,
                   help="scale of the target's per-class texture amplitudes (0: flat classes)")
    args = p.parse_args(argv)
    splits = args.splits or (['train', 'val'] if args.layout == 'cityscapes' else ['train'])
    if args.layout == 'gta5' and len(splits) != 1:
        p.error('the gta5 layout has no split folders: give one --splits value')
    for split in splits:
        ds = SyntheticDataset(args.domain, split, args.num_classes, args.seed, args.size,
                              args.num, args.object_scale, args.domain_shift, args.exposure, args.texture)
        write_layout(ds, args.out, args.layout, split)
        print(f'wrote {len(ds)} {args.domain}/{split} items to {args.out} ({args.layout})')


if __name__ == '__main__':
    main()
