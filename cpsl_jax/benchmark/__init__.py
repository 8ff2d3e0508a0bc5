"""JAX vs PyTorch, side by side: the real training steps of stage 1 and stage 2/3, timed alternately.

    python -m cpsl_jax.benchmark --config=configs/tiny.py --stages stage1,stage2 \\
        --variants jax,torch-fp32,torch-bf16,torch-compile --repeats 5 --out benchmark.json
    python -m cpsl_jax.benchmark --config=configs/gta5.py --batch 2 --crop 224x128 --target-size 512x256

Variants:

* ``jax``: :func:`cpsl_jax.train.steps.stage1_step` / ``distill_step`` compiled by
  :func:`cpsl_jax.train.parallel.data_parallel` on a 1-device mesh (as ``benchmarks/stage_step.py``),
  in the config's ``model.dtype`` (``--jax-dtype`` overrides);
* ``torch-fp32``, ``torch-bf16``, ``torch-compile``: :mod:`cpsl_jax.torch_mirror` in that mode.

Both frameworks get the same random data at the config's shapes (uint8 images at base size,
labels, soft and hard pseudo labels) and, by default, queues that start full (the steady state
of training; ``--empty-queues`` to start empty as a fresh run). Each variant is set up and run
once (compilation, cudnn autotuning: the first-iteration time), then every repeat runs one step
of each variant in turn; a row reports the median.

Per row: ms/step, images/s, speed ratios to each torch mode (images/s of the row / images/s of
that mode), compile figures (JAX: lowering and XLA compilation separately, with a fresh
persistent compilation cache (cold) and again after ``jax.clear_caches()`` from that cache
(warm); torch: the first iteration), memory (JAX: XLA's compiled memory analysis and the device's
peak where it reports one; torch: ``torch.cuda.max_memory_allocated`` on GPUs, the process's peak
RSS on CPUs, which covers everything the process ran so far), dense network FLOPs per step and
the TFLOP/s achieved, and on GPUs the fraction of the bf16 dense peak (:data:`BF16_PEAK_FLOPS`).
Progress is printed as it goes and the JSON is rewritten after every row and repeat, so a run
stopped by a time limit keeps what it measured. A variant that fails gives a row with ``error``.

On a shared CPU, pin the process (``taskset -c 1 python -m cpsl_jax.benchmark ...``): both
frameworks then use one core, and neither pays for threads that wait on a busy core (PyTorch's
OpenMP threads slowed 5-10x under another process's load here, XLA's pool less). On GPUs, all
variants of a stage live in one process: torch's allocator and JAX's (not preallocated, see
below) share the card, so run ``--variants`` in smaller groups where memory is tight.

Only the torch variants import torch.
"""

from __future__ import annotations

import os

# Both frameworks share one GPU here: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cpsl_jax import defaults  # noqa: E402
from cpsl_jax.models.deeplab import ASPP_DILATIONS, EXPANSION, LAYER_GEOMETRY, STAGE_SIZES, output_size  # noqa: E402
from cpsl_jax.train import parallel, steps  # noqa: E402
from cpsl_jax.train import state as state_lib  # noqa: E402
from cpsl_jax.train.io import init_variables  # noqa: E402

VARIANTS = ("jax", "torch-fp32", "torch-bf16", "torch-compile")
TORCH_VARIANTS = VARIANTS[1:]
# Dense bf16 peak of one H100/H200 SXM (../shared/reference/gpu-anchors.md uses the same figure).
BF16_PEAK_FLOPS = 790e12
FLOPS_DEFINITION = ("dense network FLOPs per step: every convolution and linear layer, taps in the padding "
                    "counted; forward + backward = 3x forward for student passes, 1x for the no-grad teacher; "
                    "stage 1 = 3 student passes at the crop + the teacher at base size, stage 2/3 = 2 student "
                    "passes + the teacher at the crop. The CPSL heads (Sinkhorn, queues, contrastive) are not "
                    "counted.")


