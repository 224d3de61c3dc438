#!/usr/bin/env bash
# The main job on the embedded default: bash launch/demo.sh [WORKDIR] [--variant=full]
# Trains the tiny model through every stage (compressor pre-training, SFT warm start,
# RL, gate) and evaluates it from 1x to 256x its training length, on CPU.
# Writes WORKDIR/results.json, stages.json, report.md and PNG plots; a rerun reuses
# finished stages. About 8-9 minutes on 2 CPU cores, set-up included (the full variant: about 57).
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-workdir/demo}"
shift || true
source launch/env.sh
memrecall_venv "hf,plot"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python launch/demo.py --workdir="$workdir" "$@"
