"""The torch variants: :mod:`cpsl_jax.torch_mirror` in one mode (fp32, bf16, compile), timed.

torch is imported when a variant is set up, so that importing the benchmark does not need it.
"""

from __future__ import annotations

import platform
import resource
import time
from typing import Any

import numpy as np

from cpsl_jax.benchmark.inputs import random_batch
from cpsl_jax.benchmark.report import gib, log


class TorchVariant:
    """:mod:`cpsl_jax.torch_mirror` in one mode."""

    def __init__(self, name: str, config, *, device: str, fill_queues: bool, tag: str):
        self.name, self.config, self.device_name, self.fill_queues, self.tag = name, config, device, fill_queues, tag
        self.info: dict[str, Any] = {}
        self.peak = 0

    def setup(self) -> None:
        import torch

        from cpsl_jax import torch_mirror

        self.torch = torch
        self.device = torch.device(self.device_name)
        mode = self.name.split("-", 1)[1]
        log(f"[{self.tag}] building ({mode}, {self.device}) ...")
        self.step = torch_mirror.make_step(self.config, mode, self.device)
        if self.fill_queues:
            self.step.fill_queues()
        self.batch = torch_mirror.to_device_batch(random_batch(self.config, np.random.default_rng(0)), self.device)
        log(f"[{self.tag}] first iteration ...")
        self.info["first_iter_s"] = self.run_once()
        log(f"[{self.tag}] first iteration {self.info['first_iter_s']:.2f} s")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def run_once(self) -> float:
        cuda = self.device.type == "cuda"
        if cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t = time.perf_counter()
        self.out = self.step.step(self.batch)
        self._sync()
        dt = time.perf_counter() - t
        if cuda:
            self.peak = max(self.peak, self.torch.cuda.max_memory_allocated(self.device))
        return dt

    def finish(self) -> dict:
        cuda = self.device.type == "cuda"
        info = dict(self.info, loss=float(self.out["loss"]), on_gpu=cuda,
                    device=self.torch.cuda.get_device_name(self.device) if cuda else platform.processor() or "cpu")
        if cuda:
            info.update(peak_memory_gib=gib(self.peak), memory_kind="torch.cuda.max_memory_allocated")
        else:
            info.update(peak_memory_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                        memory_kind="process peak RSS (everything run so far)")
        return info
