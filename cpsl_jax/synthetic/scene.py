"""Street-scene layout: how many objects of each class a domain draws, and where.

``draw_scene`` lays out one scene on a ``Canvas``: a skyline on the horizon, the road between
two sidewalks and verges, facades, walls and fences on the flanks, then vehicles, people,
two-wheelers, poles and trees painted far to near. ``SceneStats`` holds a domain's expected
object counts and layout probabilities.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cpsl_jax.synthetic.geometry import (BICYCLE, BUILDING, BUS, CAR, FENCE, HOOD, IGNORE, LIGHT, MARKING,
                                         MOTORCYCLE, PERSON, POLE, RIDER, ROAD, SIDEWALK, SIGN, SKIN,
                                         TERRAIN, TRAIN, TRUCK, TYRE, VEGETATION, WALL, WINDOW, Canvas, Rng,
                                         Street, polygon_mask, rect)

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
    # Share of poles carrying a sign / a light; the horizon row and the skyline's height as
    # ranges of fractions of the image height.
    sign_p: float = 0.45
    rider_size: float = 1.0   # riders' size relative to their two-wheeler's scale
    light_p: float = 0.3
    horizon: tuple[float, float] = (0.36, 0.5)
    skyline: tuple[float, float] = (0.04, 0.3)


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


def _draw_person(cv: Canvas, cx: float, yb: float, s: float, cls: int, rng: Rng,
                 seated: bool = False) -> None:
    """Person (or rider) standing at (cx, yb) with ``s`` pixels per metre."""
    hgt = rng.uniform(1.55, 1.9) * s * (0.75 if seated else 1.0)
    bw = 0.45 * s
    k = cv.new(cls)
    if not seated:  # two legs
        cv.poly(rect(cx - bw * 0.45, yb - 0.48 * hgt, cx - bw * 0.05, yb), k)
        cv.poly(rect(cx + bw * 0.05, yb - 0.48 * hgt, cx + bw * 0.45, yb), k)
    torso_bottom = yb - (0.48 if not seated else 0.2) * hgt
    cv.poly([(cx - bw * 0.5, torso_bottom), (cx + bw * 0.5, torso_bottom),
             (cx + bw * 0.4, yb - 0.85 * hgt), (cx - bw * 0.4, yb - 0.85 * hgt)], k)
    cv.ellipse(cx, yb - 0.92 * hgt, 0.12 * s, 0.15 * s, cv.new(cls, SKIN))


def _draw_two_wheeler(cv: Canvas, cx: float, yb: float, s: float, cls: int, rng: Rng,
                      rider: bool, rider_size: float = 1.0) -> None:
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
        _draw_person(cv, cx - 0.1 * s, yb - 1.6 * r, s * rider_size, RIDER, rng, seated=True)


def _draw_vehicle(cv: Canvas, cx: float, yb: float, s: float, cls: int, rng: Rng) -> None:
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
        cv.poly(rect(tx - 0.2 * s, yb - tyre, tx + 0.2 * s, yb), kt)
    if cls == CAR:
        body = 0.55 * hgt
        cv.poly(rect(cx - w / 2, yb - body - 0.1 * s, cx + w / 2, yb - 0.15 * s), k)
        top = 0.3 if side else 0.4
        cv.poly([(cx - w * 0.45, yb - body), (cx + w * 0.45, yb - body),
                 (cx + w * top, yb - hgt), (cx - w * top, yb - hgt)], k)
        cv.poly([(cx - w * 0.38, yb - body - 0.05 * s), (cx + w * 0.38, yb - body - 0.05 * s),
                 (cx + w * (top - 0.05), yb - hgt + 0.1 * s),
                 (cx - w * (top - 0.05), yb - hgt + 0.1 * s)], kw)
    else:
        cv.poly(rect(cx - w / 2, yb - hgt, cx + w / 2, yb - 0.15 * s), k)
        if cls == BUS:  # a band of windows
            cv.poly(rect(cx - w * 0.45, yb - 0.85 * hgt, cx + w * 0.45, yb - 0.55 * hgt), kw)
        elif side:       # truck cab window
            cv.poly(rect(cx + w * 0.3, yb - 0.8 * hgt, cx + w * 0.45, yb - 0.6 * hgt), kw)


def _draw_pole(cv: Canvas, cx: float, yb: float, s: float, rng: Rng, to_road: float,
               scale: float = 1.0, sign_p: float = 0.45, light_p: float = 0.3) -> None:
    """Pole with, sometimes, a traffic sign or a traffic light near its top; ``scale`` widens
    the pole and enlarges the sign or light."""
    hgt = rng.uniform(3.5, 6.0) * s
    s = s * scale
    half = max(0.07 * s, 0.5)
    cv.poly(rect(cx - half, yb - hgt, cx + half, yb), cv.new(POLE))
    u = rng.random()
    if u < sign_p:
        k, size = cv.new(SIGN), rng.uniform(0.5, 0.8) * s
        top = yb - hgt + rng.uniform(0, 0.2) * hgt
        shape = rng.integers(3)
        if shape == 0:
            cv.ellipse(cx, top + size / 2, size / 2, size / 2, k)
        elif shape == 1:
            cv.poly(rect(cx - size / 2, top, cx + size / 2, top + size), k)
        else:
            cv.poly([(cx - size / 2, top), (cx + size / 2, top), (cx, top + size)], k)
    elif u < sign_p + light_p:
        k = cv.new(LIGHT)
        lx = cx + to_road * rng.uniform(0, 1.5) * s
        if abs(lx - cx) > half:  # a short arm carries it over the road
            cv.poly(rect(min(cx, lx), yb - hgt, max(cx, lx), yb - hgt + max(0.1 * s, 0.6)),
                    cv.new(POLE))
        cv.poly(rect(lx - 0.18 * s, yb - hgt, lx + 0.18 * s, yb - hgt + 0.95 * s), k)


def _draw_tree(cv: Canvas, cx: float, yb: float, s: float, rng: Rng) -> None:
    """Tree on the sidewalk edge: trunk and crown are both vegetation (Cityscapes rule)."""
    k = cv.new(VEGETATION)
    hgt = rng.uniform(5, 9) * s
    cv.poly(rect(cx - 0.15 * s, yb - 0.5 * hgt, cx + 0.15 * s, yb), k)
    r = rng.uniform(1.5, 2.8) * s
    for _ in range(3):
        cv.ellipse(cx + rng.uniform(-0.5, 0.5) * r, yb - hgt + r + rng.uniform(-0.3, 0.3) * r,
                   r * rng.uniform(0.7, 1.0), r * rng.uniform(0.6, 0.9), k)


# ----------------------------------------------------------------------------- scenes
def _sample_street(h: int, w: int, rng: Rng, horizon: tuple[float, float] = (0.36, 0.5)) -> Street:
    road_half = rng.uniform(3.0, 7.5)
    offset = rng.uniform(-0.5, 0.5) * road_half  # camera not on the road's centre line
    return Street(
        h=h, w=w, yh=h * rng.uniform(*horizon), xv=w * (0.5 + rng.uniform(-0.12, 0.12)),
        cam_h=rng.uniform(1.2, 1.8), road_l=-road_half + offset, road_r=road_half + offset,
        side_l=-road_half + offset - rng.uniform(2.0, 5.0),
        side_r=road_half + offset + rng.uniform(2.0, 5.0))


def _draw_skyline(cv: Canvas, st: Street, stats: SceneStats, rng: Rng) -> None:
    """Distant buildings and tree lines standing on the horizon."""
    x = -rng.uniform(0, 0.1) * st.w
    while x < st.w:
        bw = st.w * rng.uniform(0.06, 0.25)
        top = st.yh - st.h * rng.uniform(*stats.skyline)
        if rng.random() < stats.skyline_vegetation_p:
            k = cv.new(VEGETATION)
            cv.poly(rect(x, top + 0.3 * (st.yh - top), x + bw, st.yh + 1), k)
            for _ in range(2):
                cv.ellipse(x + bw * rng.uniform(0.2, 0.8), top + 0.4 * (st.yh - top),
                           bw * rng.uniform(0.3, 0.6), 0.45 * (st.yh - top), k)
        else:
            k = cv.new(BUILDING)
            cv.poly(rect(x, top, x + bw, st.yh + 1), k)
            drawn = polygon_mask(rect(x, top, x + bw, st.yh + 1), st.h, st.w)
            if drawn is not None:  # a window grid, same label
                y0, x0, mask = drawn
                period = max(3, int(st.h * 0.035))
                yy = (np.arange(y0, y0 + mask.shape[0]) - int(top))[:, None] % period
                xx = (np.arange(x0, x0 + mask.shape[1]) - int(x))[None, :] % period
                cv.paint((y0, x0, mask & (yy >= period // 2) & (xx >= period // 2)),
                         cv.new(BUILDING, WINDOW))
        x += bw


def _draw_ground(cv: Canvas, st: Street, stats: SceneStats, rng: Rng) -> None:
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


def _draw_flanks(cv: Canvas, st: Street, stats: SceneStats, rng: Rng, scale: float = 1.0) -> None:
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


def _draw_wall_strip(cv: Canvas, st: Street, x_m: float, t0: float, t1: float,
                     height_m: float, cls: int, windows: bool) -> None:
    """Vertical plane at lateral ``x_m`` from ground fraction t0 to t1, ``height_m`` tall."""
    ya, yb = st.row(t0), st.row(t1)
    xa, xb = st.col(x_m, ya), st.col(x_m, yb)
    pts = np.array([(xa, ya), (xb, yb), (xb, yb - height_m * st.ppm(yb)),
                    (xa, ya - height_m * st.ppm(ya))])
    drawn = polygon_mask(pts, st.h, st.w)
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


def _draw_objects(cv: Canvas, st: Street, stats: SceneStats, rng: Rng, scale: float = 1.0) -> None:
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
                         _draw_two_wheeler(cv, cx, y, s, cls, rng, r, stats.rider_size)))
    for _ in range(rng.poisson(stats.poles)):
        left = rng.random() < 0.5
        x_m = (st.road_l - 0.4) if left else (st.road_r + 0.4)
        y = st.row(rng.uniform(0.05, 1.0))
        jobs.append((y, lambda cv, x=st.col(x_m, y), y=y, s=st.ppm(y), d=(1 if left else -1):
                     _draw_pole(cv, x, y, s, rng, d, scale, stats.sign_p, stats.light_p)))
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


def _draw_train(cv: Canvas, x0: float, yb: float, s: float, rng: Rng) -> None:
    length = cv.w * rng.uniform(0.3, 0.7)
    hgt = rng.uniform(3.5, 4.2) * s
    cv.poly(rect(x0, yb - hgt, x0 + length, yb), cv.new(TRAIN))
    cv.poly(rect(x0 + 0.02 * length, yb - 0.8 * hgt, x0 + 0.98 * length, yb - 0.5 * hgt),
            cv.new(TRAIN, WINDOW))


def _draw_ego(cv: Canvas, rng: Rng) -> None:
    """Ego-vehicle hood at the bottom edge, labelled ignore (as in Cityscapes)."""
    depth = cv.h * rng.uniform(0.03, 0.07)
    bulge = cv.h * rng.uniform(0.0, 0.04)
    xs = np.linspace(-0.05 * cv.w, 1.05 * cv.w, 9)
    top = cv.h - depth - bulge * (1 - ((xs - cv.w / 2) / (cv.w / 2)) ** 2)
    bottom = [(1.05 * cv.w, cv.h + 1), (-0.05 * cv.w, cv.h + 1)]
    pts = np.concatenate([np.stack([xs, top], 1), bottom])
    cv.poly(pts, cv.new(IGNORE, HOOD))


def draw_scene(h: int, w: int, stats: SceneStats, rng: Rng, object_scale: float = 1.0) -> Canvas:
    """Lay out one street scene; returns the canvas (instance map, classes, keys).

    ``object_scale`` > 1 draws people, two-wheelers, pole widths, signs, lights, walls and
    fences larger than their metric size where they stand (vehicles, trees and the street keep
    theirs): at small image sizes it keeps the thin and small classes wider than a few output
    strides of the network, so that they can be learned at all."""
    cv = Canvas(h, w)
    st = _sample_street(h, w, rng, stats.horizon)
    _draw_skyline(cv, st, stats, rng)
    _draw_ground(cv, st, stats, rng)
    _draw_flanks(cv, st, stats, rng, object_scale)
    _draw_objects(cv, st, stats, rng, object_scale)
    if rng.random() < stats.ego_p:
        _draw_ego(cv, rng)
    return cv

