"""JAX vs PyTorch, side by side: the real training steps of stage 1 and stage 2/3, timed alternately.

    python -m cpsl_jax.benchmark --config=configs/gta5.py --stages stage1,stage2 --out benchmark.json

What a run measures and prints, its variants and flags: :mod:`cpsl_jax.benchmark.cli`, whose
docstring is the ``--help`` text. Only the torch variants import torch.
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
