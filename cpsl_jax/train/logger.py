"""What a run tells the person watching it: a progress bar, a log file, TensorBoard, JSONL, summary.json.

Only process 0 writes. TensorBoard event files come from tensorboardX, which needs no
TensorFlow at run time. Metrics arrive as host floats at log steps only; a non-finite loss
is not this module's business (``cpsl_jax.train.guards`` decides what happens then).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
from tqdm.auto import tqdm


def setup_logging(workdir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log lines to stderr and, on process 0, to ``<workdir>/log.txt``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if workdir is not None and jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(workdir) / "log.txt"))
    fmt = logging.Formatter("%(asctime)s %(levelname).1s %(name)s] %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    # orbax and grain log every save and read at INFO through absl; keep their warnings only.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_cpsl", False):
            root.removeHandler(h)
    for h in handlers:
        h.setFormatter(fmt)
        h._cpsl = True  # type: ignore[attr-defined]
        root.addHandler(h)


class MetricWriter:
    """TensorBoard scalars + one JSON line per log step + ``summary.json``, from process 0."""

    def __init__(self, workdir: str | Path, *, enabled: bool | None = None):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")

    def scalars(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        for k, v in row.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), **row}) + "\n")
        self._jsonl.flush()

    def summary(self, **fields: Any) -> None:
        """Merge ``fields`` into ``<workdir>/summary.json`` (stage, step, target mIoU, per-class IoU, images/s)."""
        if not self.enabled:
            return
        path = self.workdir / "summary.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(fields)
        path.write_text(json.dumps(data, indent=1, default=float) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


class Progress:
    """A progress bar with steps/s, images/s and ETA (tqdm), shown on process 0 only."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", images_per_step: int = 1):
        self.images_per_step = images_per_step
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         disable=jax.process_index() != 0, mininterval=1.0)
        self._t0 = time.perf_counter()
        self._n = 0

    def update(self, n: int = 1, **postfix: float) -> None:
        self._n += n
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def images_per_second(self) -> float:
        dt = time.perf_counter() - self._t0
        return self._n * self.images_per_step / dt if dt > 0 else float("nan")

    def close(self) -> None:
        self._bar.close()
