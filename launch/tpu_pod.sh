#!/usr/bin/env bash
# Runs a memrecall launcher on every worker of a Cloud TPU VM slice.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh train.py \
#       --config=configs/tiny.py:rl --workdir=/gcs/bucket/runs/rl --config.mesh.fsdp=-1
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh eval.py \
#       --config=configs/tiny.py:sft --checkpoint=/gcs/bucket/runs/sft
#
# Every worker runs the same command (JAX's multi-controller model); --distributed
# lets jax.distributed detect the slice by itself.  The repository must be at
# $REMOTE_DIR on every worker (set SYNC=1 to copy it there first with scp).
#
# Preemption: on SIGTERM (a maintenance event or preemption notice) train.py finishes its step,
# every worker saves it, and it exits with status 75; this script then reruns the same command,
# which resumes from that checkpoint (up to MAX_RESUMES times, default 20; a slice that was
# taken away makes the ssh fail instead: rerun this script once the slice is back).
set -uo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR="${REMOTE_DIR:-~/memrecall}"
script="${1:?usage: TPU_NAME=... ZONE=... bash launch/tpu_pod.sh LAUNCHER.py [FLAGS...], e.g. train.py}"
shift
[ -f "$(dirname "$0")/$script" ] || { echo "launch/$script does not exist" >&2; exit 2; }
if [ "${SYNC:-0}" = 1 ]; then
  # The checkout's contents into $REMOTE_DIR (made first): copying the directory itself put a
  # second sync in $REMOTE_DIR/<name>/, and the workers kept running the first.
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command "mkdir -p $REMOTE_DIR" || exit 1
  gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" \
    "$(cd "$(dirname "$0")/.." && pwd)/." "$TPU_NAME:$REMOTE_DIR" || exit 1
fi
args=$(printf ' %q' "$@")
# The workers' environment as launch/env.sh makes it: MEMRECALL_VENV=none runs their Python as
# it is, installing nothing (jax[tpu] included).
venv=$(printf '%q' "${MEMRECALL_VENV:-.venv}")
install="pip install -q 'jax[tpu]' && "
[ "${MEMRECALL_VENV:-}" = none ] && install=""
for attempt in $(seq 0 "${MAX_RESUMES:-20}"); do
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
    "cd $REMOTE_DIR && export MEMRECALL_VENV=$venv && source launch/env.sh && \
     memrecall_venv hf,parquet && ${install}python launch/$script --distributed$args"
  rc=$?
  [ "$rc" -eq 75 ] || exit "$rc"
  echo "[memrecall] preempted (resume $((attempt + 1))): rerunning $script" >&2
done
exit 75
