#!/usr/bin/env bash
# Runs launch/train.py or launch/eval.py on every worker of a Cloud TPU VM slice.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh train.py \
#       --config=configs/tiny.py:rl --workdir=/gcs/bucket/runs/rl --config.mesh.fsdp=-1
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh eval.py \
#       --config=configs/tiny.py:sft --checkpoint=/gcs/bucket/runs/sft
#
# Every worker runs the same command (JAX's multi-controller model); --distributed
# lets jax.distributed detect the slice by itself.  The repository must be at
# $REMOTE_DIR on every worker (default ~/memrecall; SYNC=1 copies this checkout's files there
# first: the tracked ones and the untracked ones git does not ignore, so no .venv, .git or
# outputs).  Run this script under tmux or nohup: an ssh session that drops makes gcloud run
# the command again.
#
# The workers' environment: MEMRECALL_VENV, MEMRECALL_PYTHON (the workers' stock Python may be
# older than the 3.12 memrecall needs) and MEMRECALL_VERBOSE when set here, and WORKER_ENV, a
# space-separated list of NAME=VALUE (a value without spaces) or NAME (this shell's value, any
# characters), e.g. WORKER_ENV="XLA_FLAGS LIBTPU_INIT_ARGS JAX_TRACEBACK_FILTERING=off".
#
# Preemption: on SIGTERM (a maintenance event or preemption notice) train.py finishes its step,
# every worker saves it, and it exits with status 75; this script then reruns the same command,
# which resumes from that checkpoint (up to MAX_RESUMES times, default 20; a slice that was
# taken away makes the ssh fail instead: rerun this script once the slice is back).
set -uo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR="${REMOTE_DIR:-~/memrecall}"
script="${1:?usage: TPU_NAME=... ZONE=... bash launch/tpu_pod.sh train.py|eval.py [FLAGS...]}"
shift
case "$script" in
  train.py | eval.py) ;;
  *) echo "launch/tpu_pod.sh runs train.py or eval.py (the launchers with --distributed)," \
       "not $script" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)

# The workers' exports, each NAME=VALUE quoted for their shell.
exports="MEMRECALL_VENV=$(printf '%q' "${MEMRECALL_VENV:-.venv}")"
for name in MEMRECALL_PYTHON MEMRECALL_VERBOSE; do
  [ -z "${!name:-}" ] || exports+=" $name=$(printf '%q' "${!name}")"
done
read -ra entries <<< "${WORKER_ENV:-}"
for entry in ${entries[@]+"${entries[@]}"}; do
  name="${entry%%=*}"
  if ! [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    echo "WORKER_ENV: '$entry' is not NAME or NAME=VALUE" >&2; exit 2
  fi
  if [ "$entry" != "$name" ]; then
    value="${entry#*=}"
  elif [ -n "${!name+set}" ]; then
    value="${!name}"
  else
    echo "WORKER_ENV: $name is not set here; export it or write $name=VALUE" >&2; exit 2
  fi
  exports+=" $name=$(printf '%q' "$value")"
done

if [ "${SYNC:-0}" = 1 ]; then
  # One archive of the checkout's files, unpacked into $REMOTE_DIR on every worker: copying the
  # directory carried .venv (its absolute paths break elsewhere), .git and old outputs.
  git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1 || {
    echo "SYNC=1 copies a git checkout's files, and $repo is not one: copy it to" \
      "$REMOTE_DIR on every worker yourself and leave SYNC unset" >&2; exit 2; }
  archive=$(mktemp "${TMPDIR:-/tmp}/memrecall-sync.XXXXXX") || exit 1
  trap 'rm -f "$archive"' EXIT
  (cd "$repo" && git ls-files -z -co --exclude-standard |
     while IFS= read -r -d '' f; do  # not the tracked files deleted in the checkout
       if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
     done | tar -czf "$archive" --null -T -) || { echo "cannot archive $repo" >&2; exit 1; }
  gcloud compute tpus tpu-vm scp --worker=all --zone="$ZONE" "$archive" \
    "$TPU_NAME:memrecall-sync.tar.gz" || exit 1
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
    "mkdir -p $REMOTE_DIR && tar -xzf ~/memrecall-sync.tar.gz -C $REMOTE_DIR && \
     rm ~/memrecall-sync.tar.gz" || exit 1
fi

args=""
[ "$#" -eq 0 ] || args=$(printf ' %q' "$@")
# The workers' environment as launch/env.sh makes it: MEMRECALL_VENV=none runs their Python as
# it is, installing nothing (jax[tpu] included).
install="pip install -q 'jax[tpu]' && "
[ "${MEMRECALL_VENV:-}" = none ] && install=""
max="${MAX_RESUMES:-20}"
for ((attempt = 0; ; attempt++)); do
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
    "cd $REMOTE_DIR && export $exports && source launch/env.sh && \
     memrecall_venv hf,parquet && ${install}python launch/$script --distributed$args"
  rc=$?
  [ "$rc" -eq 75 ] || exit "$rc"
  if [ "$attempt" -ge "$max" ]; then
    echo "[memrecall] preempted again after $max resumes (MAX_RESUMES): stopping; rerun this" \
      "script to resume" >&2
    exit 75
  fi
  echo "[memrecall] preempted (resume $((attempt + 1)) of $max): rerunning $script" >&2
done
