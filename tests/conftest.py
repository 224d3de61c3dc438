"""Shared test setup: 8 simulated CPU devices (set before jax is imported) and fixture paths."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true",
                   help="also run the tests marked slow (the learning test, minutes on a CPU)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: minutes of training; run with --slow (nightly)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--slow"):
    return
  skip = pytest.mark.skip(reason="slow: run with `bash tests/run.sh --slow -k test_learning`")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


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
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def hf_reference():
  return dict(np.load(os.path.join(FIXTURES, "hf_reference.npz"), allow_pickle=False))


@pytest.fixture(scope="session")
def tiny_dir():
  return os.path.join(FIXTURES, "qwen2_tiny")

LYCHEE_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                              "shared", "fixtures", "lychee_reference_tiny", "reference.npz")


@pytest.fixture(scope="session")
def lychee_reference():
  """Outputs of the public PyTorch LycheeMemory code on a tiny random model (../shared)."""
  assert os.path.exists(LYCHEE_FIXTURE), f"missing {LYCHEE_FIXTURE} (../shared beside the checkout)"
  return dict(np.load(LYCHEE_FIXTURE, allow_pickle=False))


@pytest.fixture(scope="session")
def lychee_dir(lychee_reference, tmp_path_factory):
  """The fixture's weights and config written as a HF checkpoint directory."""
  import json
  from memrecall.safetensors_io import save_file
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


@pytest.fixture(scope="session")
def lychee_model(lychee_reference, lychee_dir):
  """The reference's tiny LycheeMemory model with a gate (its random similarity_head + fresh LoRA)."""
  from memrecall import pipeline
  return pipeline.load_recall_model(lychee_dir, chunk_size=1024, gate_lora_rank=4)
