#!/usr/bin/env bash
# Regenerates docs/compile/: every 7B recipe compiled for its TPU slice by launch/compile.py
# (deviceless, libtpu installed), and the GPU recipes for one host of 8 H100s where jax's CUDA
# plugin is installed (the gpu-aot extra), then launch/plan.py's estimate beside each record.
# Hours of CPU (a 7B program takes minutes to tens of minutes).  Extra arguments go to every
# compile, e.g. --programs=train_step.
#
# Evaluation's programs depend on the model and the evaluation length only: they are compiled
# with the rl recipe (32K-token documents; the same programs for sft and gate) and with the
# compressor recipe (its one-chunk documents).  They place the weights as launch/eval.py's
# --weights=auto would on the target (replicated on a v5p chip and an H100; on 16 GiB v5e chips,
# split over a tensor axis of 4), on one process's devices as launch/eval.py runs them (one
# host: 4 chips of a v5p-64); the *_sharded_eval records are the same programs with the
# weights sharded by training's rules, for comparison, and *_tensor_rollout the RL rollout with
# rl.rollout_weights=tensor.
# PYTHON: the interpreter (default: the repository's .venv with the test, tpu and gpu-aot
# extras, made as launch/env.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  source launch/env.sh
  memrecall_venv test,tpu,gpu-aot
  PYTHON=python
fi
out=docs/compile
mkdir -p "$out"
compile() {  # recipe, then compile.py flags (a --topology=CARD:N names the record after it)
  local recipe=$1 name status=0 hosts
  shift
  name=$(echo "$recipe" | sed 's/\.py:/_/; s/,/_/g')
  hosts=$(printf '%s\n' "$@" | sed -n 's/^--topology=\([a-z0-9]*\):\(.*\)$/_\1-\2/p')
  weights=$(printf '%s\n' "$@" | sed -n 's/^--weights=\(sharded\|replicated\|tensor\)$/_\1_eval/p')
  rollout=$(printf '%s\n' "$@" | sed -n 's/^--config\.rl\.rollout_weights=\([a-z]*\)$/_\1_rollout/p')
  name=$name$hosts$weights$rollout
  echo "[compile_recipes] $recipe" >&2
  "$PYTHON" launch/compile.py --config="configs/$recipe" --output_json="$out/$name.json" "$@" \
    || status=$?
  # 3: compiled, and some program does not fit (its row says by how much).
  [ "$status" -eq 0 ] || [ "$status" -eq 3 ] || exit "$status"
}
compile lychee.py:compressor,7b,v5p-64 "$@"
compile lychee.py:sft,7b,v5p-64 --eval_modes= "$@"
compile lychee.py:rl,7b,v5p-64 "$@"
compile lychee.py:gate,7b,v5p-64 --eval_modes= "$@"
compile memagent.py:sft,7b,v5p-64 "$@"
compile memagent.py:rl,7b,v5p-64 "$@"
compile lychee.py:rl,7b,v5p-64 --weights=sharded --programs=eval_recall_gate,answer_stream "$@"
compile lychee.py:compressor,7b,v5p-64 --weights=sharded --programs=eval_recall_gate,answer_stream "$@"
# The RL rollout with its inference copy split over a tensor axis of training's devices.
compile lychee.py:rl,7b,v5p-64 --config.rl.rollout_weights=tensor --programs=rollout "$@"
compile memagent.py:rl,7b,v5p-64 --config.rl.rollout_weights=tensor --programs=rollout "$@"
# Evaluation alone on one v5e host of 4 chips (7B training does not fit 16 GiB chips; libtpu
# 0.0.50.1 stops on an internal error compiling it with --weights=sharded there).
compile lychee.py:rl,7b,auto --topology=v5e:2x2 --programs=eval_recall_gate,answer_stream "$@"
if "$PYTHON" -c "from memrecall.capacity import gpu_hosts; assert gpu_hosts.plugin()" 2>/dev/null
then
  compile lychee.py:compressor,7b,gpu8 --topology=h100:8 "$@"
  compile lychee.py:sft,7b,gpu8 --topology=h100:8 --eval_modes= "$@"
  compile lychee.py:rl,7b,gpu8 --topology=h100:8 "$@"
  compile lychee.py:gate,7b,gpu8 --topology=h100:8 --eval_modes= "$@"
  compile memagent.py:sft,7b,gpu8 --topology=h100:8 "$@"
  compile memagent.py:rl,7b,gpu8 --topology=h100:8 "$@"
  compile lychee.py:rl,7b,gpu8 --topology=h100:8 --weights=sharded \
    --programs=eval_recall_gate,answer_stream "$@"
  compile lychee.py:compressor,7b,gpu8 --topology=h100:8 --weights=sharded \
    --programs=eval_recall_gate "$@"
  compile lychee.py:rl,7b,gpu8 --topology=h100:8 --config.rl.rollout_weights=tensor \
    --programs=rollout "$@"
  compile memagent.py:rl,7b,gpu8 --topology=h100:8 --config.rl.rollout_weights=tensor \
    --programs=rollout "$@"
else
  echo "[compile_recipes] no CUDA plugin (pip install -e .[gpu-aot]): GPU recipes not compiled" >&2
fi
"$PYTHON" launch/plan.py --all --records="$out"
