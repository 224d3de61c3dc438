#!/usr/bin/env bash
# Runs the whole test suite in a Python 3.12 virtual environment (.venv at the
# repository root), creating it and installing memrecall[test,hf,data] if needed.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k sampler`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
memrecall_venv "test,hf,data"
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q tests "$@"
fi
# Two runs: in one process, XLA's CPU compiler has crashed (SIGSEGV) compiling a recall
# function in tests/test_recall.py after the ~270 tests before it, never in a shorter run.
# The first run spreads its files over two workers (pytest-xdist, one per core).
python -m pytest -q -n 2 --dist loadfile tests --ignore=tests/test_recall.py
python -m pytest -q tests/test_recall.py
