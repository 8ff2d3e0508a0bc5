"""GTA5 -> Cityscapes, 19 classes: every stage of the paper, with its hyper-parameters.

    python -m cpsl_jax.main --config=configs/gta5.py:STAGE --workdir=runs/gta5/STAGE

STAGE, in pipeline order: lab_stats, warmup, soft_labels, prototypes, class_distribution, stage1,
hard_labels, stage2, hard_labels_stage2, stage3, eval (of the stage-3 model; point
``--config.init.checkpoint`` at any other model, e.g. a published ``.pkl``). The plain
self-training baseline: hard_labels_warmup, then self_training (from the warm-up).
Dataset roots and the artifacts of earlier stages are the paths below; override them with
``--config.data.source_root=...`` etc. The warm-up's values are the reference parser's
defaults: no warm-up command is published (the authors ship the warm-up checkpoint).
"""

from cpsl_jax import defaults

RUNS = "runs/gta5"


def get_config(arg: str = "stage1"):
    """``arg`` is ``STAGE`` or ``STAGE,RUNS`` (where earlier stages' outputs are)."""
    stage, _, runs = arg.partition(",")
    c = defaults.base()
    c.stage = stage
    c.data.source, c.data.source_root = "gta5", "data/GTA5"
    c.data.target, c.data.target_root = "cityscapes", "data/Cityscapes"
    c.data.source_base_size = (2048, 1024)
    c.data.lab_stats = f"{runs or RUNS}/artifacts/cityscapes_lab_stats.npy"
    defaults.apply_stage(c, stage, runs or RUNS)
    return c
