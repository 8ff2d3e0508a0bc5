"""Datasets, pseudo labels and input pipelines.

``open_dataset`` gives random-access sources of ``{'image', 'label', 'name'}`` items;
``pipeline`` (grain) batches them per host; ``tfds_builders`` prepares ArrayRecord copies;
``pseudo_labels`` stores the target pseudo labels by image name.
"""

from cpsl_jax.data.layouts import IGNORE_LABEL, class_names, label_lut, palette
from cpsl_jax.data.pseudo_labels import PseudoLabelStore
from cpsl_jax.data.readers import FolderDataset, open_dataset

__all__ = ["IGNORE_LABEL", "FolderDataset", "PseudoLabelStore", "class_names", "label_lut",
           "open_dataset", "palette"]
