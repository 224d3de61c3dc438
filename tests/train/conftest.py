"""A tiny training setup shared by the training tests."""

import jax
import pytest

from configs import tiny
from memrecall import run_builder
from memrecall.train import trainer


def small_config(stage: str, **train):
  config = tiny.get_config(stage)
  config.task.length = 64  # two chunks of 32
  config.model.num_layers = 2
  config.train.batch_size = 4
  config.train.steps = 4
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.async_checkpoint = False
  config.optimizer.warmup_steps = 0
  config.optimizer.decay_steps = 0
  config.mesh.fsdp = 1
  config.rl.group_size = 2
  for k, v in train.items():
    setattr(config.train, k, v)
  return config


@pytest.fixture
def run_of():
  def make(stage, **train):
    return run_builder.build_run(small_config(stage, **train))
  return make
