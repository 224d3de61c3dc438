#!/usr/bin/env bash
# Runs a memrecall launcher on a SLURM GPU allocation: one process per node, all its GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 launch/slurm_gpu.sh train.py \
#       --config=configs/tiny.py:rl --workdir=/shared/runs/rl \
#       --config.mesh.fsdp=8 --config.mesh.data=4
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 launch/slurm_gpu.sh eval.py \
#       --config=configs/tiny.py:sft --checkpoint=/shared/runs/sft
#
# jax.distributed reads the coordinator, process count and id from SLURM's
# environment (--distributed); other clusters pass --coordinator_address,
# --num_processes and --process_id instead.  The workdir must be on a file
# system every node sees.
#
# Preemption: SLURM sends SIGTERM (here 120 s before the time limit too, --signal); train.py
# then finishes its step, saves it and exits with status 75, and this script requeues the job
# (--requeue), which resumes from that checkpoint.
#SBATCH --job-name=memrecall
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=TERM@120
set -uo pipefail
script="${1:?usage: sbatch ... launch/slurm_gpu.sh LAUNCHER.py [FLAGS...], e.g. train.py}"; shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
[ -f "launch/$script" ] || { echo "launch/$script does not exist" >&2; exit 2; }
source launch/env.sh
memrecall_venv hf,parquet || exit 1
srun --kill-on-bad-exit=1 python "launch/$script" --distributed "$@"
rc=$?
if [ "$rc" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "[memrecall] preempted: requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
