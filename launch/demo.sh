#!/usr/bin/env bash
# The main job on the embedded default: bash launch/demo.sh [WORKDIR]
# For now: generation with the tiny model (random weights) through the jitted
# KV-cache sampler; the end-to-end pipeline replaces it as it lands.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-workdir/demo}"
source launch/env.sh
memrecall_venv "hf"
mkdir -p "$workdir"
python launch/generate.py --model=tiny --prompt="Long context, short memory." \
  --max_new_tokens=16 --temperature=0.8 --top_p=0.95 --seed=0 \
  --output_json="$workdir/generate.json" --alsologtostderr=false
echo "[memrecall] wrote $workdir/generate.json"
