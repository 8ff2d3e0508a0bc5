#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker (--worker=all).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/gta5.py:stage1 gs://BUCKET/runs/gta5/stage1 [--config.x=y ...]
#
# Each worker installs the project (jax[tpu]) and runs one process; jax.distributed.initialize()
# finds the pod's topology by itself. Datasets must be readable from every worker (a shared
# disk, or TFDS ArrayRecord shards in a bucket: --config.data...). The workdir should be a
# bucket so checkpoints survive the slice.
set -euo pipefail
tpu=${1:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags]}
zone=${2:?}; config=${3:?}; workdir=${4:?}
shift 4
repo=$(basename "$(git rev-parse --show-toplevel)")
gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$(git rev-parse --show-toplevel)" "$tpu":~/
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/$repo && pip install -q -r requirements.txt -e . 'jax[tpu]' &&
  JAX_COMPILATION_CACHE_DIR=~/.cache/cpsl_jax/xla python -m cpsl_jax.main --distributed \
    --config='$config' --workdir='$workdir' $*"
