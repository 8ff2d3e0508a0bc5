"""Checkpoints with orbax: the train state, the data iterators and the config in one step folder.

Layout of ``<workdir>/checkpoints``::

    <step>/state    the TrainState (every array that changes), restored onto its shardings
    <step>/data     the grain iterators' positions (one JSON per iterator name)
    <step>/config   the run's config, as JSON, for reading by people and tools
    best/<step>/... the checkpoint with the best validation mIoU, kept apart from the rolling ones

Resume precedence: the newest step under ``checkpoints`` that restores cleanly. A newer step
that fails to restore (a corrupt or missing file) is moved aside as ``<step>.corrupt-<time>``
(kept for inspection; no step name of orbax's matches it, so the managers no longer see it)
with one warning line, and the run goes on from the good one; the step is then written
again. When no step restores, nothing is moved and ``CheckpointError`` lists what was tried:
a workdir that holds checkpoints never silently starts afresh. The best checkpoint is
checked the same way on a resume (``restore_best``). A write cut short (kill -9, a lost
machine) leaves only orbax's temporary folder, which the next start removes. Saving is
asynchronous: the step loop goes on while the arrays are written; ``wait`` blocks until the
last write is on disk.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# A folder or file moved aside after failing to restore: ``45.corrupt-20250101T120000``.
# orbax finds steps by the names ``<digits>`` and ``<prefix>_<digits>``, so it ignores these.
CORRUPT_MARK = ".corrupt-"


class CheckpointError(RuntimeError):
    """A workdir holds checkpoints, but none of them could be restored."""


class Checkpointer:
    """Rolling checkpoints (the last ``keep``) plus the best-mIoU one, and preemption requests.

    ``iterators`` maps a name to a grain ``DatasetIterator``/``DataLoaderIterator``; their
    positions are saved with the state and restored in place, so the next batches after a
    resume are exactly those an uninterrupted run would have seen.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, save_every: int = 1000,
                 asynchronous: bool = True, handle_signals: bool = True):
        self.directory = Path(directory).absolute()
        self.save_every = int(save_every)
        # cleanup_tmp_directories: a write cut short leaves a temporary folder; drop it at start.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        _quarantine_unreadable_metrics(self.directory / "best")  # the best manager reads them when it starts
        best_options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m["miou"],
                                                    best_mode="max", keep_checkpoints_without_metrics=False,
                                                    cleanup_tmp_directories=True,
                                                    enable_async_checkpointing=asynchronous)
        self._best = ocp.CheckpointManager(self.directory / "best", options=best_options)
        self._stop_requested = False
        if handle_signals:
            self._install_signal_handlers()

    # -- preemption -------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
            log.warning("signal %d received: saving a checkpoint at the next step and stopping", signum)
            self._stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def should_stop(self, step: int) -> bool:
        """True when the scheduler asked this job to stop (SIGTERM, SLURM's SIGUSR1, TPU maintenance)."""
        return self._stop_requested or bool(self._manager.reached_preemption(step))

    # -- saving -----------------------------------------------------------------------------
    @staticmethod
    def _args(state: Any, iterators: Mapping[str, Any] | None, config: Any | None, restore: bool = False):
        items: dict[str, Any] = {}
        if restore:
            items["state"] = ocp.args.StandardRestore(state)
            for name, it in (iterators or {}).items():
                items[f"data_{name}"] = grain.checkpoint.CheckpointRestore(it)
        else:
            items["state"] = ocp.args.StandardSave(state)
            for name, it in (iterators or {}).items():
                items[f"data_{name}"] = grain.checkpoint.CheckpointSave(it)
            if config is not None:
                items["config"] = ocp.args.JsonSave(_jsonable(config))
        return ocp.args.Composite(**items)

    def save(self, step: int, state: Any, *, iterators: Mapping[str, Any] | None = None,
             config: Any | None = None, force: bool = False) -> bool:
        """Save when ``step`` is a multiple of ``save_every`` (or ``force``); returns whether it did."""
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        return bool(self._manager.save(step, args=self._args(state, iterators, config), force=True))

    def save_best(self, step: int, state: Any, miou: float, *, config: Any | None = None) -> bool:
        """Keep ``state`` as the best checkpoint if ``miou`` beats the one kept so far."""
        return bool(self._best.save(step, args=self._args(state, None, config), metrics={"miou": float(miou)},
                                    force=True))

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
        self._best.close()

    # -- restoring --------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, abstract_state: Any, *, iterators: Mapping[str, Any] | None = None,
                step: int | None = None) -> tuple[Any, int] | None:
        """Restore the newest good checkpoint (or ``step``) onto ``abstract_state``'s shapes and shardings.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (from
        ``jax.eval_shape`` + the state's shardings) or of arrays. Iterators are restored in
        place. Returns ``(state, step)``, or ``None`` when there is no checkpoint. Newer steps
        that fail are moved aside once an older one restores (one warning line each); when
        none restores, ``CheckpointError`` names every step tried and nothing is moved.
        """
        if step is not None:  # one step asked for by name: its error is the caller's
            out = self._manager.restore(step, args=self._args(abstract_state, iterators, None, restore=True))
            return out["state"], int(step)
        failed: list[tuple[int, str]] = []
        for s in sorted(self._manager.all_steps(), reverse=True):
            out, why = _attempt(lambda: self._manager.restore(
                s, args=self._args(abstract_state, iterators, None, restore=True)), self.directory, s)
            if why is not None:
                failed.append((s, why))
                continue
            for bad, reason in failed:
                moved = quarantine(self.directory / str(bad))
                log.warning("checkpoint step %d could not be restored (%s); moved to %s, resuming from step %d",
                            bad, reason, moved.name, s)
            if failed:
                self._manager.reload()
            return out["state"], int(s)
        if failed:
            tried = "; ".join(f"step {s}: {why}" for s, why in failed)
            raise CheckpointError(f"none of the checkpoints in {self.directory} could be restored ({tried}); "
                                  "nothing was moved: move them aside or use a new workdir to start afresh")
        return None

    def best_miou(self) -> float | None:
        """The mIoU recorded with the best checkpoint, or ``None`` when there is none."""
        step = self._best.best_step()
        return None if step is None else float(self._best.metrics(step)["miou"])

    def restore_best(self, abstract_state: Any) -> tuple[Any, int] | None:
        """The best checkpoint's state and step, or ``None`` when there is none (left).

        A best checkpoint that fails to restore is moved aside (``best/<step>.corrupt-<time>``)
        with one warning line; the next better validation writes a new one.
        """
        for s in sorted(self._best.all_steps(), reverse=True):
            out, why = _attempt(lambda: self._best.restore(
                s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))), self._best.directory, s)
            if why is None:
                return out["state"], int(s)
            moved = quarantine(self.directory / "best" / str(s))
            log.warning("best checkpoint step %d could not be restored (%s); moved to best/%s", s, why, moved.name)
            self._best.reload()
        return None


