"""Launcher commands run as `python launch/SCRIPT.py ARGS` would, each in a process forked from
one server that imported JAX, Flax, Orbax and memrecall once.

Tests run launcher commands by the hundred (tests/test_bad_inputs.py's ~90 each stop at their
first check; the launcher tests run whole evaluations and trainings); as fresh interpreters,
importing those packages took 1.5 s of each command on the 2-core machine.  The server imports
them (with nothing printed: `LauncherServer` refuses to start otherwise, since a user's
launcher would print it too), then for each command forks a child that takes the command's
environment, changes to its directory, takes its argv and the interpreter's import path with
the script's folder first, sends file descriptors 1 and 2 to two files, runs the script as
`__main__`, joins its threads, runs the exit handlers and exits with the status the
interpreter would give.  No JAX backend is started before the fork (each child
starts its own, so XLA_FLAGS such as the simulated device count are the command's), and the
server has no thread of its own but numpy's BLAS pool, which is fork-safe.  What was read
from the environment at the server's start (JAX's JAX_* settings, Python's, the BLAS threads',
the temporary directory, the locale: `READ_AT_START`) is the server's: a command whose values
differ is refused by a server, and given its own by the pool.  A command must name its
platform (JAX_PLATFORMS): a launcher's own choice of it before importing JAX comes too late in
a child.

Protocol: one JSON request per line on the server's stdin ({"script", "args", "cwd", "env",
"timeout"}), one JSON reply per line on its stdout ({"code", "stdout", "stderr"}).
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

# What every launcher imports before it reads a flag: importing these is what the fork saves.
PRELOADED = ("numpy", "jax", "jax.numpy", "flax", "flax.linen", "optax", "orbax.checkpoint",
             "absl.app", "absl.flags", "absl.logging", "ml_collections", "memrecall.run_builder",
             "memrecall.evaluate.evaluator", "memrecall.train.trainer")


# Environment variables read when the server starts (at import, or cached then), by prefix or
# name; XLA_FLAGS is not: each child's backend reads it when it starts.
READ_AT_START = ("JAX_", "PYTHON", "TF_CPP_", "OMP_", "OPENBLAS_", "MKL_", "LC_", "LANG",
                 "TMPDIR")


def _read_at_start(env: dict) -> dict:
  return {k: v for k, v in env.items() if k.startswith(READ_AT_START)}


class LauncherServer:
  """A server process started with `env`; `run` one command at a time, `close` at the end."""

  def __init__(self, env: dict):
    if "JAX_PLATFORMS" not in env:
      raise ValueError("a launcher server's commands name their platform (JAX_PLATFORMS): a "
                       "launcher's own choice, made before it imports JAX, would come too late in "
                       "a forked child; run such a command as a fresh process")
    self._env = dict(env)
    self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = json.loads(self._proc.stdout.readline() or "null")
    if not ready or ready.get("import_output"):
      self.close()
      raise RuntimeError("the launcher server did not start cleanly: importing "
                         f"{', '.join(PRELOADED)} printed {ready and ready['import_output']!r}")

  def run(self, script: str, args: list[str], cwd: str, timeout: float = 300,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """`python script *args` run in `cwd` with `env` (the server's by default): its exit
    status, stdout and stderr, as `subprocess.run(..., capture_output=True, text=True)` gives."""
    env = self._env if env is None else env
    ours, theirs = _read_at_start(self._env), _read_at_start(env)
    if ours != theirs:
      differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
      raise ValueError(f"{', '.join(differ)} were read when this server started: start one with "
                       "the command's environment (`LauncherPool` does)")
    self._proc.stdin.write(json.dumps({"script": script, "args": args, "cwd": cwd,
                                       "env": dict(env), "timeout": timeout}) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the launcher server exited (status {self._proc.wait()}) running "
                         f"{script} {' '.join(args)}")
    reply = json.loads(line)
    return subprocess.CompletedProcess([sys.executable, script, *args], reply["code"],
                                       reply["stdout"], reply["stderr"])

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait(timeout=60)


class LauncherPool:
  """Servers by the commands' `READ_AT_START` variables, each started at its first command:
  `run` takes any environment that names its platform."""

  def __init__(self):
    self._servers: dict[tuple, LauncherServer] = {}

  def run(self, script: str, args: list[str], cwd: str, env: dict, timeout: float = 300
          ) -> subprocess.CompletedProcess:
    key = tuple(sorted(_read_at_start(env).items()))
    if key not in self._servers:
      self._servers[key] = LauncherServer(env)
    return self._servers[key].run(script, args, cwd, timeout, env)

  def close(self) -> None:
    for server in self._servers.values():
      server.close()
    self._servers.clear()


_POOL = LauncherPool()
atexit.register(_POOL.close)


def run(script: str, args: list[str], env: dict, cwd: str | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess:
  """`subprocess.run([sys.executable, script, *args], env=env, cwd=cwd, capture_output=True,
  text=True)` through this process's servers (a timeout: status -9, not an exception)."""
  return _POOL.run(script, list(args), cwd or os.getcwd(), env, timeout)


def _exit_status(exit: SystemExit) -> int:
  """The status the interpreter gives for an uncaught SystemExit (a message: printed, 1)."""
  if exit.code is None:
    return 0
  if isinstance(exit.code, int):
    return exit.code
  print(exit.code, file=sys.stderr)
  return 1


def _child(request: dict, stdout_path: str, stderr_path: str, interpreter_path: list[str]
           ) -> None:
  """Runs one request in this forked process and never returns."""
  import atexit
  import runpy
  import traceback
  code = 1
  try:
    for fd, path in ((1, stdout_path), (2, stderr_path)):
      os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # fd 0 is the server's protocol
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = [request["script"], *request["args"]]
    # The script's folder first, then the interpreter's own path (not the server's additions).
    sys.path[:] = [os.path.dirname(os.path.abspath(request["script"]))] + interpreter_path[1:]
    try:
      runpy.run_path(request["script"], run_name="__main__")
      code = 0
    except SystemExit as exit:
      code = _exit_status(exit)
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
    # As the interpreter ends: its other (non-daemon) threads joined, then the exit handlers.
    import threading
    threading._shutdown()  # pylint: disable=protected-access
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def _wait(pid: int, timeout: float) -> int:
  """The child's exit status; killed (-9) after `timeout` seconds."""
  import time
  deadline = time.monotonic() + timeout
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    if time.monotonic() > deadline:
      os.kill(pid, 9)
      return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    time.sleep(0.01)


def serve() -> None:
  import importlib
  import warnings
  # fork() in a process with numpy's BLAS thread warns (DeprecationWarning) on Python 3.12.
  warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
  protocol = os.fdopen(os.dup(1), "w")
  # Not a TemporaryDirectory: its clean-up runs at exit, and the children run the exit handlers.
  scratch = tempfile.mkdtemp(prefix="memrecall-launcher-server-")
  output_path, stdout_path, stderr_path = (os.path.join(scratch, name)
                                           for name in ("output", "stdout", "stderr"))
  try:
    for path in (output_path, stdout_path, stderr_path):
      with open(path, "w"):
        pass
    saved = os.dup(1), os.dup(2)
    fd = os.open(output_path, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    interpreter_path = list(sys.path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for module in PRELOADED:
      importlib.import_module(module)
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge._backends:  # pylint: disable=protected-access
      raise RuntimeError("importing the launchers' packages started a JAX backend: its threads "
                         "would not survive a fork")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    protocol.write(json.dumps({"import_output": open(output_path).read()}) + "\n")
    protocol.flush()
    for line in sys.stdin:
      request = json.loads(line)
      pid = os.fork()
      if pid == 0:
        _child(request, stdout_path, stderr_path, interpreter_path)
      code = _wait(pid, request["timeout"])
      read = lambda path: open(path, errors="replace").read()
      protocol.write(json.dumps({"code": code, "stdout": read(stdout_path),
                                 "stderr": read(stderr_path)}) + "\n")
      protocol.flush()
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  serve()
