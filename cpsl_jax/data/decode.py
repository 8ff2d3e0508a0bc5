"""One pair's file bytes -> item dict: decode, map dataset ids to train ids, resize.

Shared by the folder reader (``readers.py``) and the prepared TFDS records
(``tfds_builders.py``), which store the original file bytes, so both give identical
items ``{'image': uint8 (H, W, 3) RGB, 'label': uint8 (H, W) train ids (255 = ignore),
'name': str}``. Images are resized as in the reference: PIL bilinear (antialiased when
shrinking), labels PIL nearest.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import cv2
import numpy as np
from PIL import Image

from cpsl_jax.data import layouts

log = logging.getLogger(__name__)


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