def log(*parts: Any) -> None:
    print(*parts, flush=True)


# -- configuration --------------------------------------------------------------------------------

def load_config(path: str, stage: str):
    """``get_config(stage)`` of a config file (``configs/gta5.py``)."""
    return defaults.load_config_file(path).get_config(stage)


def parse_wh(text: str) -> tuple[int, int]:
    """``'224x128'`` -> (224, 128): width x height, the order of the config's sizes."""
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def apply_overrides(config, *, batch: int | None = None, crop: str | None = None, target_size: str | None = None,
                    source_size: str | None = None, sets: Sequence[str] = ()) -> None:
    """Shrink a config for a benchmark: batch, crop (WxH), base sizes (WxH), then ``key=value`` pairs.

    A new target base size also sets the source base size (unless given) and scales
    ``data.rescale_base_width`` with it, so the weak view keeps the paper's rescale ratio.
    """
    d = config.data
    if batch:
        d.batch_size = int(batch)
    if crop:
        d.crop_size = parse_wh(crop)
    if target_size:
        w, h = parse_wh(target_size)
        d.rescale_base_width = int(round(d.rescale_base_width * w / d.target_base_size[0]))
        d.target_base_size = (w, h)
        if not source_size:
            d.source_base_size = (w, h)
    if source_size:
        d.source_base_size = parse_wh(source_size)
    for item in sets:
        key, _, text = item.partition("=")
        defaults.set_key(config, key.strip(), text.strip())


# -- data and the JAX step (as benchmarks/stage_step.py) --------------------------------------------

def random_batch(config, rng: np.random.Generator) -> dict:
    """A host batch at the config's shapes: uint8 images at base size, labels, pseudo labels, Lab stats."""
    b = config.data.batch_size
    c = config.model.num_classes
    sw, sh = config.data.source_base_size
    tw, th = config.data.target_base_size
    soft = rng.random((b, c, output_size(th), output_size(tw)), dtype=np.float32)
    return {"source": {"image": rng.integers(0, 256, (b, sh, sw, 3), dtype=np.uint8),
                       "label": rng.integers(0, c, (b, sh, sw)).astype(np.uint8),
                       "target_lab": np.tile(np.array([[50.0, 0.0, 0.0], [20.0, 10.0, 10.0]], np.float32), (b, 1, 1))},
            "target": {"image": rng.integers(0, 256, (b, th, tw, 3), dtype=np.uint8),
                       "soft_label": (soft / soft.sum(1, keepdims=True)).astype(np.float16),
                       "pseudo_label": rng.integers(0, c, (b, th, tw)).astype(np.uint8)}}


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


# -- FLOPs ----------------------------------------------------------------------------------------

