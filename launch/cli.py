"""The launchers' edge: every bad input is one or two lines naming it, before any work.

`cli.run(main)` replaces `app.run(main)` in every launcher.  A bad flag, an
unknown config key, a missing file, a damaged checkpoint or a refused rerun
print `SCRIPT: error: ...` (the flag, file or key and the fix) and exit with
status 2; an unexpected failure prints its one line and exits with 1.  Neither
prints the --help text or a traceback, unless --verbose (or the environment
variable MEMRECALL_VERBOSE=1) asks for the traceback.  Library logs that bury
the results (orbax's INFO lines, XLA's backend probes) are quiet unless
--verbose.  A positional argument left after the flags is refused (no launcher takes one).
`readable` and `writable` check paths, `int_list`, `known`, `model_name` and `mesh_axes` flag
values, the same way in every launcher.
"""

from __future__ import annotations

import glob
import logging as py_logging
import os
import re
import sys
import tempfile
import traceback
from typing import Sequence

from absl import app, flags, logging

from memrecall.capacity import gpu_hosts
from memrecall.runtime import paths

VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks and library logs (also: "
                            "MEMRECALL_VERBOSE=1).")
USAGE_EXIT = 2  # bad input: nothing was computed
FAILURE_EXIT = 1  # anything else
_MAX_CHARS = 400


def verbose() -> bool:
  """--verbose (read from argv too: flag parsing may be what failed) or MEMRECALL_VERBOSE=1."""
  return ("--verbose" in sys.argv[1:] or os.environ.get("MEMRECALL_VERBOSE", "") not in ("", "0")
          or (flags.FLAGS.is_parsed() and VERBOSE.value))


def one_line(error: BaseException | str) -> str:
  """An error's message on one line: a traceback inside it (config files) reduced to its last
  line, whitespace collapsed, at most a few hundred characters."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = [lines[0], lines[-1]]
  text = " ".join(" ".join(lines).split()) or type(error).__name__
  return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS - 3] + "..."


def fail(message: str, error: BaseException | None = None, code: int = USAGE_EXIT):
  """Prints `SCRIPT: error: message` (and the traceback if verbose) and exits."""
  if error is not None and verbose():
    traceback.print_exception(error)
  print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  # Not sys.exit: at interpreter shutdown orbax's and asyncio's leftover threads print
  # tracebacks ("Event loop is closed") under the one line; nothing is left to clean up.
  os._exit(code)


_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's help flags print and exit 1: asked-for help is a success
    if e.code == 1 and any(a in _HELP for a in argv[1:]):
      raise SystemExit(0) from None
    raise
  except flags.Error as e:
    message = one_line(e)
    if "positive" in message or "non-negative" in message or "bounded" in message:
      message += " (leave the flag out for its default)"
    fail(f"{message} (--helpshort lists the flags)", e)
  except Exception as e:  # config files and --config.KEY overrides fail inside the parse
    fail(_config_message(e, argv), e)


def _config_message(error: Exception, argv: list[str]) -> str:
  """ml_collections' errors as one line naming the --config flag, file or key at fault."""
  text = one_line(error)
  if "Failed loading config file" in text:
    reason = text[text.find("[Errno"):] if "[Errno" in text else text.split("Attempted")[-1]
    hint = ""
    if "[Errno 2]" in text:  # a path is relative to the working directory, not the repository
      configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs")
      hint = f"; the recipes are in {configs}"
    return f"--config: cannot load the config file ({reason}){hint}"
  if isinstance(error, (AttributeError, KeyError)):
    key = (re.findall(r"[A-Za-z_]\w*", text) or ["?"])[0]
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                 and key in a.split("=")[0].split(".")[1:]), "--config")
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return f"{flag}: unknown config key {key!r}" + (f" (did you mean {hint[1]!r}?)" if hint else "")
  return text


def _quiet_logs() -> None:
  if verbose():
    return
  logging.set_verbosity(logging.ERROR)  # orbax reports every file it reads and writes at INFO
  for name in ("jax._src.xla_bridge", "jax._src.distributed", "absl"):
    py_logging.getLogger(name).setLevel(py_logging.ERROR)


