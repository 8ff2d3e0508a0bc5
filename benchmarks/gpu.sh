#!/usr/bin/env bash
# The whole JAX-vs-PyTorch comparison at the paper's shapes on one GPU, in under 8 minutes.
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# Smaller steps first, each bounded by `timeout`, so that a slow compile cannot hide the rest;
# every command writes its JSON as it goes. JAX_COMPILATION_CACHE_DIR keeps compiled programs
# (and XLA's autotuning) for the next run.
set -uo pipefail
out=${1:?usage: gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/cpsl_jax/jax}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# 1. Stage 2 (the smaller step): JAX bf16 against PyTorch bf16 and fp32.    ~2 min
timeout 150 $py -m cpsl_jax.benchmark --config=configs/gta5.py --stages stage2 --jax-dtype bfloat16 \
  --variants jax,torch-bf16,torch-fp32 --repeats 8 --out "$out/stage2.json"
# 2. Stage 1, the same variants.                                             ~3 min
timeout 210 $py -m cpsl_jax.benchmark --config=configs/gta5.py --stages stage1 --jax-dtype bfloat16 \
  --variants jax,torch-bf16,torch-fp32 --repeats 8 --out "$out/stage1.json"
# 3. Stage 1 with rematerialisation: compile time and memory within 16 GB.   ~1.5 min
timeout 100 $py benchmarks/stage_step.py --config configs/gta5.py --stages stage1 --dtype bfloat16 --remat \
  --repeats 5 --json "$out/stage1_remat.json"
# 4. torch.compile last: its first iteration alone can take minutes.
timeout 60 $py -m cpsl_jax.benchmark --config=configs/gta5.py --stages stage2 --variants torch-compile \
  --repeats 5 --out "$out/stage2_torch_compile.json"
echo "results in $out"
