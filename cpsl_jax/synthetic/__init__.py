"""A built-in synthetic domain-shift benchmark: rendered-looking source, photo-like target.

Street scenes are drawn procedurally with the 19 Cityscapes classes, and the label map is
exactly what was drawn. Two domains share the geometry and differ like GTA5 and Cityscapes:

* ``source``: flat per-class colours with a small per-instance jitter, clean edges, more
  cars, fewer people and less vegetation.
* ``target``: shifted per-class palette, per-class textures, white balance / contrast /
  saturation change, lighting gradient and vignetting, slight blur, sensor noise, an
  ego-vehicle hood (ignore label) and different class frequencies.

One concern a module: ``geometry`` (classes, instance canvas, ground plane), ``scene`` (what
a domain draws and where), ``style`` (how each domain looks), ``dataset`` (random access by
index, the published folder layouts, the command line ``python -m cpsl_jax.synthetic``).
"""

from cpsl_jax.synthetic.dataset import (DEFAULT_LENGTH, DOMAINS, SPLITS, SyntheticDataset, main,
                                        train_to_label_ids, write_layout)
from cpsl_jax.synthetic.geometry import CLASS_NAMES, IGNORE, LABEL_IDS
from cpsl_jax.synthetic.scene import SOURCE_STATS, TARGET_STATS, SceneStats, draw_scene
from cpsl_jax.synthetic.style import DEFAULT_DOMAIN_SHIFT, render_source, render_target, target_palette

__all__ = ["CLASS_NAMES", "DEFAULT_DOMAIN_SHIFT", "DEFAULT_LENGTH", "DOMAINS", "IGNORE", "LABEL_IDS", "SOURCE_STATS",
           "SPLITS", "TARGET_STATS", "SceneStats", "SyntheticDataset", "draw_scene", "main", "render_source",
           "render_target", "target_palette", "train_to_label_ids", "write_layout"]
