"""The data-parallel wrapper: shard_map and pmap run the same per-device step to the same state."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cpsl_jax.train import parallel


def _step(state, batch):
    """A per-device step with the project's collectives: a globally normalised loss, psum'd
    gradients and a cross-device mean (a stand-in for synchronised batch statistics)."""
    x, y = batch["x"], batch["y"]
    count = lax.psum(jnp.float32(x.shape[0]), parallel.AXIS)

    def loss_share(w):
        pred = x @ w["a"] + w["b"]
        return jnp.sum((pred - y) ** 2) / count

    share, grads = jax.value_and_grad(loss_share)(state["w"])
    grads = lax.psum(grads, parallel.AXIS)
    w = jax.tree.map(lambda p, g: p - 0.1 * g, state["w"], grads)
    mean_x = lax.psum(jnp.sum(x, axis=0), parallel.AXIS) / count
    new = {"w": w, "running": 0.9 * state["running"] + 0.1 * mean_x, "step": state["step"] + 1}
    return new, {"loss": lax.psum(share, parallel.AXIS)}


def _single(state, batch):
    """The same update on one device with the whole batch, written without collectives."""
    x, y = batch["x"], batch["y"]
    loss, grads = jax.value_and_grad(lambda w: jnp.mean(jnp.sum((x @ w["a"] + w["b"] - y) ** 2, -1)))(state["w"])
    w = jax.tree.map(lambda p, g: p - 0.1 * g, state["w"], grads)
    return {"w": w, "running": 0.9 * state["running"] + 0.1 * x.mean(0), "step": state["step"] + 1}, {"loss": loss}


def _init(rng):
    return {
        "w": {"a": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros((2,), jnp.float32)},
        "running": jnp.zeros((3,), jnp.float32),
        "step": jnp.zeros((), jnp.int32),
    }


def test_shard_map_and_pmap_match_single_device():
    rng = np.random.default_rng()
    batches = [{"x": rng.standard_normal((8, 3)).astype(np.float32), "y": rng.standard_normal((8, 2)).astype(np.float32)} for _ in range(3)]
    mesh = parallel.make_mesh(jax.devices()[:4])

    ref = _init(np.random.default_rng(0))
    for b in batches:
        ref, ref_metrics = jax.jit(_single)(ref, b)

    sm_step = parallel.data_parallel(_step, mesh, backend="shard_map")
    sm = parallel.replicate(_init(np.random.default_rng(0)), mesh)
    for b in batches:
        sm, sm_metrics = sm_step(sm, parallel.shard_batch(b, mesh))

    pm_step = parallel.data_parallel(_step, mesh, backend="pmap")
    pm = parallel.stack_for_pmap(_init(np.random.default_rng(0)), mesh)
    for b in batches:
        pm, pm_metrics = pm_step(pm, jax.tree.map(lambda v: v.reshape(4, 2, *v.shape[1:]), b))

    for got in (sm, jax.tree.map(lambda v: v[0], pm)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), got, ref)
    np.testing.assert_allclose(float(sm_metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pm_metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    assert int(sm["step"]) == 3
    # pmap keeps one copy per device, all equal.
    np.testing.assert_array_equal(np.asarray(pm["w"]["a"][0]), np.asarray(pm["w"]["a"][3]))
