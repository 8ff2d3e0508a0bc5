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

# inputs: the config and a random batch; flops: the analytic count; jax_variant, torch_variant:
# one framework's step each; report: rows, JSON, table, machine; cli: the run and its flags.
from cpsl_jax.benchmark.cli import main, parse_args, run  # noqa: E402
from cpsl_jax.benchmark.flops import BF16_PEAK_FLOPS, FLOPS_DEFINITION, network_flops, step_flops  # noqa: E402
from cpsl_jax.benchmark.inputs import apply_overrides, load_config, parse_wh, random_batch  # noqa: E402
from cpsl_jax.benchmark.jax_variant import (  # noqa: E402
    JaxVariant,
    build_jax_step,
    fill_jax_queues,
    fresh_compilation_cache,
)
from cpsl_jax.benchmark.report import TORCH_VARIANTS, VARIANTS, format_table, machine_info  # noqa: E402
from cpsl_jax.benchmark.torch_variant import TorchVariant  # noqa: E402

__all__ = [
    "BF16_PEAK_FLOPS",
    "FLOPS_DEFINITION",
    "TORCH_VARIANTS",
    "VARIANTS",
    "JaxVariant",
    "TorchVariant",
    "apply_overrides",
    "build_jax_step",
    "fill_jax_queues",
    "format_table",
    "fresh_compilation_cache",
    "load_config",
    "machine_info",
    "main",
    "network_flops",
    "parse_args",
    "parse_wh",
    "random_batch",
    "run",
    "step_flops",
]
