"""Dataset layouts on disk and the label maps of GTA5, SYNTHIA and Cityscapes.

One listing function per layout turns a dataset root into a sorted list of
``Pair(name, image, label)``; the folder readers (``readers.py``) and the TFDS
builders (``tfds_builders.py``) share these listings, so both see the same examples in
the same order.

Label maps: the kept dataset ids in train-id order (position = train id) for 19, 16 and
13 classes. Every id outside the map becomes the project ignore value 255 (the reference
uses 250). GTA5 labels use the Cityscapes label ids.

GTA5 split: the reference trains on **every** pair. Its loader hard-wires the split to
``'all'`` (the concatenation of ``trainIds``, ``valIds`` and ``testIds`` from
``split.mat``) and then numbers the files 1..N by position, which for the full release
(24,966 pairs) is every file. Here ``'train'`` and ``'all'`` both mean that set (the ids
listed in ``split.mat`` when it exists, otherwise every pair on disk); ``'val'`` and
``'test'`` select ``split.mat``'s ``valIds`` / ``testIds``.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Sequence

import numpy as np

log = logging.getLogger(__name__)

IGNORE_LABEL = 255

# Kept Cityscapes label ids (also GTA5's), position = train id.
CITYSCAPES_IDS: dict[int, tuple[int, ...]] = {
    19: (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33),
    16: (7, 8, 11, 12, 13, 17, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33),
    13: (7, 8, 11, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33),
}
# Kept SYNTHIA-RAND-CITYSCAPES ids (first channel of the 16-bit label PNGs).
SYNTHIA_IDS: dict[int, tuple[int, ...]] = {
    19: (3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11),
    16: (3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11),
    13: (3, 4, 2, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11),
}
# Every id a label file may legitimately hold (for the optional strict check).
KNOWN_IDS: dict[str, frozenset[int]] = {
    "gta5": frozenset(range(35)),
    "cityscapes": frozenset(range(35)),
    "synthia": frozenset(range(23)),
}

CLASS_NAMES_19: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light",
    "traffic_sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)
# Position of each 16 / 13-class train id among the 19 classes.
TO_19: dict[int, tuple[int, ...]] = {
    19: tuple(range(19)),
    16: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
    13: (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
}
# 19-class RGB palette of Cityscapes, in train-id order.
PALETTE_19 = np.array(
    [
        [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
        [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
        [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70],
        [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
    ],
    dtype=np.uint8,
)

# Default base size (W, H) each dataset is resized to on read (reference ``img_size``).
BASE_SIZE: dict[str, tuple[int, int]] = {
    "gta5": (2048, 1024),
    "cityscapes": (2048, 1024),
    "synthia": (1280, 760),
}


class Pair(NamedTuple):
    """One example on disk: stable ``name`` and the paths of its image and label."""

    name: str
    image: str
    label: str


def _check_num_classes(num_classes: int) -> None:
    if num_classes not in (19, 16, 13):
        raise ValueError(f"num_classes must be 19, 16 or 13, got {num_classes}")


def class_names(num_classes: int) -> tuple[str, ...]:
    """Class names in train-id order for 19, 16 or 13 classes."""
    _check_num_classes(num_classes)
    return tuple(CLASS_NAMES_19[i] for i in TO_19[num_classes])


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 Cityscapes colours in train-id order."""
    _check_num_classes(num_classes)
    return PALETTE_19[list(TO_19[num_classes])]


def class_frequencies(labels, num_classes: int = 19) -> np.ndarray:
    """Fraction of the labelled pixels of each class over an iterable of train-id label maps
    (ignore and other ids above the classes excluded): (C,) float64."""
    counts = np.zeros(num_classes, np.float64)
    for label in labels:
        label = np.asarray(label)
        counts += np.bincount(label[label < num_classes].ravel(), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1.0)


def kept_ids(dataset: str, num_classes: int) -> tuple[int, ...]:
    """Dataset label ids kept for ``num_classes``, position = train id."""
    _check_num_classes(num_classes)
    if dataset in ("gta5", "cityscapes"):
        return CITYSCAPES_IDS[num_classes]
    if dataset == "synthia":
        return SYNTHIA_IDS[num_classes]
    raise ValueError(f"unknown dataset {dataset!r}; expected 'gta5', 'synthia' or 'cityscapes'")


def label_lut(dataset: str, num_classes: int) -> np.ndarray:
    """(256,) uint8 table: dataset id -> train id, everything else -> 255.

    Decoding a label map is then one gather, ``lut[ids]`` (the reference loops over classes).
    """
    lut = np.full((256,), IGNORE_LABEL, np.uint8)
    ids = kept_ids(dataset, num_classes)
    lut[list(ids)] = np.arange(len(ids), dtype=np.uint8)
    return lut


# ----------------------------------------------------------------------------- listings


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}")


