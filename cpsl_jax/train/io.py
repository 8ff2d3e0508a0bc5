"""Reading datasets and weights for a run, and writing the trained model, as a config says."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import serialization

from cpsl_jax import convert, models
from cpsl_jax.data import open_dataset
from cpsl_jax.train import state as state_lib

log = logging.getLogger(__name__)
MODEL_SUFFIX = ".msgpack"


def open_split(config: mlc.ConfigDict, domain: str, split: str):
    """The source or target dataset of ``config.data`` for ``split``, at its base size."""
    d = config.data
    name, root, base = ((d.source, d.source_root, d.source_base_size) if domain == "source"
                        else (d.target, d.target_root, d.target_base_size))
    if name.startswith("synthetic-"):
        syn = d.synthetic
        return open_dataset(name, None, split, config.model.num_classes, seed=syn.seed, size=tuple(syn.size),
                            length=syn.length or None, object_scale=syn.object_scale,
                            domain_shift=syn.domain_shift, exposure=syn.exposure,
                            texture=syn.texture, version=syn.version)
    if not root:
        raise ValueError(f"config key data.{domain}_root is empty: where is the {name} dataset?")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data.{domain}_root: {root} is not a folder")
    return open_dataset(name, root, split, config.model.num_classes, base_size=tuple(base))


def init_variables(config: mlc.ConfigDict, rng: jax.Array, *, bn_pretrain: bool | None = None) -> dict:
    """Fresh variables of the configured network (the reference's initialisation)."""
    return models.init_variables(state_lib.build_model(config, axis_name=None, bn_pretrain=bn_pretrain), rng)


def init_discriminator(config: mlc.ConfigDict, rng: jax.Array) -> dict:
    c = config.model.num_classes
    return dict(jax.jit(models.Discriminator().init)(rng, jnp.zeros((1, 32, 32, c), jnp.float32)))


def load_variables(config: mlc.ConfigDict, path: str, *, backbone_only: bool = False,
                   bn_pretrain: bool | None = None) -> dict[str, Any]:
    """Variables (and prototypes, discriminator) from ``path``, or a fresh init when ``path`` is empty.

    ``path`` is this project's ``.msgpack`` model file, a reference checkpoint (``.pkl``), or
    a bare ResNet state dict (ImageNet / SimCLR weights: backbone only, fresh head).
    Returns ``{'variables', 'prototypes', 'discriminator'}``.
    """
    m = config.model
    bn = m.bn_pretrain if bn_pretrain is None else bn_pretrain
    model = state_lib.build_model(config, axis_name=None, bn_pretrain=bn)
    if not path:
        return {"variables": models.init_variables(model, jax.random.PRNGKey(config.seed)),
                "prototypes": None, "discriminator": None}
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(MODEL_SUFFIX):
        loaded = serialization.msgpack_restore(Path(path).read_bytes())
        loaded = {"variables": loaded["variables"], "prototypes": loaded.get("prototypes"),
                  "discriminator": loaded.get("discriminator")}
    else:
        loaded = convert.load_torch_checkpoint(path, num_classes=m.num_classes, bn_pretrain=bn, depth=m.depth,
                                               width=m.width, head_width=m.head_width)
        if loaded["missing"]:
            log.info("%s: %d tensors not in the file keep their fresh initialisation (e.g. %s)", path,
                     len(loaded["missing"]), loaded["missing"][0])
        if loaded["unexpected"]:
            log.warning("%s: %d tensors of the file are not used (e.g. %s)", path, len(loaded["unexpected"]),
                        loaded["unexpected"][0])
    variables = loaded["variables"]
    if backbone_only:
        variables = _with_fresh_head(variables, models.init_variables(model, jax.random.PRNGKey(config.seed)))
    _check_structure(variables, models.variable_shapes(model), path)
    return {**loaded, "variables": jax.tree.map(jnp.asarray, variables)}


def _with_fresh_head(variables: dict, fresh: dict) -> dict:
    out = {col: dict(variables.get(col, {})) for col in fresh}
    for col in fresh:
        for key in ("layer5", "bn_pretrain"):
            if key in fresh[col]:
                out[col][key] = fresh[col][key]
    return out


def _check_structure(variables: dict, expected: dict, path: str) -> None:
    want = jax.tree.map(lambda x: tuple(x.shape), expected)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), {k: variables.get(k, {}) for k in expected})
    if want != got:
        raise ValueError(f"{path}: the weights do not fit the configured network (model.depth/width/head_width/"
                         f"num_classes/bn_pretrain); compare the config with the file")


def save_model(path: str | Path, state: state_lib.TrainState, config: mlc.ConfigDict) -> None:
    """The student (and EMA prototypes, discriminator) as a ``.msgpack`` model file, on process 0."""
    if jax.process_index() != 0:
        return
    payload = {"variables": {"params": state.params["model"], "batch_stats": state.batch_stats}}
    if state.prototypes_ema is not None:
        payload["prototypes"] = state.prototypes_ema
    if state.disc_params is not None:
        payload["discriminator"] = {"params": state.disc_params}
    payload = jax.device_get(payload)
    Path(path).write_bytes(serialization.msgpack_serialize(payload))
