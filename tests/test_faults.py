"""The fault matrix, end to end: real training processes (``python -m cpsl_jax.main`` on the tiny
warm-up) killed, stopped, resumed over corrupt checkpoints or given bad configs.

Every row that resumes ends with the bytes of ``model.msgpack`` and the last metrics of one
uninterrupted run (the ``reference`` fixture, shared by the module); every row that cannot go
on fails with one ``error: ...`` line and no traceback. Kills wait for a folder on disk (a
finished checkpoint, or orbax's temporary folder of one being written), never for a time.
The processes share the test run's compilation cache (tests/conftest.py), so only the
reference compiles. ``docs/reliability.md`` lists the rows.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 20, 5  # checkpoints (and validations) at 5, 10, 15, 20; the last three are kept
TMP = ".orbax-checkpoint-tmp"


def command(workdir, *overrides, steps=STEPS):
    return [sys.executable, "-m", "cpsl_jax.main", "--config=configs/tiny.py:warmup", f"--workdir={workdir}",
            f"--config.train.steps={steps}", f"--config.train.checkpoint_every={EVERY}",
            f"--config.train.eval_every={EVERY}", *overrides]


def run(workdir, *overrides, steps=STEPS, env=None):
    return subprocess.run(command(workdir, *overrides, steps=steps), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def start(workdir, *overrides):
    """A training process in the background; its stderr goes to ``<workdir>.log``."""
    log = open(f"{workdir}.log", "w")
    return subprocess.Popen(command(workdir, *overrides), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)


def wait_for(proc, found, what, timeout=600):
    """Poll (every millisecond) until ``found()`` gives something; fail if the process ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hit = found()
        if hit:
            return hit
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        time.sleep(0.001)
    proc.kill()
    pytest.fail(f"no {what} within {timeout} s")


def steps_of(workdir):
    ckpt = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def last_train_metrics(workdir, step=STEPS):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] == step and "train/loss" in r][-1]


def assert_ends_as_reference(workdir, reference, proc=None):
    """The run finished with the parameters and the last metrics of the uninterrupted run."""
    if proc is not None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (Path(workdir) / "model.msgpack").read_bytes() == (reference / "model.msgpack").read_bytes()
    assert last_train_metrics(workdir) == last_train_metrics(reference)


def one_error_line(proc) -> str:
    """The failure's only words: no traceback, the last line ``error: ...``."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


def biggest_file(folder):
    return max((f for f in Path(folder).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def truncate(path, size=1000):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: STEPS steps of the tiny warm-up, checkpoints every EVERY."""
    workdir = tmp_path_factory.mktemp("faults") / "reference"
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert steps_of(workdir) == [10, 15, 20]
    return workdir


def resumable_copy(reference, tmp_path, name="w"):
    """The reference workdir without what a rerun must write again."""
    workdir = tmp_path / name
    shutil.copytree(reference, workdir)
    for f in ("model.msgpack", "summary.json"):
        (workdir / f).unlink()
    return workdir


def quarantined(workdir, name="checkpoints"):
    return sorted(p.name.split(".")[0] for p in (Path(workdir) / name).iterdir() if ".corrupt-" in p.name)


# -- corrupt checkpoints ---------------------------------------------------------------------------


def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_run_ends_as_uninterrupted(reference, tmp_path):
    workdir = resumable_copy(reference, tmp_path)
    truncate(biggest_file(workdir / "checkpoints" / "20" / "state" / "ocdbt.process_0" / "d"))
    proc = run(workdir)
    assert_ends_as_reference(workdir, reference, proc)
    warnings = [line for line in proc.stderr.splitlines() if "could not be restored" in line]
    assert warnings and all("checkpoint step 20 could not be restored (20/state" in w for w in warnings)
    assert "resuming from step 15" in warnings[0]
    assert quarantined(workdir) == ["20"] and steps_of(workdir) == [10, 15, 20]  # step 20 written again