def _accelerator_present() -> bool:
  """Whether this host may have a TPU or GPU: jax's own PCI check for TPU chips (what jax uses
  to decide it runs on a TPU VM), TPU and GPU device nodes, and True when unsure."""
  nodes = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia*", "/dev/dxg", "/dev/kfd")
  if any(glob.glob(pattern) for pattern in nodes):
    return True
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except
    return True


# Compilers for hardware that may be absent: libtpu (the `tpu` extra) and jax's CUDA plugins
# (the `gpu-aot` extra), each launch/compile.py's deviceless compiler.
_ACCELERATOR_PACKAGES = ("libtpu",) + tuple(module for module, _ in gpu_hosts.PLUGINS)


def choose_platform() -> None:
  """The CPU backend on a host with no accelerator, when libtpu or a CUDA plugin is installed
  and the user chose no backend (JAX_PLATFORMS unset).

  libtpu (the `tpu` extra: launch/compile.py's TPU compiler) makes every jax process try to
  start a TPU runtime even where no TPU is attached; libtpu's failed probe of the TPU VM's
  metadata prints warnings to stderr, then jax falls back to the CPU anyway.  A CUDA plugin
  without a GPU prints its failed initialisation's traceback.  Choosing the CPU here gives
  the same backend without the futile probe.  Anything present (a TPU chip, a GPU's device
  nodes) or a JAX_PLATFORMS the user set leaves jax to choose as always.
  """
  compilers = any(gpu_hosts.installed(module) for module in _ACCELERATOR_PACKAGES)
  if "JAX_PLATFORMS" in os.environ or not compilers:
    return
  if _accelerator_present():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"  # read by jax at import, and by child processes
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def run(main) -> None:
  """app.run(main) with one-line errors (see the module doc)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  choose_platform()

  def guarded(argv):
    _quiet_logs()
    _no_positionals(argv[1:])
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if "Failed loading config file" in str(e):  # a --config file is read lazily
        fail(_config_message(e, sys.argv), e)
      if _is_bad_input(e):
        fail(one_line(e), e)
      fail(f"{type(e).__name__}: {one_line(e)} (--verbose shows the traceback)", e, FAILURE_EXIT)

  app.run(guarded, flags_parser=_parse_flags)


def _no_positionals(extra: list[str]) -> None:
  """No launcher takes positional arguments: one left after the flags (`--trace true`, a
  WORKDIR without --workdir=) is a mistake that would otherwise be ignored silently."""
  if extra:
    fail(f"unexpected argument{'s' if len(extra) > 1 else ''} {' '.join(map(repr, extra))}: "
         "give flags as --name=value (--helpshort lists the flags)")


_BAD_INPUT = (app.UsageError, ValueError, OSError, ImportError, LookupError)


def _is_bad_input(error: Exception) -> bool:
  """A bad flag, path, config or checkpoint.  CheckpointError counts only once its module is
  loaded (nothing else raises it): importing it (orbax, jax) for a usage error cost a second."""
  checkpoint = sys.modules.get("memrecall.runtime.checkpoint")
  kinds = _BAD_INPUT + ((checkpoint.CheckpointError,) if checkpoint else ())
  return isinstance(error, kinds)


def readable(flag: str, path: str | None) -> None:
  """A UsageError unless `path` (given to --flag) exists and can be read."""
  if path and not os.path.exists(path):
    raise app.UsageError(f"--{flag}: {path} does not exist")
  if path and not os.access(path, os.R_OK):
    raise app.UsageError(f"--{flag}: {path} is not readable")


def writable(flag: str, path: str | None, directory: bool = False) -> None:
  """A UsageError unless `path` (a file, or a directory when `directory`) can be created or
  written: checked before any work, so a long run never fails at its last step."""
  if not path:
    return
  try:
    path = os.path.abspath(paths.local_path(path))
  except ValueError as e:
    raise app.UsageError(f"--{flag}: {e}") from None
  if directory and os.path.exists(path) and not os.path.isdir(path):
    raise app.UsageError(f"--{flag}: {path} is a file, not a directory")
  if not directory and os.path.isdir(path):
    raise app.UsageError(f"--{flag}: {path} is a directory, not a file")
  if os.path.isfile(path):
    try:  # append mode: opened for writing, nothing changed
      open(path, "ab").close()
    except OSError as e:
      raise app.UsageError(f"--{flag}: cannot write {path} ({e.strerror})") from None
    return
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if existing != path and not os.path.isdir(existing):
    raise app.UsageError(f"--{flag}: {existing} is a file, so {path} cannot be created")
  try:  # a real write: permission bits say nothing for root or on a read-only mount
    tempfile.TemporaryFile(dir=existing).close()
  except OSError:
    raise app.UsageError(f"--{flag}: cannot write in {existing}; choose another path") from None


def mesh_shape(flag: str, spec: str | None) -> dict[str, int] | None:
  """`--FLAG=data=2,fsdp=2,tensor=2` as axis sizes (None when not given); a UsageError naming
  the flag for anything else (the axis names are checked where the mesh is built)."""
  if not spec:
    return None
  try:
    shape = {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(","))}
  except ValueError:
    raise app.UsageError(f"--{flag} must look like 'data=2,fsdp=2,tensor=2', got {spec!r}"
                         ) from None
  mesh_axes(f"--{flag}={spec}", shape)
  return shape


def on_own_devices(load, devices: int, mesh: dict[str, int] | None):
  """load(mesh axis sizes): with `mesh` (a --mesh flag's), else the run's own (None; a run whose
  mesh needs other devices than this process has falls back to every one of them on fsdp,
  with a warning: `run_builder.workdir_run`).  A --mesh these devices cannot form is a one-line
  error."""
  from memrecall.runtime import sharding  # pylint: disable=g-import-not-at-top
  try:
    return load(mesh)
  except sharding.MeshError as e:
    raise app.UsageError(f"{e}: each process runs on its own {devices} device(s); pass --mesh "
                         "with fewer (e.g. --mesh=fsdp=-1, every device on fsdp)") from None


def mesh_axes(what: str, shape: dict[str, int]) -> None:
  """A UsageError naming `what` (a flag, the recipe's mesh) unless every axis size is positive
  or -1, and at most one is -1: jax's own error ("can only specify one unknown dimension")
  names no mesh."""
  if any(v < 1 and v != -1 for v in shape.values()):
    raise app.UsageError(f"{what}: axis sizes are positive (or -1: the rest)")
  if list(shape.values()).count(-1) > 1:
    filled = [k for k, v in shape.items() if v == -1]
    raise app.UsageError(f"{what}: only one axis may be -1 (the rest of the devices), not "
                         f"{', '.join(filled)}")


def int_list(flag: str, values: Sequence[str], minimum: int = 1, empty: bool = True
             ) -> list[int]:
  """--FLAG's comma-separated integers, each at least `minimum` (and at least one unless
  `empty`): a bad entry is named here, not found as a crash deep in the run."""
  try:
    numbers = [int(v) for v in values]
  except ValueError:
    numbers = None
  if numbers is None or any(n < minimum for n in numbers) or not (numbers or empty):
    kind = {0: "non-negative", 1: "positive"}.get(minimum, f">= {minimum}")
    raise app.UsageError(f"--{flag}: {','.join(values) or '(empty)'} is not a list of {kind} "
                         "integers")
  return numbers


def known(flag: str, given: Sequence[str], valid: Sequence[str]) -> None:
  """A UsageError naming --FLAG's unknown entries and the valid ones, before any work."""
  unknown = [name for name in given if name not in valid]
  if unknown:
    raise app.UsageError(f"--{flag}: unknown {unknown}; choose from {', '.join(valid)}")


def model_name(flag: str, name: str, extra: Sequence[str] = ()) -> None:
  """A UsageError naming --FLAG unless `name` is a shape of configs/models.py or one of
  `extra`."""
  from configs import models  # pylint: disable=g-import-not-at-top
  if name in extra:
    return
  try:
    models.model_config(name)
  except ValueError as e:
    raise app.UsageError(f"--{flag}: {e}" + (f", or {', '.join(extra)}" if extra else "")
                         ) from None
