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

import argparse
import gc
import sys
import traceback
from typing import Any, Sequence

from cpsl_jax import defaults
from cpsl_jax.benchmark.flops import BF16_PEAK_FLOPS, FLOPS_DEFINITION, step_flops
from cpsl_jax.benchmark.inputs import apply_overrides, load_config
from cpsl_jax.benchmark.jax_variant import JaxVariant, fresh_compilation_cache
from cpsl_jax.benchmark.report import VARIANTS, finish_rows, format_table, log, machine_info, write_json
from cpsl_jax.benchmark.torch_variant import TorchVariant


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
        write_json(args.out, result)
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
        finish_rows(result["rows"])
        write_json(args.out, result)


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
    finish_rows(result["rows"])
    write_json(args.out, result)
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
    p = argparse.ArgumentParser(prog="python -m cpsl_jax.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