def network_flops(config, batch: int, hw: Sequence[int]) -> int:
    """Dense forward FLOPs of the segmenter on (batch, H, W): convolutions and linears, all taps."""
    m = config.model

    def conv(cin, cout, k, h, w):
        return 2 * batch * cout * h * w * cin * k * k

    h, w = (int(hw[0]) - 1) // 2 + 1, (int(hw[1]) - 1) // 2 + 1
    total = conv(3, m.width, 7, h, w)
    h, w = -(-(h - 1) // 2) + 1, -(-(w - 1) // 2) + 1  # ceil-mode max-pool
    inplanes = m.width
    for layer, (blocks, (stride, _)) in enumerate(zip(STAGE_SIZES[m.depth], LAYER_GEOMETRY), start=1):
        planes = m.width * 2 ** (layer - 1)
        for i in range(blocks):
            s = stride if i == 0 else 1
            h, w = (h - 1) // s + 1, (w - 1) // s + 1
            total += conv(inplanes, planes, 1, h, w) + conv(planes, planes, 3, h, w)
            total += conv(planes, planes * EXPANSION, 1, h, w)
            if i == 0:
                total += conv(inplanes, planes * EXPANSION, 1, h, w)
            inplanes = planes * EXPANSION
    head = m.head_width
    cat = head * (len(ASPP_DILATIONS) + 1)
    total += conv(inplanes, head, 1, h, w) + len(ASPP_DILATIONS) * conv(inplanes, head, 3, h, w)
    total += 2 * (2 * batch * cat * (cat // 16))  # squeeze-excitation linears
    total += conv(cat, head, 3, h, w) + conv(head, m.num_classes, 1, h, w)
    return total


def step_flops(config) -> int:
    """Dense network FLOPs of one training step of ``config.stage`` (see :data:`FLOPS_DEFINITION`)."""
    b = config.data.batch_size
    crop = (config.data.crop_size[1], config.data.crop_size[0])
    student = network_flops(config, b, crop)
    if config.stage == "stage1":
        tw, th = config.data.target_base_size
        return 3 * 3 * student + network_flops(config, b, (th, tw))
    return 3 * 2 * student + student


# -- variants -------------------------------------------------------------------------------------

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


def _gib(n: float | None) -> float | None:
    return None if n is None else n / 2**30


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
            self.info.update(xla_temp_gib=_gib(mem.temp_size_in_bytes),
                             xla_argument_gib=_gib(mem.argument_size_in_bytes),
                             xla_output_gib=_gib(mem.output_size_in_bytes))
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
            info["device_peak_gib"] = _gib(stats["peak_bytes_in_use"])
        xla = [info.get(k) for k in ("xla_temp_gib", "xla_argument_gib", "xla_output_gib")]
        if all(v is not None for v in xla):
            info["peak_memory_gib"] = info.get("device_peak_gib", sum(xla))
            info["memory_kind"] = ("device peak_bytes_in_use" if "device_peak_gib" in info
                                   else "XLA temp + argument + output")
        return info


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
            info.update(peak_memory_gib=_gib(self.peak), memory_kind="torch.cuda.max_memory_allocated")
        else:
            info.update(peak_memory_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                        memory_kind="process peak RSS (everything run so far)")
        return info


# -- the benchmark --------------------------------------------------------------------------------

def machine_info() -> dict:
    """Device, CPU, library versions and date of this run."""
    dev = jax.devices()[0]
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                jax_device=dev.device_kind, jax_platform=dev.platform, jax=jax.__version__,
                cpu=cpu, cpu_count=os.cpu_count(), cpu_affinity=len(os.sched_getaffinity(0)),
                python=platform.python_version(), system=platform.platform())
    with contextlib.suppress(ImportError):
        import jaxlib
        info["jaxlib"] = jaxlib.__version__
    with contextlib.suppress(ImportError):
        import flax
        info["flax"] = flax.__version__
    with contextlib.suppress(ImportError):
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info.update(torch_device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version())
    return info


def _finish_rows(rows: list[dict]) -> None:
    """Medians, throughput, FLOP rates and ratios to each torch mode (in place)."""
    for row in rows:
        if row.get("times_s"):
            sec = statistics.median(row["times_s"])
            row.update(ms=1e3 * sec, images_per_s=row["batch"] / sec, tflops_per_s=row["flops"] / sec / 1e12)
            if row.get("on_gpu"):
                row["bf16_peak_fraction"] = row["flops"] / sec / BF16_PEAK_FLOPS
    by_key = {(r["stage"], r["variant"]): r for r in rows}
    for row in rows:
        if "images_per_s" not in row:
            continue
        for tv in TORCH_VARIANTS:
            other = by_key.get((row["stage"], tv))
            if other is not None and other is not row and "images_per_s" in other:
                row[f"speed_vs_{tv}"] = row["images_per_s"] / other["images_per_s"]


def _write(path: str | None, result: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, path)


def _fmt(v, spec: str) -> str:
    """``format(v, spec)``, or a dash of the same width for a missing value."""
    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))


