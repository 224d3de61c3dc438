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
# One pytest run, its files spread over two workers (pytest-xdist, one per core) for time;
# `-p no:xdist` runs it all in this one process.  The suite once crashed in one process
# (SIGSEGV in XLA's compiler): every compiled program keeps its own memory maps, and they
# reached the kernel's vm.max_map_count (65530).  tests/conftest.py now drops the compiled
# programs after each module, which keeps the process under 28K maps.  The 15 slowest tests
# are listed at the end (the suite's time target is 15 minutes on a 2-core machine).
exec python -m pytest -q -n 2 --dist loadfile --durations=15 tests
