# Sourced by launch/demo.sh, tests/run.sh and the cluster scripts: find Python >= 3.12, then
# create (or reuse) the virtual environment .venv and install memrecall into it.
# Set MEMRECALL_PYTHON to choose the interpreter, MEMRECALL_VENV the location (`none`: use the
# Python on PATH as it is, installing nothing).

memrecall_find_python() {
  local candidates=("${MEMRECALL_PYTHON:-}" python3.12 python3.13 python3)
  for v in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python; do candidates+=("$v"); done
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      echo "$py"; return 0
    fi
  done
  echo "memrecall needs Python >= 3.12 (jax >= 0.11); set MEMRECALL_PYTHON to one." >&2
  return 1
}

memrecall_venv() {  # $1: extras to install, e.g. "test,hf"
  local extras="$1" venv="${MEMRECALL_VENV:-.venv}" py
  if [ "$venv" = none ]; then  # the Python as it is (an image that has the packages)
    return 0
  fi
  local stamp="$venv/.memrecall-installed-$extras"
  if [ ! -x "$venv/bin/python" ]; then
    py=$(memrecall_find_python)
    echo "[memrecall] creating $venv with $py" >&2
    "$py" -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  source "$venv/bin/activate" || { echo "[memrecall] cannot activate $venv" >&2; return 1; }
  if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "[memrecall] installing memrecall[$extras] into $venv" >&2
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -e ".[$extras]"
    touch "$stamp"
  fi
}
