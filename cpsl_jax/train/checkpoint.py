"""Checkpoints with orbax: the train state, the data iterators and the config in one step folder.

Layout of ``<workdir>/checkpoints``::

    <step>/state    the TrainState (every array that changes), restored onto its shardings
    <step>/data     the grain iterators' positions (one JSON per iterator name)
    <step>/config   the run's config, as JSON, for reading by people and tools
    best/<step>/... the checkpoint with the best validation mIoU, kept apart from the rolling ones

Resume precedence: the newest step under ``checkpoints`` that restores cleanly; a newest
step that fails to restore (partial write, corrupt file) is reported and the previous one
is tried, so one bad write never costs the run. Saving is asynchronous: the step loop goes
on while the arrays are written; ``wait`` blocks until the last write is on disk.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        best_options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m["miou"],
                                                    best_mode="max", keep_checkpoints_without_metrics=False,
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
        place. Returns ``(state, step)``, or ``None`` when there is nothing to restore.
        """
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        for s in steps:
            try:
                out = self._manager.restore(s, args=self._args(abstract_state, iterators, None, restore=True))
            except Exception as err:  # noqa: BLE001 - any failure to read a step means: try the previous one
                if step is not None:
                    raise
                log.warning("checkpoint at step %d in %s could not be restored (%s: %s); trying the previous one",
                            s, self.directory, type(err).__name__, err)
                continue
            return out["state"], int(s)
        return None


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
