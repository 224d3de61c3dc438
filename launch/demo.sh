#!/usr/bin/env bash
# The main job on the embedded default: bash launch/demo.sh [WORKDIR] [--variant=full]
# Trains the tiny model through every stage (compressor pre-training, SFT warm start,
# RL, gate) and evaluates it from 1x to 256x its training length, on CPU.
# Writes WORKDIR/results.json, stages.json, report.md and PNG plots; a rerun reuses
# finished stages. About 8 minutes on 2 CPU cores, set-up included, up to twice that on a slow
# machine (the full variant: about an hour).  A relative WORKDIR is under the current directory
# (the default, workdir/demo, under the repository's root); a second one is refused, and so is a
# variant's name in its place (`full`: give --variant=full).
set -euo pipefail
refuse() {
  echo "launch/demo.sh: error: $1 (usage: bash launch/demo.sh [WORKDIR] [--variant=full])" >&2
  exit 2
}
absolute() {  # a relative path means the caller's directory, not the repository's
  case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac
}
workdir=""
named=""
flags=()
for arg in "$@"; do
  case "$arg" in
    --workdir=*) flags+=("--workdir=$(absolute "${arg#--workdir=}")") named=1 ;;
    -*) flags+=("$arg") ;;
    default|full)
      refuse "'$arg' is a variant: give --variant=$arg (or ./$arg for a WORKDIR of that name)" ;;
    *) [ -z "$workdir" ] || refuse "unexpected argument '$arg' (WORKDIR is $workdir)"
       workdir=$(absolute "$arg") ;;
  esac
done
[ -z "$workdir" ] || [ -z "$named" ] || refuse "give WORKDIR or --workdir=, not both"
cd "$(dirname "$0")/.."
source launch/env.sh
memrecall_venv "hf,plot"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python launch/demo.py --workdir="${workdir:-workdir/demo}" ${flags[@]+"${flags[@]}"}
