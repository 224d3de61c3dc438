#!/usr/bin/env bash
# One call on an accelerator machine (launch/device_check.py says what it runs):
#   bash launch/device_check.sh [--smoke] [--output_dir=DIR] [--steps=tests,decode,...]
# Runs on the repository's .venv when there is one, else on MEMRECALL_PYTHON or the python3
# on PATH as it is: a GPU image brings jax and flax, and wheels carried in .whl/ bring the
# rest (docs/scaling.md#device-check-launchdevice_checksh).  Nothing is created or downloaded
# here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${MEMRECALL_PYTHON:-}" ]; then
  py=$MEMRECALL_PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
if ! command -v "$py" >/dev/null; then  # bash's own error would name a line, not the variable
  echo "launch/device_check.sh: error: no python at $py (MEMRECALL_PYTHON, or python3)" >&2
  exit 2
fi
exec "$py" launch/device_check.py "$@"
