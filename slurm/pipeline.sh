#!/bin/bash
# Submit a run's whole chain to SLURM: train -> generate -> judge (pairwise, judge, summarize).
#
#   slurm/pipeline.sh CONFIG [key=value ...]              submit; prints the job ids and the run_dir
#   slurm/pipeline.sh CONFIG [key=value ...] --dry-run    print the sbatch commands, submit nothing
#
# Each job waits for the previous one (--dependency=afterok, --kill-on-invalid-dep=yes): when one
# fails, SLURM cancels every later one and nothing downstream runs. Stages already complete with
# this config (a marker with its config hash in <run_dir>/slurm/done/) are skipped; once a stage is
# submitted every later one is too. A run_dir whose training used another config is refused.
# Works from any directory: relative paths (CONFIG, run_dir, data files) are relative to the one
# it is called from, which is also the jobs' working directory.
# Per-stage sbatch options: HHDPO_TRAIN_SBATCH, HHDPO_GENERATE_SBATCH, HHDPO_JUDGE_SBATCH, e.g.
#   HHDPO_TRAIN_SBATCH="-N 4 --ntasks-per-node=8 --gpus-per-node=8 -t 24:00:00" \
#   HHDPO_GENERATE_SBATCH="--gpus-per-node=1" slurm/pipeline.sh configs/llama31_8b.yaml
# and for every stage SLURM's own SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, ...
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help || $# == 0 ]]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
    (($#)) && exit 0 || exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/common.sh
source "$here/common.sh"
export HHDPO_REPO=${HHDPO_REPO:-$(dirname "$here")}  # the sbatch scripts beside this one
hhdpo_find_bin "$HHDPO_REPO"
exec "$HHDPO_PY" -m hhdpo.launch.slurm pipeline "$@"
