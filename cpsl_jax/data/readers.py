"""Random-access readers: a dataset folder (or prepared TFDS records) -> item dicts.

Every reader returns items ``{'image': uint8 (H, W, 3) RGB, 'label': uint8 (H, W) train
ids (255 = ignore), 'name': str}``. ``open_dataset`` picks the source: the folder reader
here, the records prepared by ``tfds_builders`` (imported only when asked for), or the
synthetic domains. Both the folder and the records go through one ``decode.PairDecoder``
on the file's bytes, so they give identical items.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import cv2
from PIL import Image

from cpsl_jax.data import layouts
from cpsl_jax.data.decode import PairDecoder

log = logging.getLogger(__name__)

DEFAULT = "default"  # sentinel: use the dataset's base size (layouts.BASE_SIZE)
SYNTHETIC = ("synthetic-source", "synthetic-target")


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"missing file {path}") from e


class FolderDataset:
    """Random-access source over a dataset folder (picklable, for grain workers).

    Items: ``{'image': (H, W, 3) uint8, 'label': (H, W) uint8 train ids, 'name': str}``.
    """

    def __init__(self, dataset: str, pairs: Sequence[layouts.Pair], num_classes: int,
                 base_size: tuple[int, int] | None, strict: bool = False):
        self.pairs = list(pairs)
        self.decoder = PairDecoder(dataset, num_classes, base_size, strict)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[int(index)]
        return self.decoder(_read_bytes(pair.image), _read_bytes(pair.label), pair.name,
                            pair.image, pair.label)

    def __repr__(self) -> str:
        return f"FolderDataset({self.decoder.dataset!r}, {len(self)} pairs)"

    def scan_sizes(self) -> list[str]:
        """Names of pairs whose image and label sizes differ (headers only), logged as a count."""
        bad = []
        for p in self.pairs:
            with Image.open(p.image) as im:
                image_size = im.size
            if self.decoder.dataset == "synthia":
                label_size = cv2.imread(p.label, cv2.IMREAD_UNCHANGED).shape[1::-1]
            else:
                with Image.open(p.label) as lb:
                    label_size = lb.size
            if image_size != label_size:
                bad.append(p.name)
        log.info("%s: %d of %d pairs have image and label of different sizes",
                 self.decoder.dataset, len(bad), len(self.pairs))
        return bad


def open_dataset(name: str, root: str | None, split: str, num_classes: int = 19, *,
                 base_size: tuple[int, int] | None | str = DEFAULT, strict: bool = False,
                 skip_missing: bool = False, tfds_dir: str | None = None, **kwargs: Any):
    """Random-access source of ``{'image', 'label', 'name'}`` items.

    name: 'gta5', 'synthia', 'cityscapes' (folder layouts of ``layouts.py`` under
    ``root``), or 'synthetic-source' / 'synthetic-target' (``cpsl_jax.synthetic``,
    ``kwargs`` passed on). base_size: (W, H), None (file size) or the dataset default
    (GTA5 / Cityscapes 2048x1024, SYNTHIA 1280x760). strict: raise on label ids outside
    the dataset's id set. tfds_dir: read the ArrayRecord examples prepared there by
    ``tfds_builders.prepare`` instead of the folder.
    """
    if name in SYNTHETIC:
        from cpsl_jax.synthetic import SyntheticDataset  # loaded only when asked for

        return SyntheticDataset(domain=name.split("-")[1], split=split, num_classes=num_classes,
                                **kwargs)
    if kwargs:
        raise TypeError(f"unexpected arguments for dataset {name!r}: {sorted(kwargs)}")
    if name not in layouts.LISTINGS:
        raise ValueError(f"unknown dataset {name!r}; expected one of "
                         f"{sorted(layouts.LISTINGS) + list(SYNTHETIC)}")
    if base_size == DEFAULT:
        base_size = layouts.BASE_SIZE[name]
    if tfds_dir is not None:
        from cpsl_jax.data import tfds_builders  # tfds imported only when asked for

        return tfds_builders.open_prepared(name, tfds_dir, split, num_classes,
                                           base_size=base_size, strict=strict)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder")
    pairs = layouts.list_pairs(name, os.fspath(root), split, skip_missing=skip_missing)
    log.info("%s %s: %d pairs under %s", name, split, len(pairs), root)
    return FolderDataset(name, pairs, num_classes, base_size, strict)
