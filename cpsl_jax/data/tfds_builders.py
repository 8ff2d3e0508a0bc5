"""TFDS builders (manual download, ArrayRecord) for GTA5, SYNTHIA and Cityscapes.

Each builder lists the manual directory with the same function as the folder reader
(``layouts.py``) and writes one record per pair holding the **original file bytes** of the
image and of the label plus the name; decoding, the id -> train-id map and the resize to
the base size happen at read time through the same ``decode.PairDecoder`` as the folder
reader, so one prepared dataset serves 19, 16 and 13 classes and any base size, and its
items equal the folder reader's.

Works without TensorFlow (tfds 4.9.10): ``tfds.features.Image`` needs TensorFlow to encode,
so the bytes are stored as scalar ``tfds.features.Tensor(dtype=np.object_)`` features, which
serialise and deserialise through tfds' NumPy path. ``dataset_info_from_configs`` reads
package metadata files that these in-module builders lack, hence a plain
``tfds.core.DatasetInfo``. Records keep the listing order (``disable_shuffling=True``), so
index i is the folder reader's index i. tfds 4.9.10 also imports ``importlib_resources``
(not among its installed dependencies) to locate a builder's source file; the builders
override ``code_path`` instead of requiring that package.

Use: ``prepare('cityscapes', root, data_dir)`` once, then
``open_dataset('cityscapes', None, 'val', 19, tfds_dir=data_dir)``.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cpsl_jax.data import layouts
from cpsl_jax.data.decode import PairDecoder

_SPLITS = {"gta5": ("train",), "synthia": ("train",), "cityscapes": ("train", "val")}


class _LayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared body: one record {'name', 'image' bytes, 'label' bytes} per listed pair."""

    DATASET = ""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original PNG bytes of image and label, listing order."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at the dataset root in its original layout (GTA5: images/, labels/, "
        "optional split.mat; SYNTHIA-RAND-CITYSCAPES: RGB/, GT/LABELS/; Cityscapes: "
        "leftImg8bit/, gtFine/).")
    # Decode every pair while preparing, so a truncated file fails here, naming the file.
    VERIFY = True

    # tfds' own ``code_path`` touches ``importlib_resources`` (a dependency tfds 4.9.10 does
    # not install) for builders inside a package; the builder file is simply this module.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.DATASET} pairs as stored on disk (PNG bytes).",
            features=tfds.features.FeaturesDict({
                "name": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "label": tfds.features.Tensor(shape=(), dtype=np.object_),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        root = os.fspath(dl_manager.manual_dir)
        return {s: self._generate_examples(root, s) for s in _SPLITS[self.DATASET]}

    def _generate_examples(self, root: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        decoder = PairDecoder(self.DATASET, 19, base_size=None)
        for pair in layouts.list_pairs(self.DATASET, root, split):
            image, label = _read(pair.image), _read(pair.label)
            if self.VERIFY:
                decoder(image, label, pair.name, pair.image, pair.label)
            yield pair.name, {"name": pair.name, "image": image, "label": label}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class CpslGta5(_LayoutBuilder):
    """GTA5 (all pairs, the reference's training set) as split 'train'."""

    name = "cpsl_gta5"
    DATASET = "gta5"


class CpslSynthia(_LayoutBuilder):
    """SYNTHIA-RAND-CITYSCAPES (all pairs) as split 'train'."""

    name = "cpsl_synthia"
    DATASET = "synthia"


class CpslCityscapes(_LayoutBuilder):
    """Cityscapes fine annotations, splits 'train' and 'val'."""

    name = "cpsl_cityscapes"
    DATASET = "cityscapes"


BUILDERS = {"gta5": CpslGta5, "synthia": CpslSynthia, "cityscapes": CpslCityscapes}


def _builder(dataset: str, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
    if dataset not in BUILDERS:
        raise ValueError(f"no TFDS builder for {dataset!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[dataset](data_dir=os.fspath(data_dir), file_format="array_record")


def prepare(dataset: str, root: str, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
    """Write the ArrayRecord files of ``dataset`` (folder layout under ``root``) to ``data_dir``."""
    layouts.list_pairs(dataset, os.fspath(root), _SPLITS[dataset][0])  # clear error before tfds
    builder = _builder(dataset, data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(root)))
    return builder


class TfdsDataset:
    """Random-access source over prepared records with the folder reader's item contract.

    The tfds data source is opened lazily in each process (it is not pickled), so the
    object can be handed to grain's worker processes.
    """

    def __init__(self, dataset: str, data_dir: str, split: str, num_classes: int,
                 base_size: tuple[int, int] | None, strict: bool = False):
        self.dataset, self.data_dir, self.split = dataset, os.fspath(data_dir), split
        self.decoder = PairDecoder(dataset, num_classes, base_size, strict)
        self._source = None
        self._len = len(self._records())

    def _records(self):
        if self._source is None:
            builder = _builder(self.dataset, self.data_dir)
            if not builder.is_prepared():
                raise FileNotFoundError(
                    f"{self.dataset} is not prepared under {self.data_dir} "
                    f"(expected {builder.data_dir}); run tfds_builders.prepare first")
            if self.split not in builder.info.splits:
                raise ValueError(f"split {self.split!r} not in prepared {builder.data_dir}")
            self._source = builder.as_data_source(split=self.split)
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._records()[int(index)]
        name = rec["name"].decode() if isinstance(rec["name"], bytes) else str(rec["name"])
        where = f"record {name!r} of {self.data_dir}/{BUILDERS[self.dataset].name} [{self.split}]"
        return self.decoder(rec["image"], rec["label"], name, "image of " + where,
                            "label of " + where)


def open_prepared(dataset: str, data_dir: str, split: str, num_classes: int, *,
                  base_size: tuple[int, int] | None, strict: bool = False) -> TfdsDataset:
    """Items ``{'image', 'label', 'name'}`` read back from prepared ArrayRecord files."""
    return TfdsDataset(dataset, data_dir, split, num_classes, base_size, strict)
