"""Optimisers: the reference's SGD (with its repeated backbone update) and the discriminator's Adam.

The reference trains the segmentation network with ``torch.optim.SGD`` (momentum 0.9, coupled
weight decay 2e-4, no Nesterov, dampening 0) and a "poly" learning rate
``lr_t = base * (1 - t / max_steps) ** 0.9`` with ``t`` the number of completed steps, scaled per
parameter group (stage 1: backbone 1x, head and prototypes 5x; stages 2/3: backbone 1x, head and
``bn_pretrain`` 10x).

Reference quirk (repeated update): the backbone's parameter list is built by walking every
sub-module and yielding its parameters recursively, so a backbone tensor is listed ``k`` times
(1 for the stem, 3 inside residual blocks, 4 inside projection shortcuts). PyTorch's per-tensor SGD
loop (``foreach=False``) then applies ``k`` full SGD-momentum updates per step with the same
gradient ``g``; for copy ``j = 1..k``::

    d   = g + wd * p            # weight decay on the already-updated weight
    buf = d                     # first step: each copy starts its own buffer (the last one persists)
    buf = momentum * buf + d    # later steps: one buffer shared by the copies, advanced per copy
    p   = p - lr * buf

:func:`sgd` reproduces this by default (``repeated_updates=True``); ``repeated_updates=False`` gives
the plain single update of the paper's intent (equal to ``k = 1`` everywhere).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
ScalarOrSchedule = Union[float, optax.Schedule]
TreeOrFn = Union[PyTree, Callable[[PyTree], PyTree]]

# Defaults of the reference (stage 1); every value can be overridden from the config.
DEFAULT_SGD = dict(
    lr=1e-4,
    max_steps=90_000,
    power=0.9,
    momentum=0.9,
    weight_decay=2e-4,
    lr_multipliers={'backbone': 1.0, 'head': 5.0, 'prototypes': 5.0, 'bn_pretrain': 10.0},
    repeated_updates=True,
)
DEFAULT_ADAM = dict(lr=1e-4, max_steps=90_000, power=0.9, b1=0.9, b2=0.99, eps=1e-8)


def make_schedule(base_lr: float, max_steps: int = 90_000, power: float = 0.9) -> optax.Schedule:
    """Poly learning rate ``base * (1 - t / max_steps) ** power``, ``t`` = completed steps.

    Clipped at ``max_steps`` (lr 0); the reference's formula is undefined past it and training
    stops there.
    """
    if max_steps <= 0:
        raise ValueError(f'optimizer config: max_steps must be positive, got {max_steps}')
    poly = optax.polynomial_schedule(
        init_value=base_lr, end_value=0.0, power=power, transition_steps=max_steps)
    # The count is cast to the default float first, so that with x64 enabled the lr is computed
    # in float64 like the reference's Python floats (an int32 count would make it float32).
    return lambda count: poly(jnp.asarray(count, jnp.result_type(float)))


class RepeatedSGDState(NamedTuple):
    """State of :func:`sgd`: completed steps and one momentum buffer per parameter."""
    count: jnp.ndarray  # int32 scalar
    momentum: PyTree


def _resolve(tree_or_fn: Optional[TreeOrFn], params: PyTree, default: Any, name: str) -> PyTree:
    """Per-leaf static values (labels, multiplicities, lr scales) for ``params``."""
    if tree_or_fn is None:
        return jax.tree.map(lambda _: default, params)
    tree = tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn
    want = jax.tree.structure(params)
    got = jax.tree.structure(tree)
    if want != got:
        raise ValueError(f'optimizer: the {name} pytree does not match the parameters: '
                         f'expected {want}, got {got}')
    return tree


def _leaf_update(g: jnp.ndarray, p: jnp.ndarray, buf: jnp.ndarray, first: jnp.ndarray,
                 lr: jnp.ndarray, k: int, momentum: float, weight_decay: float):
    """``k`` sequential torch SGD-momentum updates of one tensor; returns (new_p, new_buf)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f'optimizer: multiplicity must be a positive int, got {k!r}')
    g = g.astype(p.dtype)
    lr = lr.astype(p.dtype)
    new_p = p
    for _ in range(int(k)):  # k <= 4, static: unrolled copies of one tensor
        d = g + weight_decay * new_p if weight_decay else g
        if momentum:
            # First step: torch clones d into a fresh buffer per copy (the last copy's persists).
            buf = jnp.where(first, d, momentum * buf + d)
            step = buf
        else:
            step = d
        new_p = new_p - lr * step
    return new_p, buf


