"""Time the network's dilated 3x3 convolutions alone: XLA native, XLA space-to-batch, PyTorch.

XLA has been reported to lower dilated convolutions on GPU as padded convolutions, far
slower than cuDNN's dilated kernels. This script times each dilated convolution shape of
DeepLab-v2 (layer3 at rate 2, layer4 at rate 4, the head at 6-24; student 65x113 and
teacher 129x257 maps, batch 4) forward + backward, three ways, and prints a table.

    python benchmarks/dilated_conv.py [--quick] [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cpsl_jax import ops

# (name, cin, cout, rate) of the dilated convolutions, and the map sizes they run at.
SHAPES = [("layer3", 256, 256, 2), ("layer4", 512, 512, 4), ("head-6", 2048, 256, 6),
          ("head-12", 2048, 256, 12), ("head-18", 2048, 256, 18), ("head-24", 2048, 256, 24)]
MAPS = {"student": (65, 113), "teacher": (129, 257)}


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_jax(impl, batch, hw, cin, cout, rate, dtype, repeats):
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (batch, *hw, cin), dtype)
    k = (jax.random.normal(key, (3, 3, cin, cout), jnp.float32) * 0.01).astype(dtype)

    def conv(x, k):
        if impl == "native":
            return lax.conv_general_dilated(x, k, (1, 1), ((rate, rate), (rate, rate)), rhs_dilation=(rate, rate),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return ops.conv_dilated_space_to_batch(x, k, rate)

    step = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k).astype(jnp.float32) ** 2), argnums=(0, 1)))
    t0 = time.perf_counter()
    compiled = step.lower(x, k).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(x, k))
    return _median_ms(lambda: jax.block_until_ready(compiled(x, k)), repeats), compile_s


def time_torch(batch, hw, cin, cout, rate, dtype, repeats):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    x = torch.randn(batch, cin, *hw, device=dev).to(memory_format=torch.channels_last).requires_grad_(True)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=rate, dilation=rate, bias=False).to(dev).to(memory_format=torch.channels_last)
    use_bf16 = dtype == jnp.bfloat16

    def run():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=use_bf16):
            y = conv(x)
        (y.float() ** 2).sum().backward()
        if dev == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        run()
    return _median_ms(run, repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny channel counts and one map size (for a CPU smoke run)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args()
    dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    shapes = [(n, max(8, ci // 64), max(8, co // 64), r) for n, ci, co, r in SHAPES] if a.quick else SHAPES
    maps = {"student": (17, 29)} if a.quick else MAPS
    dev = jax.devices()[0]
    print(f"# dilated convolutions, forward+backward, batch 4, {a.dtype}; device: {dev.device_kind} ({dev.platform}); "
          f"host: {platform.processor() or platform.machine()}; jax {jax.__version__}", flush=True)
    print(f"{'conv':10s} {'map':8s} {'xla native ms':>14s} {'xla s2b ms':>11s} {'torch ms':>9s} {'s2b/native':>10s} {'compile native/s2b s':>21s}", flush=True)
    rows = []
    for map_name, hw in maps.items():
        for name, cin, cout, rate in shapes:
            nat, c_nat = time_jax("native", 4, hw, cin, cout, rate, dtype, a.repeats)
            s2b, c_s2b = time_jax("s2b", 4, hw, cin, cout, rate, dtype, a.repeats)
            tor = float("nan")
            if not a.no_torch:
                try:
                    tor = time_torch(4, hw, cin, cout, rate, dtype, a.repeats)
                except ImportError:
                    pass
            rows.append(dict(conv=name, map=map_name, hw=hw, cin=cin, cout=cout, rate=rate, xla_native_ms=nat,
                             xla_s2b_ms=s2b, torch_ms=tor, compile_native_s=c_nat, compile_s2b_s=c_s2b))
            print(f"{name:10s} {map_name:8s} {nat:14.2f} {s2b:11.2f} {tor:9.2f} {s2b / nat:10.2f} {c_nat:10.1f}/{c_s2b:.1f}", flush=True)
            if a.json:  # after every row: a run stopped by a time limit keeps what it measured
                with open(a.json, "w") as f:
                    json.dump(dict(device=dev.device_kind, dtype=a.dtype, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
