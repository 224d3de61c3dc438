#!/usr/bin/env bash
# Runs the whole test suite in a Python 3.12 virtual environment (.venv at the
# repository root), creating it and installing memrecall[test,hf] if needed.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k sampler`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
memrecall_venv "test,hf,data"
exec python -m pytest -q tests "$@"
