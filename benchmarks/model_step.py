"""Time the segmenter alone at the paper's shapes: a student training pass and a teacher forward.

Student: forward + backward of DeepLab-v2 ResNet-101 on a (4, 512, 896, 3) crop with batch
statistics (cross-entropy at the output resolution); teacher: eval-mode forward on
(4, 1024, 2048, 3). For each dtype and dilated-convolution formulation it reports compile
time (lowering and XLA compilation separately), median ms per call and images/s, and
XLA's compiled memory analysis. Progress is printed as it goes; run it under ``timeout``.

    python benchmarks/model_step.py [--quick] [--dtypes bfloat16 float32] [--impls space_to_batch native]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cpsl_jax.models import DeepLabV2


def log(*a):
    print(*a, flush=True)


def bench(name, fn, args, repeats):
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    log(f"  {name}: lowered in {t1 - t0:.1f} s, compiled in {t2 - t1:.1f} s")
    mem = compiled.memory_analysis()
    peak = None  # XLA's temp + argument + output bytes: an upper bound of what the call holds, not a measured peak
    if mem is not None:
        peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**30
    jax.block_until_ready(compiled(*args))
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    ms = 1e3 * statistics.median(times)
    return dict(lower_s=t1 - t0, compile_s=t2 - t1, ms=ms, peak_gib=peak)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny network and images (CPU smoke run)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--impls", nargs="+", default=["space_to_batch", "native"])
    p.add_argument("--parts", nargs="+", default=["student", "teacher"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dev = jax.devices()[0]
    log(f"# device: {dev.device_kind} ({dev.platform}), host {platform.machine()}, jax {jax.__version__}")
    if a.quick:
        kw, crop, full, batch = dict(depth=14, width=8, head_width=32), (64, 112), (128, 256), 2
    else:
        kw, crop, full, batch = dict(depth=101), (512, 896), (1024, 2048), 4
    rows = []
    for dtype_name in a.dtypes:
        dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
        for impl in a.impls:
            model = DeepLabV2(num_classes=19, dtype=dtype, dilated_impl=impl, **kw)
            variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 65, 65, 3)), train=False))(jax.random.PRNGKey(0))
            x = jax.random.uniform(jax.random.PRNGKey(1), (batch, *crop, 3))
            xt = jax.random.uniform(jax.random.PRNGKey(2), (batch, *full, 3))
            h, w = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)["logits"].shape[1:3]
            y = jax.random.randint(jax.random.PRNGKey(3), (batch, h, w), 0, 19)

            def student(params, stats, x, y):
                def loss(p):
                    out, mut = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"],
                                           rngs={"dropout": jax.random.PRNGKey(0)})
                    logp = jax.nn.log_softmax(out["logits"])
                    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1)), mut
                (l, mut), g = jax.value_and_grad(loss, has_aux=True)(params)
                return l, g, mut

            def teacher(variables, x):
                return model.apply(variables, x, train=False)["logits"]

            for part in a.parts:
                log(f"[{dtype_name} / {impl} / {part}] compiling ...")
                if part == "student":
                    r = bench(part, student, (variables["params"], variables["batch_stats"], x, y), a.repeats)
                else:
                    r = bench(part, teacher, (variables, xt), a.repeats)
                r.update(dtype=dtype_name, impl=impl, part=part, images_per_s=batch / (r["ms"] / 1e3))
                rows.append(r)
                if a.json:  # after every row: a run stopped by a time limit keeps what it measured
                    with open(a.json, "w") as f:
                        json.dump(dict(device=dev.device_kind, rows=rows), f, indent=1)
                log(f"[{dtype_name} / {impl} / {part}] {r['ms']:.1f} ms/call, {r['images_per_s']:.1f} images/s, "
                    f"compile {r['compile_s']:.1f} s, XLA memory {r['peak_gib'] or float('nan'):.2f} GiB")
    log("\n| dtype | dilated convs | part | ms/call | images/s | lower s | compile s | XLA memory GiB |")
    log("|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(f"| {r['dtype']} | {r['impl']} | {r['part']} | {r['ms']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['peak_gib'] or float('nan'):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
