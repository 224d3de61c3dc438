"""Shared test setup: 8 simulated CPU devices (set before jax is imported) and fixture paths."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="session")
def hf_reference():
  return dict(np.load(os.path.join(FIXTURES, "hf_reference.npz"), allow_pickle=False))


@pytest.fixture(scope="session")
def tiny_dir():
  return os.path.join(FIXTURES, "qwen2_tiny")
