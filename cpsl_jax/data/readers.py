"""Random-access readers: a dataset folder (or prepared TFDS records) -> item dicts.

Every reader returns items ``{'image': uint8 (H, W, 3) RGB, 'label': uint8 (H, W) train
ids (255 = ignore), 'name': str}``. Images are resized to the dataset's base size on read
as in the reference (PIL bilinear, which antialiases when shrinking; labels PIL nearest).
Decoding works on the file's bytes, so the folder reader and the TFDS reader (which
stores those bytes) share one code path and give identical items.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image

from cpsl_jax.data import layouts

log = logging.getLogger(__name__)

DEFAULT = "default"  # sentinel: use the dataset's base size (layouts.BASE_SIZE)
SYNTHETIC = ("synthetic-source", "synthetic-target")


def decode_image(data: bytes, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8 RGB; errors name ``where`` (file or record)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError for bad files
        raise ValueError(f"unreadable or truncated image {where}: {e}") from e


def decode_label_ids(data: bytes, dataset: str, where: str) -> np.ndarray:
    """Label bytes -> (H, W) dataset ids (uint8, or uint16 for SYNTHIA).

    SYNTHIA labels are 16-bit multi-channel PNGs that PIL misreads: OpenCV reads them
    unchanged (BGR order), and the class id is the first RGB channel, i.e. channel 2.
    """
    if dataset == "synthia":
        ids = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if ids is None:
            raise ValueError(f"unreadable or truncated label {where}")
        return ids[..., 2] if ids.ndim == 3 else ids
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(f"expected a single-channel id map, got PIL mode {im.mode}")
            return np.asarray(im)
    except Exception as e:
        raise ValueError(f"unreadable or truncated label {where}: {e}") from e


def map_label(ids: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Dataset ids -> uint8 train ids with the 256-entry table (ids > 255 -> 255)."""
    if ids.dtype != np.uint8:
        ids = np.minimum(ids, 255).astype(np.uint8)
    return lut[ids]


def check_known_ids(ids: np.ndarray, dataset: str, where: str) -> None:
    """Raise (naming ``where``) if ``ids`` holds ids outside the dataset's id set."""
    known = np.zeros((65536,), bool)
    known[list(layouts.KNOWN_IDS[dataset])] = True
    bad = ~known[ids.astype(np.int64)]
    if bad.any():
        raise ValueError(f"label {where} holds unknown ids {np.unique(ids[bad]).tolist()[:10]}")


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[1], size[0], 3), PIL bilinear (antialiased when shrinking)."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(tuple(size), Image.BILINEAR))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 -> (size[1], size[0]), PIL nearest."""
    if (label.shape[1], label.shape[0]) == tuple(size):
        return label
    return np.asarray(Image.fromarray(label).resize(tuple(size), Image.NEAREST))


class PairDecoder:
    """Bytes of one pair -> item dict: decode, map ids, resize to the base size.

    ``base_size`` (W, H) or None (keep the image's size; a label of another size is then
    resized onto the image). A pair whose image and label sizes differ (some GTA5 pairs)
    is resized independently, as the reference does, and logged with a running count.
    """

    def __init__(self, dataset: str, num_classes: int, base_size: tuple[int, int] | None,
                 strict: bool = False):
        self.dataset = dataset
        self.num_classes = num_classes
        self.base_size = None if base_size is None else (int(base_size[0]), int(base_size[1]))
        self.strict = strict
        self.lut = layouts.label_lut(dataset, num_classes)
        self.mismatched = 0

    def __call__(self, image_bytes: bytes, label_bytes: bytes, name: str,
                 image_where: str, label_where: str) -> dict[str, Any]:
        image = decode_image(image_bytes, image_where)
        ids = decode_label_ids(label_bytes, self.dataset, label_where)
        if self.strict:
            check_known_ids(ids, self.dataset, label_where)
        # Nearest resizing commutes with the id -> train-id table, so map first (uint8).
        label = map_label(ids, self.lut)
        if image.shape[:2] != label.shape:
            self.mismatched += 1
            log.warning(
                "%s pair %s: image %dx%d and label %dx%d differ in size; each resized "
                "independently (%d such pairs read so far by this reader)", self.dataset, name,
                image.shape[1], image.shape[0], label.shape[1], label.shape[0], self.mismatched)
        size = self.base_size or (image.shape[1], image.shape[0])
        return {"image": resize_image(image, size), "label": resize_label(label, size),
                "name": name}


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
    ``root``), or 'synthetic-source' / 'synthetic-target' (``cpsl_jax.data.synthetic``,
    ``kwargs`` passed on). base_size: (W, H), None (file size) or the dataset default
    (GTA5 / Cityscapes 2048x1024, SYNTHIA 1280x760). strict: raise on label ids outside
    the dataset's id set. tfds_dir: read the ArrayRecord examples prepared there by
    ``tfds_builders.prepare`` instead of the folder.
    """
    if name in SYNTHETIC:
        from cpsl_jax.data.synthetic import SyntheticDataset  # optional module, loaded lazily

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
