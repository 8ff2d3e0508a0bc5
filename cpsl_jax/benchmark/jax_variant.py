"""The JAX variant: the project's stage-1 or stage-2/3 step, compiled on a 1-device mesh and timed.

Compilation is measured twice: lowering and XLA compilation with a fresh persistent
compilation cache (cold), and again after ``jax.clear_caches()`` from that cache (warm).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpsl_jax.benchmark.inputs import random_batch
from cpsl_jax.benchmark.report import gib, log
from cpsl_jax.train import parallel, steps
from cpsl_jax.train import state as state_lib
from cpsl_jax.train.io import init_variables


def build_jax_step(config):
    """(per-device step function, initial state) of ``config.stage`` with random weights."""
    tx = state_lib.make_optimizer(config)
    variables = init_variables(config, jax.random.PRNGKey(0))
    model = state_lib.build_model(config)
    c, d = config.model.num_classes, config.model.head_width
    if config.stage == "stage1":
        rng = np.random.default_rng(0)
        state = state_lib.create_state(config, variables, tx, rng=jax.random.PRNGKey(0),
                                       prototypes=rng.standard_normal((c, d)).astype(np.float32),
                                       class_prior=np.full((c,), 1.0 / c, np.float32))
        fn = functools.partial(steps.stage1_step, model=model, tx=tx, config=config)
    else:
        state = state_lib.create_state(config, variables, tx, rng=jax.random.PRNGKey(0), teacher=variables)
        fn = functools.partial(steps.distill_step, model=model,
                               teacher_model=state_lib.build_model(config, axis_name=None, bn_pretrain=False),
                               tx=tx, config=config)
    return fn, state


def fill_jax_queues(state, num_classes: int, seed: int = 0):
    """The state with both queues full of random unit rows (and labels), marked in use."""
    if state.feature_queue is None:
        return state
    rng = np.random.default_rng(seed)

    def full(queue, labels: bool):
        rows = rng.standard_normal(queue.rows.shape).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return queue.replace(rows=jnp.asarray(rows), count=jnp.asarray(queue.size, jnp.int32),
                             ptr=jnp.zeros((), jnp.int32), was_in_use=jnp.ones((), jnp.bool_),
                             labels=jnp.asarray(rng.integers(0, num_classes, queue.size), jnp.int32) if labels
                             else queue.labels)

    return state.replace(feature_queue=full(state.feature_queue, True), output_queue=full(state.output_queue, False))


@contextlib.contextmanager
def fresh_compilation_cache():
    """JAX's persistent compilation cache in a new temporary folder, caching every program."""
    from jax._src import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache")
    previous = {name: getattr(jax.config, name) for name in names}
    folder = tempfile.mkdtemp(prefix="cpsl_jax_cache_")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    reset = getattr(compilation_cache, "reset_cache", lambda: None)
    reset()  # pick up the new folder even if a cache was opened before
    try:
        yield folder
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        reset()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _cache_events():
    """Counts of JAX's compilation-cache monitoring events (hits) and the seconds spent retrieving."""
    counts: dict[str, float] = collections.Counter()

    def on_event(event: str, **_):
        counts[event] += 1

    def on_duration(event: str, duration_secs: float, **_):
        if event == "/jax/compilation_cache/cache_retrieval_time_sec":
            counts["retrieval_s"] += duration_secs

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_listener(on_event)
        jax.monitoring.unregister_event_duration_listener(on_duration)


class JaxVariant:
    """The project's JAX step of one stage on a 1-device mesh."""

    name = "jax"

    def __init__(self, config, *, dtype: str | None, fill_queues: bool, cache_dir: str, tag: str):
        self.config, self.dtype, self.fill_queues, self.cache_dir, self.tag = config, dtype, fill_queues, cache_dir, tag
        self.info: dict[str, Any] = {}

    def setup(self) -> None:
        config = self.config
        if self.dtype:
            config.model.dtype = self.dtype
        self.info["dtype"] = config.model.dtype
        fn, state = build_jax_step(config)
        if self.fill_queues:
            state = fill_jax_queues(state, config.model.num_classes)
        mesh = parallel.make_mesh(jax.devices()[:1])
        step = parallel.data_parallel(fn, mesh)
        self.state = parallel.replicate(state, mesh)
        self.batch = parallel.shard_batch(random_batch(config, np.random.default_rng(0)), mesh)
        log(f"[{self.tag}] lowering ...")
        t0 = time.perf_counter()
        lowered = step.lower(self.state, self.batch)
        t1 = time.perf_counter()
        log(f"[{self.tag}] lowered in {t1 - t0:.1f} s; compiling (cold persistent cache) ...")
        compiled = lowered.compile()
        t2 = time.perf_counter()
        entries = sum(len(files) for _, _, files in os.walk(self.cache_dir))
        log(f"[{self.tag}] compiled in {t2 - t1:.1f} s ({entries} cache entries); "
            f"clear_caches(), lowering + compiling again (warm cache) ...")
        jax.clear_caches()
        t3 = time.perf_counter()
        lowered = step.lower(self.state, self.batch)
        t4 = time.perf_counter()
        with _cache_events() as events:
            self.compiled = lowered.compile()
        t5 = time.perf_counter()
        hits = events["/jax/compilation_cache/cache_hits"]
        log(f"[{self.tag}] warm: lowered in {t4 - t3:.1f} s, compiled in {t5 - t4:.1f} s "
            f"({hits} cache hit(s), {events['retrieval_s']:.1f} s retrieving); first iteration ...")
        self.info.update(lower_s=t1 - t0, compile_s=t2 - t1, warm_lower_s=t4 - t3, warm_compile_s=t5 - t4,
                         cache_entries=entries, warm_cache_hits=hits, warm_cache_retrieval_s=events["retrieval_s"])
        del compiled
        mem = self.compiled.memory_analysis()
        if mem is not None:
            self.info.update(xla_temp_gib=gib(mem.temp_size_in_bytes),
                             xla_argument_gib=gib(mem.argument_size_in_bytes),
                             xla_output_gib=gib(mem.output_size_in_bytes))
        self.info["first_iter_s"] = self.run_once()
        log(f"[{self.tag}] first iteration {self.info['first_iter_s']:.2f} s")

    def run_once(self) -> float:
        t = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - t

    def finish(self) -> dict:
        info = dict(self.info, loss=float(self.metrics["loss"]), device=jax.devices()[0].device_kind,
                    on_gpu=jax.default_backend() == "gpu")
        try:
            stats = jax.devices()[0].memory_stats() or {}
        except Exception:  # noqa: BLE001 - not every backend reports memory
            stats = {}
        if "peak_bytes_in_use" in stats:
            info["device_peak_gib"] = gib(stats["peak_bytes_in_use"])
        xla = [info.get(k) for k in ("xla_temp_gib", "xla_argument_gib", "xla_output_gib")]
        if all(v is not None for v in xla):
            info["peak_memory_gib"] = info.get("device_peak_gib", sum(xla))
            info["memory_kind"] = ("device peak_bytes_in_use" if "device_peak_gib" in info
                                   else "XLA temp + argument + output")
        return info
