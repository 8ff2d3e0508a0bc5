"""What both frameworks are given: the config, shrunk by the command line, and a random batch at its shapes."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cpsl_jax import defaults
from cpsl_jax.models.deeplab import output_size


def load_config(path: str, stage: str):
    """``get_config(stage)`` of a config file (``configs/gta5.py``)."""
    return defaults.load_config_file(path).get_config(stage)


def parse_wh(text: str) -> tuple[int, int]:
    """``'224x128'`` -> (224, 128): width x height, the order of the config's sizes."""
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def apply_overrides(config, *, batch: int | None = None, crop: str | None = None, target_size: str | None = None,
                    source_size: str | None = None, sets: Sequence[str] = ()) -> None:
    """Shrink a config for a benchmark: batch, crop (WxH), base sizes (WxH), then ``key=value`` pairs.

    A new target base size also sets the source base size (unless given) and scales
    ``data.rescale_base_width`` with it, so the weak view keeps the paper's rescale ratio.
    """
    d = config.data
    if batch:
        d.batch_size = int(batch)
    if crop:
        d.crop_size = parse_wh(crop)
    if target_size:
        w, h = parse_wh(target_size)
        d.rescale_base_width = int(round(d.rescale_base_width * w / d.target_base_size[0]))
        d.target_base_size = (w, h)
        if not source_size:
            d.source_base_size = (w, h)
    if source_size:
        d.source_base_size = parse_wh(source_size)
    for item in sets:
        key, _, text = item.partition("=")
        defaults.set_key(config, key.strip(), text.strip())


def random_batch(config, rng: np.random.Generator) -> dict:
    """A host batch at the config's shapes: uint8 images at base size, labels, pseudo labels, Lab stats."""
    b = config.data.batch_size
    c = config.model.num_classes
    sw, sh = config.data.source_base_size
    tw, th = config.data.target_base_size
    soft = rng.random((b, c, output_size(th), output_size(tw)), dtype=np.float32)
    return {"source": {"image": rng.integers(0, 256, (b, sh, sw, 3), dtype=np.uint8),
                       "label": rng.integers(0, c, (b, sh, sw)).astype(np.uint8),
                       "target_lab": np.tile(np.array([[50.0, 0.0, 0.0], [20.0, 10.0, 10.0]], np.float32), (b, 1, 1))},
            "target": {"image": rng.integers(0, 256, (b, th, tw, 3), dtype=np.uint8),
                       "soft_label": (soft / soft.sum(1, keepdims=True)).astype(np.float16),
                       "pseudo_label": rng.integers(0, c, (b, th, tw)).astype(np.uint8)}}
