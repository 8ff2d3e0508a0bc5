"""Drawing primitives of the synthetic street scenes: classes, instance canvas, ground plane.

Everything is painted into an *instance map* with the painter's algorithm (far to near), so
the label map is exactly what was drawn: ``label = class_of[instance]``. The camera is a
pinhole over a flat ground plane (horizon row ``yh``; a ground point at lateral offset X metres
on row y is at column ``xv + X * (y - yh) / cam_h``, so object sizes scale with ``y - yh``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

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


def polygon_mask(pts: np.ndarray, h: int, w: int):
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


def ellipse_mask(cx: float, cy: float, rx: float, ry: float, h: int, w: int,
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


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float64)


class Canvas:
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
        self.paint(polygon_mask(np.asarray(pts, np.float64), self.h, self.w), k)

    def ellipse(self, cx, cy, rx, ry, k: int, inner: float = 0.0) -> None:
        self.paint(ellipse_mask(cx, cy, rx, ry, self.h, self.w, inner), k)


@dataclasses.dataclass
class Street:
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

