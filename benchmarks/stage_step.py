"""Time the real training steps (stage 1 with every CPSL term, stage 2/3 distillation) on one device.

The same per-device step functions training runs (augmentation on the device, three student
passes and the teacher in stage 1, Sinkhorn, queues, all losses, the optimizer and EMA),
compiled with ``cpsl_jax.train.parallel`` on a 1-device mesh, on random data at base size.
Prints compile time, median ms per step, images/s and XLA's memory figures as it goes.

    python benchmarks/stage_step.py --config configs/gta5.py --stages stage1 stage2 [--dtype bfloat16]
    python benchmarks/stage_step.py --config configs/tiny.py --dtype float32 --repeats 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from cpsl_jax.benchmark import build_jax_step, load_config, random_batch
from cpsl_jax.train import parallel


def log(*a):
    print(*a, flush=True)


# The config loader, random batch and step builder are the side-by-side benchmark's.
build = build_jax_step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gta5.py")
    p.add_argument("--stages", nargs="+", default=["stage1", "stage2"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dilated-impl", default="space_to_batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--queue-size", type=int, default=0, help="override cpsl.queue_size (0: the config's)")
    p.add_argument("--remat", action="store_true", help="rematerialise every bottleneck block (model.remat)")
    p.add_argument("--scan", action="store_true", help="student passes as one lax.scan (train.scan_passes=True)")
    p.add_argument("--compile-only", action="store_true", help="report compile time and XLA memory, do not run")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dev = jax.devices()[0]
    log(f"# device {dev.device_kind} ({dev.platform}), jax {jax.__version__}, config {a.config}, {a.dtype}, "
        f"dilated convolutions: {a.dilated_impl}")
    rows = []
    for stage in a.stages:
        config = load_config(a.config, stage)
        config.model.dtype, config.model.dilated_impl = a.dtype, a.dilated_impl
        config.data.colour_transfer = config.data.colour_transfer and stage != "stage2"
        config.model.remat, config.train.scan_passes = a.remat, a.scan
        if a.queue_size:
            config.cpsl.queue_size = a.queue_size
        fn, state = build(config)
        mesh = parallel.make_mesh(jax.devices()[:1])
        step = parallel.data_parallel(fn, mesh)
        state = parallel.replicate(state, mesh)
        batch = parallel.shard_batch(random_batch(config, np.random.default_rng(0)), mesh)
        log(f"[{stage}] lowering ...")
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        t1 = time.perf_counter()
        log(f"[{stage}] lowered in {t1 - t0:.1f} s; compiling ...")
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = compiled.memory_analysis()
        gib = lambda name: getattr(mem, name, 0) / 2**30 if mem is not None else float("nan")  # noqa: E731
        temp, args = gib("temp_size_in_bytes"), gib("argument_size_in_bytes")
        # Arguments (the donated state and the batch) + temporaries + outputs not aliased to an argument.
        total = temp + args + gib("output_size_in_bytes") - gib("alias_size_in_bytes")
        log(f"[{stage}] compiled in {t2 - t1:.1f} s; XLA temp {temp:.2f} GiB, arguments {args:.2f} GiB, "
            f"total {total:.2f} GiB (remat={a.remat}, scan={a.scan})")
        if a.compile_only:
            rows.append(dict(stage=stage, lower_s=t1 - t0, compile_s=t2 - t1, temp_gib=temp, argument_gib=args,
                             total_gib=total, remat=a.remat, scan=a.scan))
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(dict(device=dev.device_kind, dtype=a.dtype, rows=rows), f, indent=1)
            continue
        state, m = compiled(state, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t)
        ms = 1e3 * statistics.median(times)
        row = dict(stage=stage, lower_s=t1 - t0, compile_s=t2 - t1, ms=ms, remat=a.remat, scan=a.scan,
                   images_per_s=config.data.batch_size / (ms / 1e3), temp_gib=temp, argument_gib=args,
                   total_gib=total,
                   loss=float(m["loss"]))
        try:
            stats = dev.memory_stats() or {}
            row["device_peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
        except Exception:  # noqa: BLE001 - not every backend reports memory
            pass
        rows.append(row)
        log(f"[{stage}] {ms:.1f} ms/step, {row['images_per_s']:.1f} images/s, loss {row['loss']:.3f}, "
            f"device peak {row.get('device_peak_gib', float('nan')):.2f} GiB")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(device=dev.device_kind, dtype=a.dtype, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
