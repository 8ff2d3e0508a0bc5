#!/usr/bin/env bash
# Run the whole CPSL pipeline of a task config, stage after stage, artifacts chained under RUNS.
#
#   bash launch/pipeline.sh CONFIG RUNS [STAGE ...] [-- extra flags for every stage]
#
#   bash launch/pipeline.sh configs/tiny.py runs/tiny          # every stage, tiny network, synthetic data
#   bash launch/pipeline.sh configs/gta5.py runs/gta5 stage1 hard_labels stage2
#
# A stage whose summary.json exists is skipped (delete it to rerun); an interrupted training
# stage resumes from its last checkpoint. Set LAUNCH (e.g. "srun" or a multi-GPU wrapper) to
# prefix every command.
set -euo pipefail
config=${1:?usage: pipeline.sh CONFIG RUNS [STAGE ...] [-- flags]}
runs=${2:?usage: pipeline.sh CONFIG RUNS [STAGE ...] [-- flags]}
shift 2
stages=()
while [[ $# -gt 0 && $1 != "--" ]]; do stages+=("$1"); shift; done
[[ ${1:-} == "--" ]] && shift
if [[ ${#stages[@]} -eq 0 ]]; then
  stages=(warmup soft_labels prototypes stage1 hard_labels stage2 hard_labels_stage2 stage3 eval)
  [[ $config == *tiny.py ]] || stages=(lab_stats "${stages[@]}")
fi
for stage in "${stages[@]}"; do
  workdir="$runs/$stage"
  if [[ -f $workdir/summary.json ]]; then
    echo "== $stage: done ($workdir/summary.json)"; continue
  fi
  echo "== $stage -> $workdir"
  ${LAUNCH:-} python -m cpsl_jax.main --config="$config:$stage,$runs" --workdir="$workdir" "$@"
done
