"""The config schema: every key a run may set, with the paper's values as defaults.

Each file in ``configs/`` starts from ``base()`` and changes what its task and stage need.
Keys not defined here are rejected when a config is loaded or overridden
(``--config.cpsl.temprature=...`` fails before anything compiles), so a typo cannot be
silently ignored. Values follow the reference's commands and parser defaults; the
warm-up's are the parser's defaults, since no warm-up command is published.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import ml_collections as mlc

STAGES = ("warmup", "stage1", "stage2", "stage3", "self_training", "eval", "lab_stats", "soft_labels", "hard_labels",
          "prototypes", "class_distribution")
# The stages that train a model (``cpsl_jax.train.loop``); the others are tools over a model.
TRAINING_STAGES = ("warmup", "stage1", "stage2", "stage3", "self_training")


def base() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.stage = "stage1"
    c.seed = 0

    # -- network ------------------------------------------------------------------------------
    c.model = mlc.ConfigDict()
    c.model.num_classes = 19
    c.model.depth = 101            # 50, 101, or 14 (one block per stage: tests and the demo)
    c.model.width = 64             # base width of the ResNet (64 in the paper)
    c.model.head_width = 256       # feature dimension of the ASPP head (256 in the paper)
    c.model.bn_pretrain = False    # BatchNorm on the backbone output (stages 2/3, SimCLR backbone)
    c.model.dtype = "float32"      # compute dtype: 'float32' or 'bfloat16' (params and norms stay float32)
    c.model.remat = False          # rematerialise each bottleneck block in the backward pass
    c.model.dropout_rate = 0.1
    # Dilated convolutions: 'auto' = 'space_to_batch' on GPUs (same result; XLA's native lowering
    # there is 3x slower for a training pass, benchmarks/RESULTS.md), 'native' elsewhere.
    c.model.dilated_impl = "auto"

    # -- initialisation -----------------------------------------------------------------------
    c.init = mlc.ConfigDict()
    c.init.checkpoint = ""         # reference .pkl / bare ResNet state dict / this project's checkpoint dir
    c.init.backbone_only = False   # load only the backbone from init.checkpoint (ImageNet / SimCLR weights)
    c.init.teacher = ""            # stages 2/3: the frozen teacher; stage 1: defaults to init.checkpoint
    c.init.prototypes = ""         # stage 1: initial prototypes (.npy, C x 256) from the prototypes tool
    c.init.class_distribution = ""  # stage 1: Sinkhorn prior (.npy, C values) from the class-distribution tool

    # -- data ---------------------------------------------------------------------------------
    c.data = mlc.ConfigDict()
    c.data.source = "gta5"         # 'gta5', 'synthia', 'synthetic-source'
    c.data.source_root = ""
    c.data.target = "cityscapes"   # 'cityscapes', 'synthetic-target'
    c.data.target_root = ""
    c.data.source_base_size = (2048, 1024)   # (W, H) after reading; SYNTHIA: (1280, 760)
    c.data.target_base_size = (2048, 1024)
    c.data.crop_size = (896, 512)  # (W, H) of the weak view
    c.data.rescale_base_width = 2200        # w = int(U(0.5, 1.5) * 2200)
    c.data.rescale_range = (0.5, 1.5)
    c.data.batch_size = 4          # global batch, over all devices and hosts
    c.data.eval_batch_size = 4
    c.data.worker_count = 4        # grain worker processes per host (0: in the main process)
    c.data.colour_transfer = True  # CIELAB transfer of source images toward target images (GTA5 runs)
    c.data.pseudo_labels = ""      # pseudo-label store directory (soft for stage 1, hard for 2/3)
    # soft_labels: write the ground truth's class fractions on the output grid instead of the
    # model's softmax (a diagnostic: stage 1 with perfect pseudo labels; needs target labels)
    c.data.soft_labels_from_ground_truth = False
    c.data.lab_stats = ""          # precomputed target Lab means/stds (.npy, N x 2 x 3)
    c.data.confidence_threshold = 0.95
    # The strong view of the target crop (stage-1 consistency, stage 2/3 target loss): the
    # reference's RandAugment ops (magnitudes 1..max_magnitude, each applied with op_prob),
    # Gaussian blur, colour jitter (factors 1 +- ``jitter``, hue shift within +- ``hue``) and the
    # cutout (``augment.sample_strong``).
    c.data.strong = mlc.ConfigDict({"ops": 2, "max_magnitude": 9, "op_prob": 0.5, "blur_prob": 0.5,
                                    "jitter": 0.4, "hue": 0.4, "jitter_prob": 0.5, "cutout": True})
    # The built-in synthetic domains ('synthetic-source' / 'synthetic-target'): seed, image size
    # (H, W), the number of images per split (0: the module's defaults), the size of people,
    # two-wheelers, poles, signs, lights, walls and fences relative to their metric size
    # (``cpsl_jax.synthetic.draw_scene``), how far the target's class colours move from the source's
    # (``synthetic.target_palette``), the target's exposure and the scale of its per-class
    # textures (``synthetic.render_target``), and the domain pair: 'v1' (those global shifts) or
    # 'v2' (per-class materials and a long tail, ``cpsl_jax/synthetic/v2.py``).
    c.data.synthetic = mlc.ConfigDict({"seed": 0, "size": (128, 256), "length": 0, "object_scale": 1.0,
                                       "domain_shift": 0.35, "exposure": 1.0,
                                       "texture": 1.0, "version": "v1"})

    # -- optimisation -------------------------------------------------------------------------
    c.optim = mlc.ConfigDict()
    c.optim.base_lr = 1e-4
    c.optim.momentum = 0.9
    c.optim.weight_decay = 2e-4
    c.optim.power = 0.9
    c.optim.max_steps = 90_000     # polynomial decay horizon; training stops there
    c.optim.lr_mult = mlc.ConfigDict({"backbone": 1.0, "head": 5.0, "prototypes": 5.0, "bn_pretrain": 10.0})
    c.optim.repeated_updates = True  # quirk: each backbone tensor updated 3-4 times per step
    c.optim.disc_lr = 1e-4         # warm-up discriminator, Adam
    c.optim.disc_betas = (0.9, 0.99)

    # -- CPSL (stage 1) -----------------------------------------------------------------------
    c.cpsl = mlc.ConfigDict()
    c.cpsl.temperature = 0.08
    c.cpsl.epsilon = 0.05
    c.cpsl.sinkhorn_iterations = 3
    c.cpsl.samples_per_image = 256
    c.cpsl.queue_size = 65_536
    c.cpsl.sl_weight = 0.1
    c.cpsl.consistency_weight = 5.0
    c.cpsl.contrastive_weight = 1e-3
    c.cpsl.rce = True
    c.cpsl.rce_alpha = 0.1
    c.cpsl.rce_beta = 1.0
    c.cpsl.rectify_threshold = 0.0
    c.cpsl.rectify = True          # ablation switch: prototype rectification of the soft pseudo labels
    c.cpsl.class_balanced = True   # ablation switch: False uses a uniform Sinkhorn prior
    # prototypes tool: an image contributes to a class's initial prototype when at least this
    # many of its output pixels (129x257 at the paper's size) are predicted as the class
    c.cpsl.prototype_min_pixels = 10
    c.cpsl.teacher_ema = 0.999
    c.cpsl.prototype_ema = 0.999
    c.cpsl.cutmix_prob = 0.5
    c.cpsl.teacher_train_mode = True  # quirk: the EMA teacher runs with batch statistics and dropout
    # True: only the (mixed) weak target pass moves the student's running BatchNorm statistics,
    # which evaluation normalises with; the reference (False) moves them in all three passes
    # (source, mixed weak target, strong view), a blend of source and distorted-target statistics
    c.cpsl.target_running_stats = False
    c.cpsl.batched_sinkhorn = False   # paper intent: one Sinkhorn over the whole batch
    c.cpsl.queue_unnormalised_prototypes = True  # quirk: queue rows scored against un-normalised P
    c.cpsl.anchor_label_quirk = True  # quirk: contrastive anchor labels read at 65x113 indices of 129x257
    c.cpsl.queue_label_quirk = True   # quirk: labels pushed with the queue = top row of the label map
    c.cpsl.translate_quirk = True     # quirk: translate-x of maps normalised by the height

    # -- distillation (stages 2/3) ------------------------------------------------------------
    c.kd = mlc.ConfigDict()
    c.kd.weight = 1.0
    c.kd.quirk = True              # quirk: KL against probabilities, not log-probabilities
    c.kd.rce = False
    # True: only the target pass moves the student's running BatchNorm statistics (as
    # cpsl.target_running_stats in stage 1); the reference (False) moves them in both passes
    c.kd.target_running_stats = False

    # -- the self-training baseline (``train.steps.self_training_step``) ------------------------
    # Hard argmax pseudo labels of the warm-up (stage ``hard_labels_warmup``), pixels at or below
    # ``data.confidence_threshold`` ignored; True: only the target pass moves the running
    # BatchNorm statistics (as ``cpsl.target_running_stats``)
    c.self_training = mlc.ConfigDict()
    c.self_training.target_running_stats = False

    # -- adversarial warm-up ------------------------------------------------------------------
    c.adv = mlc.ConfigDict()
    c.adv.weight = 0.01

    # -- loop ---------------------------------------------------------------------------------
    c.train = mlc.ConfigDict()
    c.train.steps = 90_000
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.nonfinite_skip = 0     # non-finite loss: skip up to this many steps in a row, then stop
    c.train.parallel = "shard_map"  # or 'pmap'
    # The student's passes of a step (2 in the warm-up and stages 2/3, 3 in stage 1) as one
    # lax.scan: the same result, the network compiled once instead of once per pass. Measured on
    # an H200 at the paper's shapes it compiles stage 1 in 69 s instead of 101 s, but runs
    # 35% slower and needs 62 instead of 22 GiB (benchmarks/RESULTS.md): off by default.
    c.train.scan_passes = False

    c.eval = mlc.ConfigDict()
    c.eval.flip = False
    c.eval.max_images = 0          # 0: the whole split
    c.eval.save_predictions = 4    # coloured predictions written for this many images
    c.eval.target_statistics = False  # eval: BatchNorm statistics re-estimated on target train images (AdaBN)
    return c


class ConfigError(ValueError):
    """A config names an unknown key, a bad value or a missing path."""


def load_config_file(path: str | Path) -> ModuleType:
    """A config file (``configs/gta5.py``) as a module: its ``get_config`` and constants."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"cpsl_config_{path.stem}_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config")
    return module


