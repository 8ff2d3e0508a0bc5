#!/usr/bin/env bash
# One machine, every local GPU: JAX uses all visible devices as one data-parallel mesh.
#
#   bash launch/workstation.sh configs/gta5.py:stage1 runs/gta5/stage1 [--config.x=y ...]
#
# CUDA_VISIBLE_DEVICES picks the GPUs; the global batch (data.batch_size, 4 in the paper) must
# divide by their number. The persistent compilation cache makes the second start fast.
set -euo pipefail
config=${1:?usage: workstation.sh CONFIG WORKDIR [flags]}
workdir=${2:?usage: workstation.sh CONFIG WORKDIR [flags]}
shift 2
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/cpsl_jax/xla}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec python -m cpsl_jax.main --config="$config" --workdir="$workdir" "$@"
