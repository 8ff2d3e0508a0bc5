"""The second pair of synthetic domains (``synthetic-v2``): shifts that normalisation cannot undo.

The first pair (``v1``, ``style.render_target``) differs mostly by global photometric changes
(palette drift, white balance, exposure, noise), which re-estimating BatchNorm statistics on the
target (AdaBN) closes. Here the two domains differ *per class*, as materials do between a game
and photos of real streets:

* the source paints every class in one game colour with a small per-instance jitter
  (``SOURCE_MATERIALS``), flat;
* the target gives several classes new materials (``TARGET_MATERIALS``): cars, people, riders,
  buses, trucks, trains and two-wheelers come in several colours per instance, one of which is
  the source's; buildings are concrete as often as brick; the sky is overcast half the time;
  signs are blue as often as yellow; vegetation is darker and blotchy, terrain drier, sidewalks
  tiled. A colour shift that moves each class in its own direction, and for objects only some
  of their instances, cannot be undone by one per-channel affine map per layer.
* class frequencies differ the way GTA5's and Cityscapes' do (``TARGET_STATS``, ``SOURCE_STATS``,
  measured by ``data.layouts.class_frequencies``): the target follows the Cityscapes distribution, with a
  long tail of lights, signs, riders, trains, motorcycles and bicycles; the source has more
  sky, road, trucks and cars, fewer people and less vegetation, and its rare classes are as
  rare or rarer.

Scenes are drawn by the same ``scene.draw_scene`` as ``v1``, with objects larger than their
metric size (``OBJECT_SCALE``) and no blur, so that the small network of the demo can learn
every class from the target's own labels (the oracle row of the demo measures it).
"""

from __future__ import annotations

import dataclasses
import numpy as np

from cpsl_jax.synthetic.geometry import (BICYCLE, BUILDING, BUS, CAR, FENCE, HOOD, LIGHT, MARKING, MOTORCYCLE,
                                         PERSON, POLE, RIDER, ROAD, SIDEWALK, SIGN, SKIN, SKY, TERRAIN, TRAIN,
                                         TRUCK, TYRE, VEGETATION, WALL, WINDOW, Canvas, Rng)
from cpsl_jax.synthetic.scene import SceneStats
from cpsl_jax.synthetic.style import smooth_noise

OBJECT_SCALE = 3.0
# The class distribution of Cityscapes that the authors ship with their GTA5 -> Cityscapes
# checkpoints (``class_distribution.npy``, 19 train ids): what ``TARGET_STATS`` is designed after.
CITYSCAPES_DISTRIBUTION = (0.37922, 0.04930, 0.22665, 0.01551, 0.01721, 0.01403, 0.00219, 0.00221, 0.13338,
                           0.02424, 0.04341, 0.01315, 0.00161, 0.06605, 0.00408, 0.00279, 0.00185, 0.00123,
                           0.00191)
# A larger val split than v1's: the rare classes need enough pixels for a stable IoU.
DEFAULT_LENGTH = {('source', 'train'): 400, ('source', 'val'): 50,
                  ('target', 'train'): 300, ('target', 'val'): 100}
NUM_KEYS = 24  # 19 classes, then window, marking, tyre, skin, hood


@dataclasses.dataclass(frozen=True)
class Material:
    """How one class (or part) looks: one of ``colours`` per instance, jittered by ``spread``
    (grey levels, per channel), with smooth blotches, fine grain and horizontal stripes of the
    given amplitudes (grey levels)."""

    colours: tuple[tuple[int, int, int], ...]
    spread: float = 6.0
    blotch: float = 0.0
    grain: float = 0.0
    stripes: float = 0.0


def _m(*colours, **kw) -> Material:
    return Material(tuple(colours), **kw)


