"""Directory store of target pseudo labels, keyed by image name.

Two kinds, each file written atomically (temp file + rename) so several writer processes
can fill one store:

* soft: ``<name>.soft.npy``, (C, h, w) class probabilities (the warm-up model's softmax at
  output resolution, C x 129 x 257 for a 1024x2048 image; the shape is the writer's).
  Stored as **float16**: the reference keeps float32 ``.npy`` (about 7.5 GB for Cityscapes
  train); float16 halves that, with an absolute error below 1e-3 on probabilities in
  [0, 1] (float16 spacing is at most 2**-11 there).
* hard: ``<name>.png`` (uint8 argmax label at full resolution) and ``<name>_conf.npy``
  (float16 confidence, same size). At load time pixels whose confidence is not above the
  threshold (0.95, compared in float16 as the reference's float16 array against 0.95,
  i.e. about 0.9502) become 255.
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np
from PIL import Image

IGNORE_LABEL = 255
DEFAULT_THRESHOLD = 0.95
# np.load parses each file's header with ast.literal_eval, and CPython 3.11/3.12's AST
# constructor is not safe to run in several threads at once (python/cpython#106905: a
# spurious "SystemError: AST constructor recursion depth mismatch"). The data loader reads
# pseudo labels from a thread pool, so the reads here take turns; a file of soft labels is
# read in about a millisecond.
_NPY_LOCK = threading.Lock()


def _load_npy(path: str) -> np.ndarray:
    with _NPY_LOCK:
        return np.load(path)


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def threshold_hard(label: np.ndarray, conf: np.ndarray,
                   threshold: float | None = DEFAULT_THRESHOLD) -> np.ndarray:
    """Pixels with ``conf <= float16(threshold)`` -> 255 (None: no masking).

    Compared in float16 like the reference (its float16 array against a Python 0.95).
    """
    if threshold is None:
        return label
    keep = np.asarray(conf, np.float16) > np.float16(threshold)
    return np.where(keep, label, np.uint8(IGNORE_LABEL)).astype(np.uint8)


class PseudoLabelStore:
    """Reader and writer of pseudo labels under one directory (picklable: holds the path)."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = os.fspath(path)
        if create:
            os.makedirs(self.path, exist_ok=True)
        elif not os.path.isdir(self.path):
            raise FileNotFoundError(f"pseudo-label store not found: {self.path}")

    def __repr__(self) -> str:
        return f"PseudoLabelStore({self.path!r})"

    def _file(self, name: str, suffix: str) -> str:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"invalid image name {name!r} for pseudo-label store {self.path}")
        return os.path.join(self.path, name + suffix)

    def _missing(self, name: str, path: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"no pseudo label for image {name!r} in store {self.path} (missing {os.path.basename(path)})")

    # -- soft
    def write_soft(self, name: str, probs: np.ndarray) -> None:
        """Store (C, h, w) probabilities as float16."""
        probs = np.asarray(probs)
        if probs.ndim != 3:
            raise ValueError(f"soft label for {name!r} must be (C, h, w), got {probs.shape}")
        arr = probs.astype(np.float16)
        _atomic_write(self._file(name, ".soft.npy"), lambda f: np.save(f, arr))

    def read_soft(self, name: str) -> np.ndarray:
        """(C, h, w) float16 probabilities of image ``name``."""
        path = self._file(name, ".soft.npy")
        if not os.path.exists(path):
            raise self._missing(name, path)
        return _load_npy(path)

    # -- hard
    def write_hard(self, name: str, label: np.ndarray, conf: np.ndarray) -> None:
        """Store an (H, W) uint8 label as PNG and its (H, W) confidence as float16."""
        label, conf = np.asarray(label), np.asarray(conf)
        if label.ndim != 2 or label.shape != conf.shape:
            raise ValueError(f"hard label {label.shape} and confidence {conf.shape} of {name!r} "
                             "must both be (H, W)")
        if label.dtype != np.uint8:
            if label.min() < 0 or label.max() > 255:
                raise ValueError(f"hard label of {name!r} does not fit uint8")
            label = label.astype(np.uint8)
        conf16 = conf.astype(np.float16)
        _atomic_write(self._file(name, ".png"), lambda f: Image.fromarray(label).save(f, "PNG"))
        _atomic_write(self._file(name, "_conf.npy"), lambda f: np.save(f, conf16))

    def read_hard(self, name: str, threshold: float | None = DEFAULT_THRESHOLD
                  ) -> tuple[np.ndarray, np.ndarray]:
        """((H, W) uint8 label thresholded, (H, W) float16 confidence) of image ``name``."""
        label_path, conf_path = self._file(name, ".png"), self._file(name, "_conf.npy")
        for p in (label_path, conf_path):
            if not os.path.exists(p):
                raise self._missing(name, p)
        with Image.open(label_path) as im:
            label = np.asarray(im)
        conf = _load_npy(conf_path)
        if label.shape != conf.shape:
            raise ValueError(f"pseudo label {label_path} {label.shape} and confidence {conf_path} "
                             f"{conf.shape} differ in size")
        return threshold_hard(label, conf, threshold), conf

    def names(self, kind: str = "soft") -> list[str]:
        """Sorted image names stored with ``kind`` 'soft' or 'hard'."""
        suffix = {"soft": ".soft.npy", "hard": "_conf.npy"}[kind]
        return sorted(f[: -len(suffix)] for f in os.listdir(self.path)
                      if f.endswith(suffix) and not f.startswith("."))
