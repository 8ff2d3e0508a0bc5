"""The synthetic domains as datasets: random access by index, and writers of the published layouts.

Item ``i`` is generated from ``numpy.random.SeedSequence([seed, domain, split, i])`` only,
so it never depends on other items. :func:`write_layout` writes items in the published
Cityscapes / GTA5 folder layouts with real label ids; ``python -m cpsl_jax.synthetic`` is the
command-line front end (:func:`main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image

from cpsl_jax.data import layouts
from cpsl_jax.synthetic import v2
from cpsl_jax.synthetic.geometry import IGNORE, LABEL_IDS, Rng
from cpsl_jax.synthetic.scene import SOURCE_STATS, TARGET_STATS, SceneStats, draw_scene
from cpsl_jax.synthetic.style import DEFAULT_DOMAIN_SHIFT, render_source, render_target, target_palette

VERSIONS = ('v1', 'v2')

DOMAINS = ('source', 'target')
SPLITS = ('train', 'val')
DEFAULT_LENGTH = {('source', 'train'): 400, ('source', 'val'): 50,
                  ('target', 'train'): 200, ('target', 'val'): 50}


def _subset_table(num_classes: int) -> np.ndarray:
    """Train id (19 classes, 255) -> train id of the ``num_classes`` protocol (or 255)."""
    if num_classes not in LABEL_IDS:
        raise ValueError(f'num_classes must be one of {sorted(LABEL_IDS)}, got {num_classes}')
    table = np.full(256, IGNORE, np.uint8)
    table[list(layouts.TO_19[num_classes])] = np.arange(num_classes, dtype=np.uint8)
    return table


def _stats_for(domain: str, num_classes: int, version: str = 'v1') -> SceneStats:
    if version == 'v2':
        stats = v2.SOURCE_STATS if domain == 'source' else v2.TARGET_STATS
    else:
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
                 domain_shift: float = DEFAULT_DOMAIN_SHIFT, exposure: float = 1.0, texture: float = 1.0,
                 version: str = 'v1'):
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        if version == 'v2':
            v1_knobs = {'domain_shift': (domain_shift, DEFAULT_DOMAIN_SHIFT), 'exposure': (exposure, 1.0),
                        'texture': (texture, 1.0)}
            changed = sorted(k for k, (value, default) in v1_knobs.items() if value != default)
            if changed:
                raise ValueError(f"{', '.join(changed)} shape the v1 target only; synthetic-v2 keeps them at "
                                 f"their defaults (its shifts are the materials of cpsl_jax/synthetic/v2.py)")
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
        self.version = version
        self.object_scale = float(object_scale)
        self.domain_shift = float(domain_shift)
        self.exposure = float(exposure)
        self.texture = float(texture)
        self._palette = target_palette(domain_shift) if domain == 'target' else None
        self.domain, self.split, self.seed = domain, split, int(seed)
        self.num_classes = num_classes
        self.size = (int(size[0]), int(size[1]))
        lengths = v2.DEFAULT_LENGTH if version == 'v2' else DEFAULT_LENGTH
        self.length = lengths[(domain, split)] if length is None else int(length)
        self._table = _subset_table(num_classes)
        self._stats = _stats_for(domain, num_classes, version)
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
                + (f", texture={self.texture}" if self.domain == 'target' and self.texture != 1.0 else "")
                + (f", version={self.version!r}" if self.version != 'v1' else "") + ")")

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
        if self.version == 'v2':
            image = v2.render(cv, self.domain, rng)
        elif self.domain == 'source':
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
    p = argparse.ArgumentParser(prog='python -m cpsl_jax.synthetic', description=__doc__.splitlines()[0])
    p.add_argument('--out', required=True, help='root folder of the written layout')
    p.add_argument('--layout', choices=('cityscapes', 'gta5'), required=True)
    p.add_argument('--domain', choices=DOMAINS, required=True)
    p.add_argument('--splits', nargs='+', choices=SPLITS, default=None,
                   help="default: train and val for cityscapes, train for gta5")
    p.add_argument('--num', type=int, default=None, help='items per split (default per split)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--size', type=int, nargs=2, default=(128, 256), metavar=('H', 'W'))
    p.add_argument('--num-classes', type=int, default=19, choices=sorted(LABEL_IDS))
    p.add_argument('--version', choices=VERSIONS, default='v1',
                   help='the domain pair: v1 (global photometric shift) or v2 (per-class materials, long tail)')
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
                              args.num, args.object_scale, args.domain_shift, args.exposure, args.texture,
                              args.version)
        write_layout(ds, args.out, args.layout, split)
        print(f'wrote {len(ds)} {args.domain}/{split} items to {args.out} ({args.layout})')


if __name__ == '__main__':
    main()