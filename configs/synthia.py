"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, 16 classes (13-class mIoU* reported too).

    python -m cpsl_jax.main --config=configs/synthia.py:STAGE --workdir=runs/synthia/STAGE

Same stages and hyper-parameters as ``configs/gta5.py``; SYNTHIA images are read at
1280x760 and are not colour-transferred (the reference transfers GTA5 images only).
"""

from cpsl_jax import defaults

RUNS = "runs/synthia"


def get_config(arg: str = "stage1"):
    """``arg`` is ``STAGE`` or ``STAGE,RUNS`` (where earlier stages' outputs are)."""
    stage, _, runs = arg.partition(",")
    c = defaults.base()
    c.stage = stage
    c.model.num_classes = 16
    c.data.source, c.data.source_root = "synthia", "data/SYNTHIA"
    c.data.target, c.data.target_root = "cityscapes", "data/Cityscapes"
    c.data.source_base_size = (1280, 760)
    c.data.colour_transfer = False
    defaults.apply_stage(c, stage, runs or RUNS)
    return c