def format_table(rows: list[dict]) -> str:
    """Fixed-width table of the rows."""
    head = (f"{'stage':<7} {'variant':<14} {'ms/step':>9} {'img/s':>8} {'TFLOP/s':>8} {'%bf16pk':>7} "
            f"{'vs t-fp32':>9} {'vs t-bf16':>9} {'vs t-comp':>9} {'peak GiB':>8}  compile / first iteration")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['stage']:<7} {r['variant']:<14} error: {r['error'].splitlines()[-1][:100]}")
            continue
        pk = r.get("bf16_peak_fraction")
        if r["variant"] == "jax":
            comp = (f"lower {r.get('lower_s', 0):.1f} + compile {r.get('compile_s', 0):.1f} s cold, "
                    f"{r.get('warm_lower_s', 0):.1f} + {r.get('warm_compile_s', 0):.1f} s warm "
                    f"({r.get('warm_cache_hits', 0)} hit); "
                    f"first {r.get('first_iter_s', 0):.2f} s")
        else:
            comp = f"first iteration {r.get('first_iter_s', 0):.2f} s"
        lines.append(
            f"{r['stage']:<7} {r['variant']:<14} {_fmt(r.get('ms'), '9.1f')} {_fmt(r.get('images_per_s'), '8.2f')} "
            f"{_fmt(r.get('tflops_per_s'), '8.3f')} {_fmt(None if pk is None else 100 * pk, '7.1f')} "
            f"{_fmt(r.get('speed_vs_torch-fp32'), '9.2f')} {_fmt(r.get('speed_vs_torch-bf16'), '9.2f')} "
            f"{_fmt(r.get('speed_vs_torch-compile'), '9.2f')} {_fmt(r.get('peak_memory_gib'), '8.2f')}  {comp}")
    return "\n".join(lines)


def _release(runners: list) -> None:
    """Free a stage's states and models before the next stage builds its own."""
    runners.clear()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _torch_device(requested: str | None) -> str:
    if requested:
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _stage_config(args: argparse.Namespace, stage: str):
    config = load_config(args.config, stage)
    apply_overrides(config, batch=args.batch, crop=args.crop, target_size=args.target_size,
                    source_size=args.source_size, sets=args.set)
    return config


def _setup_variants(stage: str, variants: list[str], config, args, torch_device, cache_dir, result) -> list:
    """Build, compile and run each variant once; a failure becomes the row's ``error``."""
    rows, flops, runners = result["rows"], step_flops(config), []
    for variant in variants:
        tag = f"{stage}/{variant}"
        row = dict(stage=stage, variant=variant, batch=config.data.batch_size, flops=flops, times_s=[])
        rows.append(row)
        own = config.copy_and_resolve_references()
        if variant == "jax":
            runner = JaxVariant(own, dtype=args.jax_dtype, fill_queues=not args.empty_queues, cache_dir=cache_dir,
                                tag=tag)
        else:
            runner = TorchVariant(variant, own, device=torch_device, fill_queues=not args.empty_queues, tag=tag)
        try:
            runner.setup()
            row.update(runner.info)
            runners.append((runner, row))
        except Exception:  # noqa: BLE001 - a failing variant is a row, not the end of the run
            row["error"] = traceback.format_exc(limit=3)
            log(f"[{tag}] FAILED: {row['error'].strip().splitlines()[-1]}")
        _write(args.out, result)
    return runners


def _time_alternately(stage: str, runners: list, repeats: int, args, result) -> None:
    """``repeats`` rounds of one step per variant, in turn."""
    for r in range(repeats):
        timed = []
        for runner, row in runners:
            if "error" in row:
                continue
            try:
                row["times_s"].append(runner.run_once())
                timed.append(f"{runner.name} {1e3 * row['times_s'][-1]:.1f} ms")
            except Exception:  # noqa: BLE001
                row["error"] = traceback.format_exc(limit=3)
                log(f"[{stage}/{runner.name}] FAILED: {row['error'].strip().splitlines()[-1]}")
        log(f"[{stage}] repeat {r + 1}/{repeats}: " + ", ".join(timed))
        _finish_rows(result["rows"])
        _write(args.out, result)


