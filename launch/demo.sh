#!/usr/bin/env bash
# The main job on the embedded default: bash launch/demo.sh [WORKDIR] [--variant=full]
# Trains the tiny model through every stage (compressor pre-training, SFT warm start,
# RL, gate) and evaluates it from 1x to 256x its training length, on CPU.
# Writes WORKDIR/results.json, stages.json, report.md and PNG plots; a rerun reuses
# finished stages. About 8 minutes on 2 CPU cores, set-up included, up to twice that on a slow
# machine (the full variant: about an hour).
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=workdir/demo
if [ "$#" -gt 0 ] && [[ "$1" != -* ]]; then  # `--variant=full` alone keeps the default workdir
  workdir="$1"
  shift
fi
source launch/env.sh
memrecall_venv "hf,plot"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python launch/demo.py --workdir="$workdir" "$@"
