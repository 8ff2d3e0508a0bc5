"""The one place where a per-device step becomes a compiled, data-parallel function.

Every stage's step is written as per-device code, ``step(state, batch) -> (state, metrics)``,
whose collectives name the mesh axis ``'data'`` (synchronised batch norm, loss
normalisers, gathered rows, metric sums). It must leave ``state`` and ``metrics``
identical on every device. This module compiles it

* with ``jax.jit`` + ``jax.shard_map`` over a 1-D mesh of all devices (the default): the
  state is replicated (``P()``), the batch split along its leading axis (``P('data')``);
* or with ``jax.pmap(axis_name='data')``, where the state carries a leading device axis.

Both run the same function; ``tests/test_parallel.py`` shows they give the same state.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"

StepFn = Callable[[Any, Any], tuple[Any, Any]]


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``'data'`` over ``devices`` (all devices of all processes by default)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of host or device arrays on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def stack_for_pmap(tree: Any, mesh: Mesh) -> Any:
    """A copy of ``tree`` per device along a new leading axis, as ``jax.pmap`` takes state."""
    n = mesh.devices.size
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def shard_batch(host_batch: Any, mesh: Mesh) -> Any:
    """Turn this process's part of the batch into global arrays split over ``'data'``.

    Each process passes its own rows (``process_batch = global_batch / process_count``);
    the leading axis of every leaf must divide evenly over the local devices.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)


def data_parallel(
    step: StepFn,
    mesh: Mesh,
    *,
    backend: Literal["shard_map", "pmap"] = "shard_map",
    donate_state: bool = True,
    check_vma: bool = False,
) -> StepFn:
    """Compile the per-device ``step`` to run over every device of ``mesh``.

    With ``backend='shard_map'`` the result takes and returns global arrays: a replicated
    state and a batch sharded along ``'data'`` (see ``replicate`` / ``shard_batch``).
    With ``backend='pmap'`` state and batch carry a leading axis of size
    ``mesh.devices.size`` (``stack_for_pmap`` / a reshaped batch).
    The state argument is donated, so its buffers are reused for the new state.
    """
    donate = (0,) if donate_state else ()
    if backend == "pmap":
        return jax.pmap(step, axis_name=AXIS, devices=list(mesh.devices.flat), donate_argnums=donate)
    if backend != "shard_map":
        raise ValueError(f"backend must be 'shard_map' or 'pmap', got {backend!r}")
    sharded = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P(AXIS)),
        out_specs=(P(), P()),
        check_vma=check_vma,
    )
    return jax.jit(
        sharded,
        donate_argnums=donate,
        out_shardings=(replicated(mesh), replicated(mesh)),
    )


def sharded_eval(fn: Callable[[Any, Any], Any], mesh: Mesh) -> Callable[[Any, Any], Any]:
    """Compile a per-device ``fn(replicated, batch) -> replicated`` (e.g. a psum'd confusion matrix)."""
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False))
