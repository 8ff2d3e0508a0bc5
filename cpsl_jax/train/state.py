"""One TrainState for every stage, and how it is built from a config.

Everything the method updates lives in one ``flax.struct`` dataclass; what does not change
(modules, optimisers, config) stays outside and is bound to the step functions with
``functools.partial``. Fields a stage does not use are ``None`` (no arrays, no memory).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import struct

from cpsl_jax import cpsl, models
from cpsl_jax.train import optim

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@struct.dataclass
class TrainState:
    """Arrays that change during training.

    Attributes:
      step: () int32, completed optimiser steps.
      rng: PRNG key of the run; a step uses ``fold_in(rng, step)``.
      params: trainable pytree ``{'model': ..., ['prototypes': (C, D)]}``.
      batch_stats: the student's BatchNorm running statistics.
      opt_state: optimiser state over ``params``.
      teacher: ``{'params', 'batch_stats'}`` of the EMA teacher (stage 1) or the frozen
        teacher (stages 2/3); None in the warm-up.
      prototypes_ema: (C, D) EMA of the prototypes (stage 1).
      feature_queue, output_queue: the self-labeling / contrastive queues (stage 1).
      class_prior: (C,) Sinkhorn prior (stage 1).
      disc_params, disc_opt_state: the warm-up's discriminator and its Adam state.
      nonfinite_streak, nonfinite_worst: () int32, steps refused in a row for a non-finite
        loss, and the longest such run (``cpsl_jax.train.guards``).
    """

    step: jnp.ndarray
    rng: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    teacher: Optional[Any] = None
    prototypes_ema: Optional[jnp.ndarray] = None
    feature_queue: Optional[cpsl.Queue] = None
    output_queue: Optional[cpsl.Queue] = None
    class_prior: Optional[jnp.ndarray] = None
    disc_params: Optional[Any] = None
    disc_opt_state: Optional[Any] = None
    nonfinite_streak: Optional[jnp.ndarray] = None
    nonfinite_worst: Optional[jnp.ndarray] = None


def build_model(config: mlc.ConfigDict, *, axis_name: str | None = "data", bn_pretrain: bool | None = None,
                dtype: str | None = None) -> models.DeepLabV2:
    """The segmenter a config describes (BatchNorm synchronised over ``axis_name``)."""
    m = config.model
    dilated = m.dilated_impl
    if dilated == "auto":
        dilated = "space_to_batch" if jax.default_backend() == "gpu" else "native"
    return models.DeepLabV2(
        num_classes=m.num_classes, depth=m.depth, width=m.width, head_width=m.head_width,
        bn_pretrain=m.bn_pretrain if bn_pretrain is None else bn_pretrain,
        dtype=DTYPES[dtype or m.dtype], axis_name=axis_name, remat=m.remat, dropout_rate=m.dropout_rate,
        dilated_impl=dilated)


def trainable_labels(params: Any) -> Any:
    """Optimiser group of every trainable leaf: the model's groups, and 'prototypes'."""
    labels = {"model": models.param_labels(params["model"])}
    if "prototypes" in params:
        labels["prototypes"] = "prototypes"
    return labels


def trainable_multiplicity(params: Any) -> Any:
    """How often the reference's SGD lists each trainable tensor (its repeated-update quirk)."""
    mult = {"model": models.backbone_multiplicity(params["model"])}
    if "prototypes" in params:
        mult["prototypes"] = 1
    return mult


def make_optimizer(config: mlc.ConfigDict) -> optax.GradientTransformation:
    """SGD with the reference's per-group learning rates, poly decay and repeated updates."""
    o = config.optim
    return optim.make_optimizer(
        dict(lr=o.base_lr, max_steps=o.max_steps, power=o.power, momentum=o.momentum,
             weight_decay=o.weight_decay, lr_multipliers=dict(o.lr_mult), repeated_updates=o.repeated_updates),
        labels=trainable_labels, multiplicity=trainable_multiplicity)


def make_discriminator_optimizer(config: mlc.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    return optim.make_discriminator_optimizer(dict(lr=o.disc_lr, max_steps=o.max_steps, power=o.power,
                                                   b1=o.disc_betas[0], b2=o.disc_betas[1]))


def create_state(
    config: mlc.ConfigDict,
    variables: dict,
    tx: optax.GradientTransformation,
    *,
    rng: jax.Array,
    teacher: dict | None = None,
    prototypes: jnp.ndarray | None = None,
    class_prior: jnp.ndarray | None = None,
    discriminator: dict | None = None,
    disc_tx: optax.GradientTransformation | None = None,
) -> TrainState:
    """A fresh state for the stage in ``config.stage`` from loaded or initialised variables.

    Stage 1 needs ``prototypes`` (C, D) and ``class_prior`` (C,) and takes ``teacher``
    (default: a copy of the student, the EMA teacher's starting point); stages 2/3 need
    the frozen ``teacher``; the warm-up needs ``discriminator`` variables and ``disc_tx``.
    """
    stage = config.stage
    # Own copies: the state is donated to the step, and one buffer may not be donated twice.
    copy = lambda tree: None if tree is None else jax.tree.map(jnp.array, tree)  # noqa: E731
    variables, teacher = copy(dict(variables)), copy(teacher)
    params = {"model": variables["params"]}
    fields: dict[str, Any] = {}
    if stage == "stage1":
        if prototypes is None or class_prior is None:
            raise ValueError("stage1 needs initial prototypes (init.prototypes) and a class prior "
                             "(init.class_distribution)")
        prototypes = jnp.asarray(prototypes, jnp.float32)
        params["prototypes"] = prototypes
        c = config.cpsl
        dim = prototypes.shape[1]
        fields.update(
            teacher=teacher if teacher is not None else copy(variables),
            prototypes_ema=jnp.array(prototypes),
            feature_queue=cpsl.init_queue(c.queue_size, dim, with_labels=True),
            output_queue=cpsl.init_queue(c.queue_size, config.model.num_classes),
            class_prior=jnp.asarray(class_prior, jnp.float32) if c.class_balanced
            else jnp.full((config.model.num_classes,), 1.0 / config.model.num_classes, jnp.float32),
        )
    elif stage in ("stage2", "stage3"):
        if teacher is None:
            raise ValueError(f"{stage} needs a frozen teacher (init.teacher)")
        fields["teacher"] = teacher
    elif stage == "warmup":
        if discriminator is None or disc_tx is None:
            raise ValueError("warmup needs discriminator variables and its optimiser")
        fields.update(disc_params=discriminator["params"], disc_opt_state=disc_tx.init(discriminator["params"]))
    return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      nonfinite_streak=jnp.zeros((), jnp.int32), nonfinite_worst=jnp.zeros((), jnp.int32), **fields)
