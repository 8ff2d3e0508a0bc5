"""One process of the two-process test (run by tests/test_multihost.py, not collected by pytest).

Usage: python multihost_worker.py PORT PROCESS_ID OUT.npz — joins a 2-process JAX cluster on
localhost (2 CPU devices each, gloo collectives), runs two stage-2 steps data-parallel over the
4 global devices with this process's half of each batch, and (process 0) saves the state.
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_train_steps import EQUIVALENCE, build, make_batch, tiny_config  # noqa: E402

from cpsl_jax.train import parallel  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2
config = tiny_config("stage2", **EQUIVALENCE)
fn, state = build(config)
mesh = parallel.make_mesh()
step = parallel.data_parallel(fn, mesh)
state = parallel.replicate(state, mesh)
rng = np.random.default_rng(11)
for _ in range(2):
    batch = make_batch(config, rng)  # the same global batch in both processes; each keeps its half
    half = jax.tree.map(lambda x: x[2 * pid:2 * pid + 2], batch)
    state, metrics = step(state, parallel.shard_batch(half, mesh))
if pid == 0:
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state)]
    np.savez(out, *leaves, loss=np.asarray(metrics["loss"].addressable_data(0)))
jax.distributed.shutdown()
