"""Shared test setup: the backend (8 simulated CPU devices unless asked), markers, fixture paths.

MEMRECALL_TEST_BACKEND (read here, before jax is imported) picks where the tests run:
`cpu` (the default) pins JAX to the CPU with 8 simulated devices, as every test expects;
`default` leaves JAX its default backend, the GPU or TPU when one is present.
`bash tests/run.sh --accelerator` runs the `numerics` tests that way, except those marked
`multidevice`, and everything else on CPU.
"""

import os
import sys
from typing import Any, NamedTuple

BACKEND = os.environ.get("MEMRECALL_TEST_BACKEND", "cpu")
if BACKEND not in ("cpu", "default"):
  raise ValueError(f"MEMRECALL_TEST_BACKEND={BACKEND!r}: use cpu or default")
# Most of XLA's optimisation of CPU code off in test processes and the launchers they start
# (`jax_disable_most_optimizations`: the backend at O0, LLVM's expensive passes off): the suite
# compiles hundreds of programs at tiny shapes, where that optimisation is much of the compile
# time (30% of test_recall.py's CPU seconds) and buys nothing measurable.  Only code generation
# changes (the same HLO, no fast-math).  It is a per-compile setting, so the modules in
# OPTIMISED_MODULES, which run their compiled programs long enough to pay the optimisation
# back, compile with XLA's defaults (`_compiler_effort`).  The device check's and the benchmark
# scripts' tests keep it too: they check the path, and their numbers are read by people, not
# asserted.
FAST_CPU_COMPILE = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
# Measured 2026-12-05 (CPU seconds by module, the whole suite with and without): only
# test_resumable_outputs ran faster optimised (129 against 215 s); every other module slower.
# It still does on one device (2026-12-06, the module alone: 32 against 34 s).
OPTIMISED_MODULES = frozenset({"test_resumable_outputs"})


def cpu_env(devices: int = 1) -> dict:
  """The environment of a test's JAX subprocess: the CPU, `devices` simulated devices."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", **FAST_CPU_COMPILE,
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def xla_defaults_env() -> dict:
  """The environment of a subprocess that times or compiles for real (benchmarks, the TPU
  compiler): the CPU with XLA's default devices and optimisation."""
  return {**{k: v for k, v in os.environ.items() if k not in FAST_CPU_COMPILE},
          "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if BACKEND == "cpu":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  for _name, _value in FAST_CPU_COMPILE.items():
    os.environ.setdefault(_name, _value)
else:  # an accelerator's tests compile with its defaults
  # pytest-xdist's workers share one accelerator: each takes memory as it needs it rather
  # than JAX's default 75% of the card up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One persistent compilation cache per test run, shared by pytest-xdist's workers and every
# launcher subprocess a test starts (they inherit this environment from the process that
# started the run): the suite compiles the same tiny-model programs in dozens of processes,
# and a cache hit skips XLA's compiler.  The directory is new for each run, so no run reads
# programs another run compiled, and is removed at its end.  A JAX_COMPILATION_CACHE_DIR
# already set is used as it is and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="memrecall-tests-jax-cache-")
  os.environ["MEMRECALL_TEST_JAX_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# Outputs of the public LycheeMemory code, made with its own code (each folder's README says
# how): `../shared/fixtures` beside the checkout, where CI puts them, else a `shared/fixtures`
# inside it (a copy carried to a device machine, where only the checkout travels; git ignores
# it), or MEMRECALL_SHARED_FIXTURES.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FIXTURES = os.environ.get("MEMRECALL_SHARED_FIXTURES") or next(
    (path for path in (os.path.normpath(os.path.join(_ROOT, "..", "shared", "fixtures")),
                       os.path.join(_ROOT, "shared", "fixtures")) if os.path.isdir(path)),
    os.path.normpath(os.path.join(_ROOT, "..", "shared", "fixtures")))
LYCHEE_TEXT = os.path.join(SHARED_FIXTURES, "lychee_reference_text")


def _libtpu_installed() -> bool:
  from memrecall.capacity import tpu_slices  # pylint: disable=g-import-not-at-top
  return tpu_slices.libtpu_version() is not None


needs_libtpu = pytest.mark.skipif(not _libtpu_installed(),
                                  reason="libtpu is not installed (the `test` and `tpu` extras "
                                  "install it): no deviceless TPU compiler")


def _compiles_for_an_h100() -> bool:
  """A CUDA plugin that carries the H100's target config (older plugins carry none)."""
  from memrecall.capacity import gpu_hosts  # pylint: disable=g-import-not-at-top
  if gpu_hosts.plugin() is None:
    return False
  try:
    gpu_hosts.target_config(gpu_hosts.parse_gpu_hosts("h100:1"))
  except gpu_hosts.GpuTargetError:
    return False
  return True


needs_cuda_plugin = pytest.mark.skipif(not _compiles_for_an_h100(),
                                       reason="no CUDA plugin carrying the H100's target "
                                       "config (the `gpu-aot` extra installs one): no "
                                       "deviceless GPU compiler")


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true",
                   help="also run the tests marked slow (the learning test, minutes on a CPU)")


# The modules whose tests check numbers: against float64 loops, the public reference's
# fixtures (lychee_reference, hf_reference) or each other.  `run.sh --accelerator` runs them
# on the accelerator.  test_answer_launcher also reads the fixtures, but through launcher
# subprocesses that run on CPU whatever this process does.
NUMERICS_MODULES = frozenset({
    "test_attention", "test_baselines", "test_compressor", "test_gate", "test_hf_checkpoint",
    "test_memory_bank", "test_model", "test_reasoner", "test_recall", "test_sampling",
    "test_sharding"})