def leaves(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a ConfigDict or a nested dict."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, (mlc.ConfigDict, dict)):
            yield from leaves(value, f"{name}.")
        else:
            yield name, value


def unknown_key_message(dotted: str, config: mlc.ConfigDict, where: str | None = None) -> str:
    """``unknown config key 'a.b' in <where>; closest: ...; a holds: ...`` (one line)."""
    section, _, leaf = dotted.rpartition(".")
    node = config_node(config, section)
    close: list[str] = []
    if isinstance(node, mlc.ConfigDict):  # first the keys of its own section whose last part is alike
        prefix = f"{section}." if section else ""
        close = [f"{prefix}{k}" for k in difflib.get_close_matches(leaf, list(node), n=3, cutoff=0.4)]
    keys = [k for k, _ in leaves(config)]
    close += [k for k in difflib.get_close_matches(dotted, keys, n=3, cutoff=0.6) if k not in close]
    msg = f"unknown config key {dotted!r}" + (f" in {where}" if where else "")
    msg += f"; closest: {', '.join(close[:3])}" if close else ""
    if section and isinstance(node, mlc.ConfigDict):
        msg += f"; {section} holds: {', '.join(node)}"
    elif not section or node is None:
        msg += f"; sections: {', '.join(k for k, v in config.items() if isinstance(v, mlc.ConfigDict))}"
    return msg


def config_node(config: mlc.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split(".") if dotted else []:
        if not isinstance(node, mlc.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def set_key(config: mlc.ConfigDict, dotted: str, value: Any) -> None:
    """``config.a.b = value`` for ``dotted='a.b'``; an unknown key fails, naming it.

    A string value given for a key that holds another type is read as that type: numbers,
    ``true``/``false``, and tuples as comma-separated items (``224,128`` or ``(224, 128)``).
    """
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents + [leaf]:
        if not isinstance(node, mlc.ConfigDict) or part not in node:
            raise ConfigError(unknown_key_message(dotted, config))
        if part != leaf:
            node = node[part]
    old = node[leaf]
    if isinstance(value, str) and not isinstance(old, str):
        try:
            if isinstance(old, tuple):
                items = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
                value = tuple(type(old[0])(v) for v in items) if old else tuple(items)
            elif isinstance(old, bool):
                value = bool(json.loads(value.lower()))
            elif old is not None:
                value = type(old)(value)
        except ValueError as err:
            raise ConfigError(f"config key {dotted!r}: cannot read {value!r} as {type(old).__name__}") from err
    node[leaf] = value


def unknown_keys(config: mlc.ConfigDict, schema: mlc.ConfigDict | None = None, prefix: str = "") -> list[str]:
    """Dotted names of keys in ``config`` that the schema (``base()``) does not define.

    """
    schema = base() if schema is None else schema
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in schema:
            out.append(name)
        elif isinstance(value, mlc.ConfigDict) and isinstance(schema[key], mlc.ConfigDict):
            out.extend(unknown_keys(value, schema[key], prefix=f"{name}."))
    return out


def apply_stage(c, stage: str, runs: str) -> None:
    """The values a pipeline stage changes, artifacts chained under ``runs`` (paper configs)."""
    art = f"{runs}/artifacts"
    if stage == "warmup":
        c.init.checkpoint = "pretrained/resnet101_imagenet.pth"   # torchvision ImageNet weights
        c.init.backbone_only = True
        c.optim.base_lr = 1e-4
        c.optim.lr_mult.head = 10.0
        c.cpsl.rce = False
    elif stage in ("soft_labels", "prototypes", "class_distribution"):
        c.init.checkpoint = f"{runs}/warmup/model.msgpack"
        c.data.pseudo_labels = f"{art}/soft"
        c.init.prototypes = f"{art}/prototypes.npy"          # written by 'prototypes'
        c.init.class_distribution = f"{art}/class_distribution.npy"  # written by 'class_distribution'
    elif stage == "lab_stats":
        pass  # writes data.lab_stats
    elif stage == "stage1":
        c.init.checkpoint = f"{runs}/warmup/model.msgpack"
        c.data.pseudo_labels = f"{art}/soft"
        c.init.prototypes = f"{art}/prototypes.npy"
        c.init.class_distribution = f"{art}/class_distribution.npy"
        c.optim.base_lr = 1e-4
        c.optim.lr_mult.head = 5.0
        c.optim.lr_mult.prototypes = 5.0
        c.cpsl.rce = True
    elif stage == "hard_labels_warmup":  # from the warm-up model, for the self-training baseline
        c.stage = "hard_labels"
        c.init.checkpoint = f"{runs}/warmup/model.msgpack"
        c.data.pseudo_labels = f"{art}/hard_warmup"
    elif stage == "self_training":  # the baseline: stage 1's learning rates, no CPSL term
        c.init.checkpoint = f"{runs}/warmup/model.msgpack"
        c.data.pseudo_labels = f"{art}/hard_warmup"
        c.optim.base_lr = 1e-4
        c.optim.lr_mult.head = 5.0
    elif stage == "hard_labels":  # from the stage-1 model, for stage 2
        c.init.checkpoint = f"{runs}/stage1/best_model.msgpack"
        c.data.pseudo_labels = f"{art}/hard_stage1"
    elif stage == "hard_labels_stage2":  # from the stage-2 model, for stage 3
        c.stage = "hard_labels"
        c.init.checkpoint = f"{runs}/stage2/best_model.msgpack"
        c.data.pseudo_labels = f"{art}/hard_stage2"
        c.model.bn_pretrain = True
    elif stage in ("stage2", "stage3"):
        first = stage == "stage2"
        # Stage 2: SimCLR-v2 ResNet-101 backbone; stage 3 continues from the stage-2 weights.
        c.init.checkpoint = "pretrained/simclr_r101.pth" if first else f"{runs}/stage2/best_model.msgpack"
        c.init.backbone_only = first
        c.init.teacher = f"{runs}/stage1/best_model.msgpack" if first else f"{runs}/stage2/best_model.msgpack"
        c.data.pseudo_labels = f"{art}/hard_stage1" if first else f"{art}/hard_stage2"
        c.model.bn_pretrain = True
        c.optim.base_lr = 6e-4
        c.optim.lr_mult.head = 10.0
        c.optim.lr_mult.bn_pretrain = 10.0
        c.kd.rce = False
    elif stage == "eval":
        c.init.checkpoint = f"{runs}/stage3/best_model.msgpack"
        c.model.bn_pretrain = True
    else:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {STAGES}")