def _pngs(folder: str) -> dict[str, str]:
    """Stem -> path of every ``*.png`` directly inside ``folder``."""
    return {f[:-4]: os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png")}


def _pair_up(
    images: dict[str, str], labels: dict[str, str], names: Sequence[str], image_dir: str,
    label_dir: str, skip_missing: bool,
) -> list[Pair]:
    """Pairs for ``names``; a missing half raises (naming the file) or is skipped and logged."""
    pairs, skipped = [], []
    for name in names:
        image = images.get(name, os.path.join(image_dir, name + ".png"))
        label = labels.get(name, os.path.join(label_dir, name + ".png"))
        missing = [p for p, d in ((image, images), (label, labels)) if name not in d]
        if missing:
            if not skip_missing:
                raise FileNotFoundError(f"missing half of a pair: {missing[0]} does not exist")
            skipped.append(missing[0])
            continue
        pairs.append(Pair(name, image, label))
    if skipped:
        log.warning("skipped %d incomplete pairs, e.g. %s", len(skipped), skipped[0])
    return pairs


def list_gta5(root: str, split: str = "all", *, skip_missing: bool = False) -> list[Pair]:
    """GTA5: ``images/NNNNN.png`` + ``labels/NNNNN.png`` (+ optional ``split.mat``).

    split: 'all' or 'train' (every pair, as the reference trains), 'val', 'test'
    (``split.mat`` subsets). Names are the 5-digit stems, e.g. '00001'.
    """
    _require_dir(root, "GTA5 root")
    image_dir, label_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    _require_dir(image_dir, "GTA5 images")
    _require_dir(label_dir, "GTA5 labels")
    images, labels = _pngs(image_dir), _pngs(label_dir)
    mat_path = os.path.join(root, "split.mat")
    if os.path.exists(mat_path):
        import scipy.io  # only needed for this optional file

        try:
            mat = scipy.io.loadmat(mat_path)
        except Exception as e:  # scipy raises several types for a bad file
            raise ValueError(f"cannot read GTA5 split file {mat_path}: {e}") from e
        keys = {"all": ("trainIds", "valIds", "testIds"), "train": ("trainIds", "valIds", "testIds"),
                "val": ("valIds",), "test": ("testIds",)}
        if split not in keys:
            raise ValueError(f"unknown GTA5 split {split!r}; expected one of {sorted(keys)}")
        ids = np.concatenate([np.asarray(mat[k]).reshape(-1) for k in keys[split]])
        names = [f"{int(i):05d}" for i in sorted(set(ids.tolist()))]
    else:
        if split not in ("all", "train"):
            raise FileNotFoundError(f"GTA5 split {split!r} needs the split file {mat_path}")
        names = sorted(set(images) | set(labels))
    pairs = _pair_up(images, labels, names, image_dir, label_dir, skip_missing)
    if not pairs:
        raise FileNotFoundError(f"no GTA5 pairs found in {image_dir}")
    return pairs


def list_synthia(root: str, split: str = "all", *, skip_missing: bool = False) -> list[Pair]:
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/*.png`` + ``GT/LABELS/*.png`` (16-bit labels).

    split: 'all' or 'train' (the reference trains on all 9,400 pairs). Names are stems.
    """
    if split not in ("all", "train"):
        raise ValueError(f"unknown SYNTHIA split {split!r}; expected 'all' or 'train'")
    _require_dir(root, "SYNTHIA root")
    image_dir, label_dir = os.path.join(root, "RGB"), os.path.join(root, "GT", "LABELS")
    _require_dir(image_dir, "SYNTHIA RGB")
    _require_dir(label_dir, "SYNTHIA GT/LABELS")
    images, labels = _pngs(image_dir), _pngs(label_dir)
    pairs = _pair_up(images, labels, sorted(set(images) | set(labels)), image_dir, label_dir,
                     skip_missing)
    if not pairs:
        raise FileNotFoundError(f"no SYNTHIA pairs found in {image_dir}")
    return pairs


def list_cityscapes(root: str, split: str = "train", *, skip_missing: bool = False) -> list[Pair]:
    """Cityscapes: ``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` +
    ``gtFine/{split}/<city>/*_gtFine_labelIds.png``.

    Sorted by (city, name) like the reference's sorted path list. Names drop the suffix,
    e.g. 'aachen_000000_000019'.
    """
    _require_dir(root, "Cityscapes root")
    image_root = os.path.join(root, "leftImg8bit", split)
    label_root = os.path.join(root, "gtFine", split)
    _require_dir(image_root, "Cityscapes leftImg8bit/" + split)
    _require_dir(label_root, "Cityscapes gtFine/" + split)
    pairs, skipped = [], []
    for city in sorted(os.listdir(image_root)):
        city_dir = os.path.join(image_root, city)
        if not os.path.isdir(city_dir):
            continue
        for f in sorted(os.listdir(city_dir)):
            if not f.endswith("_leftImg8bit.png"):
                continue
            name = f[: -len("_leftImg8bit.png")]
            label = os.path.join(label_root, city, name + "_gtFine_labelIds.png")
            if not os.path.exists(label):
                if not skip_missing:
                    raise FileNotFoundError(f"missing half of a pair: {label} does not exist")
                skipped.append(label)
                continue
            pairs.append(Pair(name, os.path.join(city_dir, f), label))
    if skipped:
        log.warning("skipped %d Cityscapes images without labels, e.g. %s", len(skipped), skipped[0])
    if not pairs:
        raise FileNotFoundError(f"no Cityscapes images found in {image_root}")
    return pairs


LISTINGS = {"gta5": list_gta5, "synthia": list_synthia, "cityscapes": list_cityscapes}


def list_pairs(dataset: str, root: str, split: str, *, skip_missing: bool = False) -> list[Pair]:
    """Dispatch to the listing of ``dataset`` ('gta5', 'synthia' or 'cityscapes')."""
    if dataset not in LISTINGS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(LISTINGS)}")
    return LISTINGS[dataset](root, split, skip_missing=skip_missing)
