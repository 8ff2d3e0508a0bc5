"""A tiny network on small synthetic images: every stage runs in seconds on a CPU (tests).

    python -m cpsl_jax.main --config=configs/tiny.py:warmup,RUNS --workdir=RUNS/warmup

with the stages of ``configs/gta5.py`` in the same order, artifacts chained under RUNS
(default ``runs/tiny``).

Same code paths as the paper's configs, scaled down consistently: 64x128 images, 32x64
crops, a depth-14 ResNet of width 8 with a 32-wide head, 16 sampled pixels per image
(no more than the 5x9 output pixels of a crop and the 9x17 of a full image), a queue of
64 rows that fills within the first iteration at batch 4.
"""

from cpsl_jax import defaults


def get_config(arg: str = "stage1"):
    stage, _, runs = arg.partition(",")
    c = defaults.base()
    c.stage = stage
    defaults.apply_stage(c, stage, runs or "runs/tiny")
    c.init.backbone_only = False
    if stage == "warmup":
        c.init.checkpoint = ""  # from scratch: no ImageNet weights for the tiny network
    c.model.bn_pretrain = False  # no SimCLR backbone either
    if stage == "stage2":
        c.init.checkpoint = ""
    c.model.depth, c.model.width, c.model.head_width = 14, 8, 32
    c.data.source, c.data.target = "synthetic-source", "synthetic-target"
    c.data.synthetic.size = (64, 128)
    c.data.synthetic.length = 8
    c.data.source_base_size = c.data.target_base_size = (128, 64)
    c.data.crop_size = (64, 32)
    c.data.rescale_base_width = 137      # 2200 / 2048 of the base width, as the paper's
    c.data.batch_size = c.data.eval_batch_size = 4
    c.data.worker_count = 0
    c.data.colour_transfer = False
    c.cpsl.samples_per_image = 16
    c.cpsl.queue_size = 64
    c.optim.max_steps = 1000
    c.train.steps = 3
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.checkpoint_every = 2
    c.eval.save_predictions = 2
    return c
