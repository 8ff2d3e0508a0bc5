"""What a run reports: progress lines, the machine, each row's figures, the JSON file and the table."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
from typing import Any

import jax

from cpsl_jax.benchmark.flops import BF16_PEAK_FLOPS

VARIANTS = ("jax", "torch-fp32", "torch-bf16", "torch-compile")
TORCH_VARIANTS = VARIANTS[1:]


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def gib(n: float | None) -> float | None:
    return None if n is None else n / 2**30


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


def finish_rows(rows: list[dict]) -> None:
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


def write_json(path: str | None, result: dict) -> None:
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