def sgd(
    learning_rate: ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 2e-4,
    lr_scale: Optional[TreeOrFn] = None,
    multiplicity: Optional[TreeOrFn] = None,
    repeated_updates: bool = True,
) -> optax.GradientTransformation:
    """PyTorch ``SGD(foreach=False)`` with per-leaf lr scales and the reference's repeated update.

    Args:
      learning_rate: base lr or schedule of the completed-step count.
      momentum: heavy-ball momentum (dampening 0, no Nesterov), torch convention
        ``buf = momentum * buf + d``, ``p -= lr * buf`` (the buffer carries no lr).
      weight_decay: coupled L2 decay added to the gradient before momentum.
      lr_scale: pytree (or function of params) of per-leaf lr multipliers; default 1.
      multiplicity: pytree (or function of params) of ints ``k`` (times the tensor is listed in
        the reference's SGD group); default 1. Ignored when ``repeated_updates`` is False.
      repeated_updates: reproduce the reference's ``k`` updates per step (quirk, default) or
        apply one update per tensor (paper intent).

    Returns:
      A transformation whose ``update`` needs ``params`` and returns ``new_params - params``
      (``optax.apply_updates`` then gives the new parameters up to one rounding).
    """
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init_fn(params):
        buf = jax.tree.map(jnp.zeros_like, params)
        return RepeatedSGDState(count=jnp.zeros([], jnp.int32), momentum=buf)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError('optimizer: sgd needs params in update (repeated weight decay)')
        scale = _resolve(lr_scale, params, 1.0, 'lr_scale')
        mult = _resolve(multiplicity if repeated_updates else None, params, 1, 'multiplicity')
        lr = jnp.asarray(schedule(state.count))
        first = state.count == 0
        out = jax.tree.map(
            lambda g, p, b, s, k: _leaf_update(g, p, b, first, lr * s, k, momentum, weight_decay),
            updates, params, state.momentum, scale, mult)
        new_params, new_buf = jax.tree.transpose(
            jax.tree.structure(params), jax.tree.structure((0, 0)), out)
        new_updates = jax.tree.map(lambda n, p: n - p, new_params, params)
        count = optax.safe_int32_increment(state.count)
        return new_updates, RepeatedSGDState(count=count, momentum=new_buf)

    return optax.GradientTransformation(init_fn, update_fn)


def lr_scale_from_labels(labels: TreeOrFn, multipliers: Mapping[str, float]) -> TreeOrFn:
    """Map a labels pytree (or ``labels_fn``) to a pytree of lr multipliers by group name."""

    def from_tree(tree):
        def one(label):
            if label not in multipliers:
                raise ValueError(f'optimizer config: lr_multipliers has no entry for parameter '
                                 f'group {label!r} (known: {sorted(multipliers)})')
            return float(multipliers[label])
        return jax.tree.map(one, tree)

    if callable(labels):
        return lambda params: from_tree(labels(params))
    return from_tree(labels)


def _read_config(config: Optional[Mapping[str, Any]], defaults: dict, overrides: dict,
                 what: str) -> dict:
    cfg = dict(defaults)
    given = {}
    if config is not None:
        given.update(config.to_dict() if hasattr(config, 'to_dict') else dict(config))
    given.update(overrides)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f'{what} config: unknown keys {unknown} (known: {sorted(defaults)})')
    cfg.update(given)
    return cfg


def make_optimizer(
    config: Optional[Mapping[str, Any]] = None,
    labels: Optional[TreeOrFn] = None,
    multiplicity: Optional[TreeOrFn] = None,
    **overrides: Any,
) -> optax.GradientTransformation:
    """The segmentation network's optimiser from a config (dict / ConfigDict) or keywords.

    Keys (defaults = the reference's stage 1): ``lr`` (base lr), ``max_steps``, ``power``,
    ``momentum``, ``weight_decay``, ``lr_multipliers`` (group name -> multiplier, e.g. stages 2/3:
    ``{'backbone': 1, 'head': 10, 'bn_pretrain': 10}``), ``repeated_updates``.

    Args:
      labels: pytree of group names per parameter leaf ('backbone' | 'head' | 'bn_pretrain' |
        'prototypes'), or ``labels_fn(params)``; None = every leaf at the base lr.
      multiplicity: pytree of ints (or a function of params): times each tensor is listed in the
        reference's SGD group; None = 1 everywhere.
    """
    cfg = _read_config(config, DEFAULT_SGD, overrides, 'optimizer')
    schedule = make_schedule(float(cfg['lr']), int(cfg['max_steps']), float(cfg['power']))
    mults = dict(cfg['lr_multipliers'])
    scale = None if labels is None else lr_scale_from_labels(labels, mults)
    return sgd(schedule, momentum=float(cfg['momentum']), weight_decay=float(cfg['weight_decay']),
               lr_scale=scale, multiplicity=multiplicity,
               repeated_updates=bool(cfg['repeated_updates']))


def make_discriminator_optimizer(config: Optional[Mapping[str, Any]] = None,
                                 **overrides: Any) -> optax.GradientTransformation:
    """Adam of the warm-up's discriminator: lr 1e-4 with the poly decay, betas (0.9, 0.99).

    ``optax.adam`` equals ``torch.optim.Adam`` (eps 1e-8 added to the bias-corrected
    ``sqrt(v_hat)``, bias correction on both moments, no weight decay).
    Keys: ``lr``, ``max_steps``, ``power``, ``b1``, ``b2``, ``eps``.
    """
    cfg = _read_config(config, DEFAULT_ADAM, overrides, 'discriminator optimizer')
    schedule = make_schedule(float(cfg['lr']), int(cfg['max_steps']), float(cfg['power']))
    return optax.adam(schedule, b1=float(cfg['b1']), b2=float(cfg['b2']), eps=float(cfg['eps']))