def quarantine(path: str | Path) -> Path:
    """Move ``path`` aside as ``<name>.corrupt-<UTC time>``, kept for inspection; returns the new path.

    Process 0 moves it; every process waits for the move.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target, n = path.with_name(f"{path.name}{CORRUPT_MARK}{stamp}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}{CORRUPT_MARK}{stamp}-{n}"), n + 1
    if jax.process_index() == 0:
        path.rename(target)
    ocp.multihost.sync_global_processes(f"cpsl_quarantine_{path.name}")
    return target


def _quarantine_unreadable_metrics(directory: Path) -> None:
    """Move aside the best steps whose mIoU file cannot be read: orbax would fail to start."""
    if not directory.is_dir():
        return
    for step_dir in sorted(directory.iterdir()):
        metrics = step_dir / "metrics" / "metrics"
        if not (step_dir.name.isdigit() and metrics.is_file()):
            continue
        try:
            json.loads(metrics.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            moved = quarantine(step_dir)
            log.warning("best checkpoint step %s could not be read (%s: %s: %s); moved to best/%s", step_dir.name,
                        f"{step_dir.name}/metrics/metrics", type(err).__name__, err, moved.name)


def _attempt(read, directory: Path, step: int) -> tuple[Any, str | None]:
    """``(read(), None)``, or ``(None, why)`` when it failed on any process (all agree)."""
    out, why = None, None
    try:
        out = read()
    except Exception as err:  # noqa: BLE001 - any failure to read a step means: not this one
        why = describe_error(err, directory, step)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed_anywhere = int(np.max(multihost_utils.process_allgather(np.int32(why is not None))))
        if failed_anywhere and why is None:
            why = "failed to restore on another process"
    return out, why


def describe_error(err: BaseException, directory: Path, step: int) -> str:
    """``<file>: <type>: <first line>`` of a failed restore: the deepest path under the step
    that the error (or its cause) names, else the step folder."""
    chain, e = [], err
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(e) for e in chain)
    step_dir = f"{Path(directory)}/{step}"
    names = re.findall(re.escape(step_dir) + r"(?![\w.-])(/[^\s'\"\\]*)?", text)
    where = f"{step}{max(names, key=len).rstrip('/')}" if any(names) else f"{step}/"
    state_dir = Path(step_dir) / "state"
    missing = [f for f in ("_METADATA", "manifest.ocdbt") if state_dir.is_dir() and not (state_dir / f).exists()]
    if missing and where in (f"{step}/", f"{step}/state"):  # the error may not say which file it missed
        where = f"{step}/state/{missing[0]} missing"
    if "/state" in where or where == f"{step}/":
        # TensorStore names the array by its key inside the OCDBT store: 'path': 'params.model.x/'
        key = re.search(r"'path': '([^/'][^']*?)/?'", text)
        if key:
            where = f"{where.rstrip('/')} (array {key.group(1)})"
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    first = first.split(" See full TensorStore details")[0]
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{where}: {type(err).__name__}: {first}"

def _jsonable(config: Any) -> Any:
    """A ConfigDict (or any mapping) as plain JSON types."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {str(k): _jsonable(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_jsonable(v) for v in config]
    if isinstance(config, (str, int, float, bool)) or config is None:
        return config
    return str(config)


def abstract_like(state: Any) -> Any:
    """Shapes, dtypes and shardings of ``state``: the target a restore fills in."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)
