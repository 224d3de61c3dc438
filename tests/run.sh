#!/usr/bin/env bash
# Runs the whole test suite in a Python 3.12 virtual environment (.venv at the
# repository root), creating it and installing memrecall[test,hf,data] if needed.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k sampler`.
#
# `bash tests/run.sh --accelerator` runs it in two parts: the numerics tests
# (`-m "numerics and not multidevice"`, tests/conftest.py) on JAX's default backend, the GPU
# or TPU when there is one, then everything else on CPU with its 8 simulated devices; each
# part prints the backend it ran on.  `--accelerator-only` runs the first part alone
# (launch/device_check.sh); MEMRECALL_TEST_WORKERS sets its pytest workers (default 2).
# MEMRECALL_VENV=none uses MEMRECALL_PYTHON or the python3 on PATH as it is (an image that
# has the packages, like the GPU image launch/device_check.sh runs on).
set -euo pipefail
cd "$(dirname "$0")/.."
part=""
case "${1:-}" in
  --accelerator|--accelerator-only) part="$1"; shift ;;
esac
py=python3
if [ "${MEMRECALL_VENV:-}" = none ]; then
  py=${MEMRECALL_PYTHON:-python3}
else
  source launch/env.sh
  memrecall_venv "test,hf,data"
fi
if [ -n "$part" ]; then
  # pytest's 5 (no test selected, e.g. by -k in one part) fails neither part.
  status=0
  record() { [ "$1" -eq 5 ] || status=$1; }
  echo "[run.sh] part 1: the numerics tests on JAX's default backend" >&2
  # Spread by test, not by file: one file (test_recall.py) is most of this part's time.
  MEMRECALL_TEST_BACKEND=default "$py" -m pytest -q -n "${MEMRECALL_TEST_WORKERS:-2}" \
    --dist load -m "numerics and not multidevice" tests "$@" || record $?
  if [ "$part" = --accelerator ]; then
    echo "[run.sh] part 2: the rest on CPU" >&2
    MEMRECALL_TEST_BACKEND=cpu "$py" -m pytest -q -n 2 --dist loadfile --durations=15 \
      -m "not (numerics and not multidevice)" tests "$@" || record $?
  fi
  exit "$status"
fi
if [ "$#" -gt 0 ]; then
  exec "$py" -m pytest -q tests "$@"
fi
# One pytest run, its files spread over two workers (pytest-xdist, one per core) for time;
# `-p no:xdist` runs it all in this one process.  The suite once crashed in one process
# (SIGSEGV in XLA's compiler): every compiled program keeps its own memory maps, and they
# reached the kernel's vm.max_map_count (65530).  tests/conftest.py now drops the compiled
# programs after each module, which keeps the process under 28K maps.  The 15 slowest tests
# are listed at the end (the suite's time target is 15 minutes on a 2-core machine).
exec "$py" -m pytest -q -n 2 --dist loadfile --durations=15 tests