# What multidevice tests need: the simulated CPU devices this file asks for.
DEVICES_NEEDED = 8


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: minutes of training; run with --slow (nightly)")
  config.addinivalue_line("markers", "numerics: compares numbers (conftest.NUMERICS_MODULES); "
                          "run on the accelerator by `run.sh --accelerator`")
  config.addinivalue_line("markers", f"multidevice: needs {DEVICES_NEEDED} devices (meshes, "
                          "sharding); skipped with fewer")


def _devices() -> str:
  import jax
  devices = jax.devices()
  return (f"jax {jax.__version__}, backend {jax.default_backend()}: {len(devices)} x "
          f"{devices[0].device_kind} (MEMRECALL_TEST_BACKEND={BACKEND})")


def pytest_report_header(config):
  return f"memrecall tests on {_devices()}"


def pytest_terminal_summary(terminalreporter):
  """The backend again at the end, where `-q` runs (tests/run.sh) show it."""
  terminalreporter.write_line(f"memrecall tests ran on {_devices()}")
  if not os.path.isdir(SHARED_FIXTURES):
    terminalreporter.write_line(f"{SHARED_FIXTURES} is missing: the tests that compare with the "
                                "public reference's outputs fail without it (docs/testing.md)")


# The longest files (minutes each on the 2-core machine) run first: `run.sh` spreads files over
# two workers as they free up, and one of these started last kept a worker busy for minutes
# after the other had finished.  Within and among the other files the order is pytest's.
LONGEST_FIRST = ("test_multihost.py", "test_demo.py", "test_device_check.py",
                 "test_multiprocess_eval.py", "test_launchers.py", "test_hlo_report.py")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers added here
def pytest_collection_modifyitems(config, items):
  rank = lambda item: (LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
                       else len(LONGEST_FIRST))
  items.sort(key=rank)  # stable: each file's tests stay together and in order
  for item in items:
    if item.module.__name__.rpartition(".")[2] in NUMERICS_MODULES:
      item.add_marker(pytest.mark.numerics)
  if any("multidevice" in item.keywords for item in items):
    import jax
    if jax.device_count() < DEVICES_NEEDED:
      few = pytest.mark.skip(reason=f"needs {DEVICES_NEEDED} devices, {jax.default_backend()} has "
                             f"{jax.device_count()} (tests/run.sh runs it on simulated CPU ones)")
      for item in items:
        if "multidevice" in item.keywords:
          item.add_marker(few)
  if config.getoption("--slow"):
    return
  skip = pytest.mark.skip(reason="slow: run with `bash tests/run.sh --slow -k test_learning`")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def pytest_unconfigure(config):
  """Removes this run's compilation cache, in the process that made it (not in a worker)."""
  if os.environ.get("MEMRECALL_TEST_JAX_CACHE_OWNER") != str(os.getpid()):
    return
  import shutil
  shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _compiler_effort(request):
  """XLA's default optimisation for the modules in OPTIMISED_MODULES (see FAST_CPU_COMPILE)."""
  if request.module.__name__.rpartition(".")[2] not in OPTIMISED_MODULES:
    yield
    return
  import jax
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations",
                    os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "") in ("1", "true"))


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drops every compiled program after each test module.

  jit caches live as long as the process, and each XLA CPU executable keeps its
  own mapped code pages: over the whole suite in one process they piled up to
  a crash in XLA's compiler (tests/run.sh).  Modules share no compiled state
  worth keeping; the persistent compilation cache is unaffected.
  """
  yield
  import gc
  import jax
  from memrecall.train import trainer  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  trainer.clear_kept_programs()  # (their jits would trace again anyway)
  gc.collect()


@pytest.fixture(scope="session")
def hf_reference():
  return dict(np.load(os.path.join(FIXTURES, "hf_reference.npz"), allow_pickle=False))


@pytest.fixture(scope="session")
def tiny_dir():
  return os.path.join(FIXTURES, "qwen2_tiny")

LYCHEE_FIXTURE = os.path.join(SHARED_FIXTURES, "lychee_reference_tiny", "reference.npz")


@pytest.fixture(scope="session")
def lychee_reference():
  """Outputs of the public PyTorch LycheeMemory code on a tiny random model (../shared)."""
  assert os.path.exists(LYCHEE_FIXTURE), f"missing {LYCHEE_FIXTURE} (../shared/fixtures beside the checkout)"
  return dict(np.load(LYCHEE_FIXTURE, allow_pickle=False))


@pytest.fixture(scope="session")
def lychee_dir(lychee_reference, tmp_path_factory):
  """The fixture's weights and config written as a HF checkpoint directory."""
  import json
  from memrecall.models.safetensors_io import save_file
  directory = tmp_path_factory.mktemp("lychee_tiny")
  weights = {k[2:]: v for k, v in lychee_reference.items() if k.startswith("w/")}
  save_file(weights, directory / "model.safetensors")
  with open(directory / "config.json", "w") as f:
    f.write(str(lychee_reference["config_json"]))
  with open(directory / "tokenizer.json", "w") as f:
    f.write(str(lychee_reference["tokenizer_json"]))
  meta = json.loads(str(lychee_reference["meta_json"]))
  with open(directory / "tokenizer_config.json", "w") as f:
    json.dump({"chat_template": meta["chat_template"]}, f)
  return directory


class Loaded(NamedTuple):
  """A run and its parameters, as `run_builder.load_hf_checkpoint` returns them."""
  run: Any
  params: Any


@pytest.fixture(scope="session")
def lychee_model(lychee_reference, lychee_dir):
  """The reference's tiny LycheeMemory model with a gate (its random similarity_head + fresh LoRA)."""
  from memrecall import run_builder
  return Loaded(*run_builder.load_hf_checkpoint(  # float32 products, on any card
      lychee_dir, chunk_size=1024, gate_lora_rank=4, matmul_precision="highest"))
