"""Checkpoints: exact resume of state and data position, fallback past a corrupt newest step, best kept."""
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np

from cpsl_jax.train.checkpoint import Checkpointer, abstract_like


def _dataset(seed=3):
    return grain.MapDataset.range(40).shuffle(seed=seed).repeat().map(lambda i: np.full((2,), i, np.int32)).batch(4)


def _step(state, batch):
    key, sub = jax.random.split(state["rng"])
    noise = jax.random.normal(sub, state["w"].shape)
    return {"w": state["w"] * 0.9 + batch.sum() * 1e-3 + 1e-2 * noise, "rng": key, "step": state["step"] + 1}


def _init():
    return {"w": jnp.zeros((3, 2)), "rng": jax.random.PRNGKey(0), "step": jnp.zeros((), jnp.int32)}


def _run(state, it, n, ckpt=None):
    seen = []
    for _ in range(n):
        batch = next(it)
        seen.append(batch)
        state = jax.jit(_step)(state, batch)
        if ckpt is not None:
            ckpt.save(int(state["step"]), state, iterators={"target": it}, config={"stage": "test"})
    return state, seen


def test_resume_is_exact_and_skips_a_corrupt_newest_step(tmp_path, caplog):
    # Uninterrupted run of 7 steps.
    ref_state, ref_batches = _run(_init(), iter(_dataset()), 7)

    # Interrupted run: 5 steps with checkpoints every 2 steps, then the newest is damaged.
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3, save_every=2, handle_signals=False)
    _run(_init(), iter(_dataset()), 5, ckpt)
    ckpt.wait()
    assert ckpt.latest_step() == 4
    for f in (tmp_path / "ckpt" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    ckpt.close()

    ckpt = Checkpointer(tmp_path / "ckpt", keep=3, save_every=2, handle_signals=False)
    it = iter(_dataset())
    with caplog.at_level("WARNING"):
        state, step = ckpt.restore(abstract_like(_init()), iterators={"target": it})
    assert step == 2
    assert "step 4" in caplog.text
    resumed, batches = _run(state, it, 5)
    for a, b in zip(batches, ref_batches[2:]):
        np.testing.assert_array_equal(a, b)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), resumed, ref_state)
    ckpt.close()


def test_best_checkpoint_keeps_the_highest_miou(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, save_every=1, handle_signals=False)
    state = _init()
    for step, miou in [(1, 0.3), (2, 0.5), (3, 0.4)]:
        ckpt.save_best(step, {**state, "step": jnp.asarray(step, jnp.int32)}, miou)
    ckpt.wait()
    kept = sorted(p.name for p in (tmp_path / "ckpt" / "best").iterdir() if p.name.isdigit())
    assert kept == ["2"]
    ckpt.close()


def test_nothing_to_restore_returns_none(tmp_path):
    ckpt = Checkpointer(tmp_path / "empty", handle_signals=False)
    assert ckpt.restore(abstract_like(_init())) is None
    ckpt.close()