# Game-like: one flat colour a class (the v1 source palette).
SOURCE_MATERIALS: dict[int, Material] = {
    ROAD: _m((80, 80, 86)), SIDEWALK: _m((175, 162, 148)), BUILDING: _m((152, 108, 84)),
    WALL: _m((190, 178, 150)), FENCE: _m((125, 92, 62)), POLE: _m((105, 105, 112)),
    LIGHT: _m((45, 45, 38)), SIGN: _m((225, 190, 35)), VEGETATION: _m((55, 145, 40)),
    TERRAIN: _m((150, 175, 75)), SKY: _m((105, 165, 240)), PERSON: _m((175, 70, 65)),
    RIDER: _m((200, 95, 45)), CAR: _m((35, 70, 170)), TRUCK: _m((175, 175, 188)),
    BUS: _m((215, 125, 35)), TRAIN: _m((95, 120, 160)), MOTORCYCLE: _m((85, 40, 105)),
    BICYCLE: _m((150, 35, 45)), WINDOW: _m((55, 80, 115)), MARKING: _m((235, 235, 228)),
    TYRE: _m((25, 25, 25)), SKIN: _m((215, 170, 140)), HOOD: _m((30, 30, 34)),
}
# Photo-like: new materials per class; objects keep the source's colour as one of several.
TARGET_MATERIALS: dict[int, Material] = {
    ROAD: _m((96, 92, 90), spread=5, grain=6),
    SIDEWALK: _m((150, 150, 158), stripes=8, grain=3),
    BUILDING: _m((130, 130, 126), (152, 108, 84), spread=8, blotch=8),
    WALL: _m((200, 190, 165), spread=6, blotch=4),
    FENCE: _m((125, 92, 62), (90, 90, 96), spread=6, grain=4),
    POLE: _m((120, 120, 124)),
    LIGHT: _m((45, 45, 38)),
    SIGN: _m((225, 190, 35), (40, 95, 200)),
    VEGETATION: _m((62, 112, 48), spread=6, blotch=16, grain=6),
    TERRAIN: _m((160, 150, 85), spread=6, grain=8),
    SKY: _m((105, 165, 240), (196, 202, 210), spread=4),
    PERSON: _m((175, 70, 65), (60, 60, 72), (190, 190, 180), (70, 110, 160), spread=10),
    RIDER: _m((200, 95, 45), (60, 60, 72), (190, 190, 180), spread=10),
    CAR: _m((35, 70, 170), (220, 220, 220), (40, 40, 44), (170, 35, 35), (150, 150, 158), spread=8),
    TRUCK: _m((175, 175, 188), (230, 230, 222), (60, 90, 60), spread=8),
    BUS: _m((215, 125, 35), (200, 45, 45), spread=8),
    TRAIN: _m((95, 120, 160), (210, 210, 200), spread=8),
    MOTORCYCLE: _m((85, 40, 105), (35, 35, 38), spread=8),
    BICYCLE: _m((150, 35, 45), (40, 40, 44), (40, 110, 60), spread=8),
    WINDOW: _m((70, 85, 100), spread=6), MARKING: _m((220, 220, 210)), TYRE: _m((28, 28, 28)),
    SKIN: _m((215, 170, 140), (140, 100, 80)), HOOD: _m((30, 30, 34)),
}

# Expected object counts and layout probabilities, chosen so that the measured pixel
# frequencies follow the Cityscapes distribution in the target and a GTA5-like one in the
# source (``data.layouts.class_frequencies``; the demo prints both).
TARGET_STATS = SceneStats(
    cars=1.35, trucks=0.016, buses=0.022, train_p=0.04, persons=1.35, cyclists=0.03,
    motorcyclists=0.012, parked_bicycles=0.0, poles=2.4, trees=2.6, skyline_vegetation_p=0.78,
    side_terrain_p=0.95, side_vegetation_p=0.3, facade_p=0.95, wall_p=0.26, fence_p=0.33, ego_p=0.7,
    sign_p=0.11, light_p=0.055, rider_size=2.2, horizon=(0.3, 0.42), skyline=(0.12, 0.45))
SOURCE_STATS = SceneStats(
    cars=1.6, trucks=0.1, buses=0.02, train_p=0.035, persons=0.5, cyclists=0.006,
    motorcyclists=0.008, parked_bicycles=0.0, poles=2.0, trees=1.2, skyline_vegetation_p=0.4,
    side_terrain_p=0.8, side_vegetation_p=0.2, facade_p=0.8, wall_p=0.4, fence_p=0.15, ego_p=0.0,
    sign_p=0.07, light_p=0.035, rider_size=1.6, horizon=(0.34, 0.48), skyline=(0.06, 0.35))


def _tables(materials: dict[int, Material]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(colours (24, K, 3) with K alternatives, padded by repeating; counts (24,); spread (24,);
    texture amplitudes (24, 3): blotch, grain, stripes)."""
    k = max(len(m.colours) for m in materials.values())
    colours = np.zeros((NUM_KEYS, k, 3), np.float32)
    counts = np.zeros(NUM_KEYS, np.int64)
    spread = np.zeros(NUM_KEYS, np.float32)
    texture = np.zeros((NUM_KEYS, 3), np.float32)
    for key, m in materials.items():
        colours[key] = [m.colours[j % len(m.colours)] for j in range(k)]
        counts[key], spread[key] = len(m.colours), m.spread
        texture[key] = (m.blotch, m.grain, m.stripes)
    return colours, counts, spread, texture


_TABLES = {'source': _tables(SOURCE_MATERIALS), 'target': _tables(TARGET_MATERIALS)}


def render(cv: Canvas, domain: str, rng: Rng) -> np.ndarray:
    """The image of a drawn scene in ``domain``'s materials: (H, W, 3) uint8.

    Each instance draws one of its material's colours and a jitter; then the materials'
    textures, a per-image brightness (time of day), and for the target sensor noise.
    """
    colours, counts, spread, texture = _TABLES[domain]
    keys = np.asarray(cv.keys)
    n = len(keys)
    pick = (rng.random(n) * counts[keys]).astype(np.int64)
    inst_colour = colours[keys, pick] + spread[keys, None] * rng.standard_normal((n, 3), dtype=np.float32)
    img = inst_colour[cv.inst]
    tex = texture[keys][cv.inst]                                     # (h, w, 3)
    h, w = cv.inst.shape
    if tex.any():
        lum = tex[..., 0] * smooth_noise(h, w, 4, rng)[..., 0]
        lum += tex[..., 1] * rng.standard_normal((h, w), dtype=np.float32)
        lum += tex[..., 2] * np.sign(np.sin(np.arange(h, dtype=np.float32) * 1.3))[:, None]
        img += lum[..., None]
    img *= np.float32(rng.uniform(0.9, 1.1))
    if domain == 'target':
        img += 2.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)
