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


def _big(step=0):
    """A state whose array is stored in a data file of its own (small ones sit in the manifest)."""
    return {"w": jnp.linspace(0, 1, 300 * 200).reshape(300, 200), "step": jnp.asarray(step, jnp.int32)}


def _truncate_state(step_dir):
    """Cut the largest data file of the step's state short, as a write cut short by a lost machine."""
    data = max((f for f in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir()), key=lambda f: f.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(10)


def _saved(tmp_path, steps=(2, 4, 6)):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3, save_every=2, handle_signals=False)
    for step in steps:
        ckpt.save(step, _big(step))
    ckpt.wait()
    ckpt.close()
    return tmp_path / "ckpt"


def test_a_step_that_fails_to_restore_is_moved_aside_and_written_again(tmp_path, caplog):
    """The corrupt step leaves the manager's steps (kept as ``6.corrupt-<time>``), so the
    resumed run can save that step again instead of failing on an existing one."""
    directory = _saved(tmp_path)
    _truncate_state(directory / "6")
    ckpt = Checkpointer(directory, keep=3, save_every=2, handle_signals=False)
    with caplog.at_level("WARNING"):
        state, step = ckpt.restore(abstract_like(_big()))
    assert step == 4 and int(state["step"]) == 4
    (line,) = [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]
    assert line.startswith("checkpoint step 6 could not be restored (6/state") and "resuming from step 4" in line
    moved = [p.name for p in directory.iterdir() if ".corrupt-" in p.name]
    assert len(moved) == 1 and moved[0].startswith("6.corrupt-") and ckpt.latest_step() == 4
    assert ckpt.save(6, _big(6))
    ckpt.wait()
    assert ckpt.latest_step() == 6
    ckpt.close()


def test_when_no_step_restores_the_error_lists_them_and_moves_nothing(tmp_path):
    import pytest

    from cpsl_jax.train.checkpoint import CheckpointError

    directory = _saved(tmp_path, steps=(2, 4))
    for step in (2, 4):
        _truncate_state(directory / str(step))
    ckpt = Checkpointer(directory, keep=3, save_every=2, handle_signals=False)
    with pytest.raises(CheckpointError, match=r"step 4: 4/state.*step 2: 2/state.*nothing was moved"):
        ckpt.restore(abstract_like(_big()))
    assert sorted(p.name for p in directory.iterdir()) == ["2", "4", "best"]
    ckpt.close()


def test_unreadable_best_checkpoints_are_moved_aside(tmp_path):
    """An mIoU file orbax cannot parse would stop it from starting; a state that does not
    restore is no best model. Both are moved aside; the best manager starts empty."""
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, save_every=1, handle_signals=False)
    ckpt.save_best(3, _big(3), 0.5)
    ckpt.wait()
    state, step = ckpt.restore_best(abstract_like(_big()))
    assert step == 3 and int(state["step"]) == 3 and ckpt.best_miou() == 0.5
    ckpt.close()
    best = tmp_path / "ckpt" / "best"
    shutil.copytree(best / "3", best / "5")
    (best / "5" / "metrics" / "metrics").write_text("{not json")
    _truncate_state(best / "3")
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, save_every=1, handle_signals=False)
    assert ckpt.restore_best(abstract_like(_big())) is None and ckpt.best_miou() is None
    assert sorted(p.name.split(".")[0] for p in best.iterdir()) == ["3", "5"]
    assert all(".corrupt-" in p.name for p in best.iterdir())
    ckpt.close()


def test_a_write_cut_short_is_removed_at_start(tmp_path):
    directory = _saved(tmp_path, steps=(2,))
    partial = directory / "4.orbax-checkpoint-tmp-1234"  # what a killed asynchronous save leaves
    shutil.copytree(directory / "2", partial)
    ckpt = Checkpointer(directory, keep=3, save_every=2, handle_signals=False)
    assert ckpt.latest_step() == 2
    ckpt.save(4, _big(4))  # the removal runs in the background from the start; a save waits for it
    ckpt.wait()
    assert not partial.exists() and ckpt.latest_step() == 4
    ckpt.close()