def _run_stage(stage: str, variants: list[str], args, torch_device, cache_dir, result) -> None:
    config = _stage_config(args, stage)
    d = config.data
    log(f"[{stage}] batch {d.batch_size}, crop {d.crop_size[0]}x{d.crop_size[1]}, target "
        f"{d.target_base_size[0]}x{d.target_base_size[1]}, source {d.source_base_size[0]}x{d.source_base_size[1]}, "
        f"depth {config.model.depth}, queue {config.cpsl.queue_size}; {step_flops(config) / 1e12:.3f} dense TFLOP "
        f"per step")
    runners = _setup_variants(stage, variants, config, args, torch_device, cache_dir, result)
    _time_alternately(stage, runners, args.repeats, args, result)
    for runner, row in runners:
        if "error" not in row:
            row.update(runner.finish())
    _finish_rows(result["rows"])
    _write(args.out, result)
    _release(runners)


def run(args: argparse.Namespace) -> dict:
    """Time every (stage, variant); returns ``{'machine', 'settings', 'rows', ...}`` (also written to ``--out``)."""
    stages = [s for s in args.stages.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    torch_device = _torch_device(args.torch_device) if any(v != "jax" for v in variants) else None
    if torch_device and args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    machine = machine_info()
    result: dict[str, Any] = dict(machine=machine, settings=dict(
        config=args.config, stages=stages, variants=variants, repeats=args.repeats, batch=args.batch, crop=args.crop,
        target_size=args.target_size, source_size=args.source_size, set=list(args.set), jax_dtype=args.jax_dtype,
        queues="empty" if args.empty_queues else "full", torch_device=torch_device,
        torch_threads=args.torch_threads),
        flops_definition=FLOPS_DEFINITION, rows=[])
    on_gpu = machine["jax_platform"] == "gpu" or (torch_device or "").startswith("cuda")
    if on_gpu:
        result["bf16_peak_flops"] = BF16_PEAK_FLOPS
    log(f"# {machine['date']}  JAX on {machine['jax_device']} ({machine['jax_platform']}), torch on {torch_device}, "
        f"CPU {machine['cpu']} x{machine['cpu_affinity']}")
    with fresh_compilation_cache() as cache_dir:
        for stage in stages:
            _run_stage(stage, variants, args, torch_device, cache_dir, result)
    log("")
    log(format_table(result["rows"]))
    log(f"FLOPs: {FLOPS_DEFINITION}" + (f" bf16 peak: {BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s." if on_gpu else ""))
    log("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gta5.py", help="config file; get_config(stage) per stage")
    p.add_argument("--stages", default="stage1,stage2", help="comma-separated: stage1, stage2, stage3")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--out", default=None, help="JSON file, rewritten after every row and repeat")
    p.add_argument("--jax-dtype", default=None, choices=["float32", "bfloat16"], help="JAX compute dtype "
                   "(default: the config's model.dtype)")
    p.add_argument("--batch", type=int, default=None, help="global batch size")
    p.add_argument("--crop", default=None, help="crop WxH (e.g. 224x128)")
    p.add_argument("--target-size", default=None, help="target base size WxH (e.g. 512x256); also the source's")
    p.add_argument("--source-size", default=None, help="source base size WxH")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set cpsl.queue_size=4096 (repeatable)")
    p.add_argument("--empty-queues", action="store_true", help="start from empty queues (default: full)")
    p.add_argument("--torch-device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    try:
        return run(parse_args(argv))
    except (defaults.ConfigError, FileNotFoundError) as err:  # a bad config path or key: say which
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
