#!/usr/bin/env bash
# Runs launch/train.py or launch/eval.py on a SLURM GPU allocation: one process per node, all
# its GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 --cpus-per-task=32 launch/slurm_gpu.sh \
#       train.py --config=configs/tiny.py:rl --workdir=/shared/runs/rl \
#       --config.mesh.fsdp=8 --config.mesh.data=4
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 launch/slurm_gpu.sh eval.py \
#       --config=configs/tiny.py:sft --checkpoint=/shared/runs/sft
#
# jax.distributed reads the coordinator, process count and id from SLURM's environment
# (--distributed), and memrecall gives a process alone on its node every GPU SLURM shows it
# (memrecall/runtime/distributed.py).  The repository, its .venv (built here, on the first
# node, by launch/env.sh, with the CUDA build of jax) and the workdir or output directory must
# be on a file system every node sees.
#
# Preemption: SLURM sends SIGTERM (here 120 s before the time limit too, --signal); train.py
# then finishes its step, saves it and exits with status 75, and this script requeues the job
# (--requeue), which resumes from that checkpoint.  The first task to exit makes srun kill the
# others (--kill-on-bad-exit, so that a crash does not leave them waiting), and srun may then
# report their 137, not 75: each task therefore leaves a marker file when it exits with 75
# (memrecall_task in launch/env.sh), and any marker requeues.
#SBATCH --job-name=memrecall
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=TERM@120
set -uo pipefail
script="${1:?usage: sbatch ... launch/slurm_gpu.sh train.py|eval.py [FLAGS...]}"; shift
case "$script" in
  train.py | eval.py) ;;
  *) echo "launch/slurm_gpu.sh runs train.py or eval.py (the launchers with --distributed)," \
       "not $script" >&2; exit 2 ;;
esac
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit 2
source launch/env.sh
memrecall_venv hf,parquet || exit 1
memrecall_cuda || exit 1
# srun does not inherit sbatch's --cpus-per-task from Slurm 22.05 on: without it a process could
# be bound to one CPU.
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
export MEMRECALL_PREEMPT_MARKER="$PWD/.memrecall-preempted-${SLURM_JOB_ID:-$$}"
rm -f "$MEMRECALL_PREEMPT_MARKER"  # a requeued job keeps its id
srun --kill-on-bad-exit=1 bash -c 'source launch/env.sh && memrecall_task "$@"' memrecall \
  "launch/$script" --distributed "$@"
rc=$?
if [ -e "$MEMRECALL_PREEMPT_MARKER" ]; then
  rm -f "$MEMRECALL_PREEMPT_MARKER"
  rc=75
fi
if [ "$rc" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "[memrecall] preempted: requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