@pytest.mark.slow
def test_deleted_checkpoint_metadata(reference, tmp_path):
    """Without its ``_METADATA`` (the state's tree) a step does not restore: moved aside, named."""
    workdir = resumable_copy(reference, tmp_path)
    (workdir / "checkpoints" / "20" / "state" / "_METADATA").unlink()
    proc = run(workdir)
    assert_ends_as_reference(workdir, reference, proc)
    assert "checkpoint step 20 could not be restored (20/state/_METADATA missing" in proc.stderr
    assert "resuming from step 15" in proc.stderr
    assert quarantined(workdir) == ["20"]


@pytest.mark.slow
def test_both_newest_checkpoints_corrupt(reference, tmp_path):
    workdir = resumable_copy(reference, tmp_path)
    for step in (20, 15):
        truncate(biggest_file(workdir / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d"))
    proc = run(workdir)
    assert_ends_as_reference(workdir, reference, proc)
    for step in (20, 15):
        assert f"checkpoint step {step} could not be restored" in proc.stderr
    assert "resuming from step 10" in proc.stderr
    assert quarantined(workdir) == ["15", "20"]


@pytest.mark.slow
def test_no_checkpoint_restores_fails_in_one_line_and_moves_nothing(reference, tmp_path):
    workdir = resumable_copy(reference, tmp_path)
    for step in (20, 15, 10):
        truncate(biggest_file(workdir / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d"))
    line = one_error_line(run(workdir))
    assert "none of the checkpoints" in line and "nothing was moved" in line
    for step in (20, 15, 10):
        assert f"step {step}: {step}/state" in line
    assert steps_of(workdir) == [10, 15, 20] and quarantined(workdir) == []
    assert not (workdir / "model.msgpack").exists()


@pytest.mark.slow
def test_a_corrupt_best_model_is_moved_aside_and_written_again(reference, tmp_path):
    """A truncated ``best_model.msgpack`` is written again from the best checkpoint: the same
    bytes. A best checkpoint that does not restore is moved aside; the run ends as the reference."""
    workdir = resumable_copy(reference, tmp_path)
    truncate(workdir / "best_model.msgpack", 100)
    truncate(biggest_file(workdir / "checkpoints" / "20" / "state" / "ocdbt.process_0" / "d"))
    proc = run(workdir)
    assert_ends_as_reference(workdir, reference, proc)
    assert (workdir / "best_model.msgpack").read_bytes() == (reference / "best_model.msgpack").read_bytes()
    assert "best_model.msgpack could not be read" in proc.stderr
    assert len(list(workdir.glob("best_model.msgpack.corrupt-*"))) == 1

    workdir = resumable_copy(reference, tmp_path, "best_checkpoint")
    (best,) = [p.name for p in (workdir / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    truncate(biggest_file(workdir / "checkpoints" / "best" / str(best) / "state" / "ocdbt.process_0" / "d"))
    truncate(biggest_file(workdir / "checkpoints" / "20" / "state" / "ocdbt.process_0" / "d"))
    proc = run(workdir)
    assert_ends_as_reference(workdir, reference, proc)
    assert f"best checkpoint step {best} could not be restored" in proc.stderr
    assert quarantined(workdir, "checkpoints/best") == [best]
    # The best model file was readable: it is kept, and so is the mIoU to beat.
    assert (workdir / "best_model.msgpack").read_bytes() == (reference / "best_model.msgpack").read_bytes()


# -- interruptions ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_a_step_resumes_exactly(reference, tmp_path):
    workdir = tmp_path / "w"
    proc = start(workdir)
    wait_for(proc, lambda: (workdir / "checkpoints" / "10").is_dir(), "checkpoint 10")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not (workdir / "model.msgpack").exists()
    assert_ends_as_reference(workdir, reference, run(workdir))


@pytest.mark.slow
def test_kill_9_during_an_asynchronous_save_resumes_exactly(reference, tmp_path):
    """Killed while orbax writes step 10 (its temporary folder is there): the write is lost,
    the folder is removed by the next start, which resumes from step 5."""
    workdir = tmp_path / "w"
    proc = start(workdir)
    ckpt = workdir / "checkpoints"
    partial = wait_for(proc, lambda: [p for p in (ckpt.iterdir() if ckpt.is_dir() else ())
                                      if p.name.startswith(f"10{TMP}")], "the write of checkpoint 10")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert partial[0].exists() and 10 not in steps_of(workdir), "the kill came after the write ended"
    resumed = run(workdir)
    assert_ends_as_reference(workdir, reference, resumed)
    assert not [p for p in ckpt.rglob(f"*{TMP}*")]


@pytest.mark.slow
def test_sigterm_saves_stops_cleanly_and_resumes_exactly(reference, tmp_path):
    workdir = tmp_path / "w"
    proc = start(workdir)
    wait_for(proc, lambda: (workdir / "checkpoints" / "5").is_dir(), "checkpoint 5")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 0
    stopped = json.loads((workdir / "summary.json").read_text())["step"]
    assert 5 < stopped < STEPS and steps_of(workdir)[-1] == stopped
    assert f"stopping at step {stopped} on request" in Path(f"{workdir}.log").read_text()
    assert_ends_as_reference(workdir, reference, run(workdir))


# -- the run's own verdicts ------------------------------------------------------------------------


def test_a_changed_config_is_refused_on_a_workdir_with_checkpoints(reference, tmp_path):
    """The rule (``cpsl_jax/config_check.py``, RESUMABLE): a resume may change how long the run
    goes and how often it logs, evaluates and saves; any other key is refused before compiling."""
    workdir = resumable_copy(reference, tmp_path)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    line = one_error_line(run(workdir, "--config.optim.base_lr=0.001", "--config.train.log_every=2"))
    assert "optim.base_lr=0.0001 there, 0.001 now" in line and "log_every" not in line.split("Resume")[0]
    assert json.loads((workdir / "config.json").read_text())["optim"]["base_lr"] == 1e-4
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_finite_checkpoints(tmp_path):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    workdir = tmp_path / "w"
    proc = run(workdir, "--config.optim.base_lr=1e30", "--config.train.nonfinite_skip=1",
               "--config.train.eval_every=0", "--config.train.checkpoint_every=1", steps=6)
    line = one_error_line(proc)
    assert proc.returncode == 1 and "were not finite for 2 step(s) in a row (train.nonfinite_skip=1)" in line
    assert not (workdir / "model.msgpack").exists()
    saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(steps_of(workdir)[-1]) / "state")
    leaves = [np.asarray(x) for x in jax.tree.leaves(saved["params"])]
    assert leaves and all(np.isfinite(x).all() for x in leaves)


# -- bad configs: one line, before anything is compiled --------------------------------------------

FOUR_DEVICES = {**os.environ, "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.mark.parametrize("overrides, words", [
    (["--config.optim.lr_typo=1"], ["unknown config key 'optim.lr_typo'", "configs/tiny.py:warmup",
                                    "closest: optim.lr_mult", "optim holds: base_lr"]),
    (["--config.optim.base_lr=abc"], ["optim.base_lr=abc", "expected a float"]),
    (["--config.data.crop_size=64"], ["data.crop_size=(64,)", "expected a tuple of 2 ints"]),
    (["--config.data.batch_size=6", "--config.data.eval_batch_size=2"],
     ["data.batch_size=6 and data.eval_batch_size=2 do not divide over the 4 devices"]),
], ids=["unknown-key", "wrong-type", "tuple-length", "batch-over-devices"])
def test_bad_configs_fail_in_one_line_before_compiling(tmp_path, overrides, words):
    workdir = tmp_path / "w"
    proc = run(workdir, *overrides, env=FOUR_DEVICES)
    line = one_error_line(proc)
    assert proc.returncode == 2
    for word in words:
        assert word in line
    assert not workdir.exists()  # refused before the run made its workdir, let alone compiled
