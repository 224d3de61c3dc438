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

memrecall_cuda() {  # the CUDA build of jax in the active venv (launch/slurm_gpu.sh)
  # `.[hf]` installs plain jax, whose GPU support is a separate plugin: without it a GPU job runs
  # on the CPU.  Installs jax[cuda13] where the driver supports CUDA 13 (nvidia-smi), else
  # jax[cuda12], at the venv's jax version; MEMRECALL_JAX chooses another requirement (e.g.
  # "jax[cuda12-local]" for the cluster's own CUDA libraries).  A venv with a CUDA plugin, or
  # MEMRECALL_VENV=none, is left as it is.
  [ "${MEMRECALL_VENV:-.venv}" = none ] && return 0
  local cuda version requirement
  if python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("jax_plugins") is None or
      not any(u.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)))' 2>/dev/null; then
    return 0
  fi
  version=$(python -c 'import jax; print(jax.__version__)') || return 1
  cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\).*/\1/p' | head -n 1)
  requirement="jax[cuda$([ "${cuda:-0}" -ge 13 ] && echo 13 || echo 12)]==$version"
  requirement="${MEMRECALL_JAX:-$requirement}"
  echo "[memrecall] the venv's jax has no CUDA plugin: installing $requirement" >&2
  python -m pip install --quiet "$requirement" || {
    echo "[memrecall] cannot install $requirement; set MEMRECALL_JAX to the jax build for" \
      "these GPUs (e.g. jax[cuda12]) or MEMRECALL_VENV=none with an image that has one" >&2
    return 1
  }
}

memrecall_task() {  # one SLURM task of launch/slurm_gpu.sh: python "$@"
  # SLURM signals every process of the step, this shell too: without a trap it would die at
  # once, and srun (--kill-on-bad-exit) would kill the python process mid-checkpoint.  So the
  # signal is passed on and the shell waits.  An exit status of 75 (preempted, its checkpoint
  # saved) touches $MEMRECALL_PREEMPT_MARKER: once one task exits, srun kills the others and may
  # report their 137 instead of 75.
  # A signal before python's pid is known is held and passed on as soon as it is.
  local pid="" held=""
  trap 'if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null; else held=1; fi' TERM INT
  python "$@" &  # (python ignores a passed INT, so INT goes on as TERM)
  pid=$!
  [ -z "$held" ] || kill -TERM "$pid" 2>/dev/null
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done  # a trapped signal ends a wait early
  wait "$pid"  # its exit status, which bash keeps
  local rc=$?
  if [ "$rc" -eq 75 ] && [ -n "${MEMRECALL_PREEMPT_MARKER:-}" ]; then
    touch "$MEMRECALL_PREEMPT_MARKER"
  fi
  return "$rc"
}
