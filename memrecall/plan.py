"""Per-device memory of a training or evaluation setup, before any device is touched.

Parameter and optimizer shapes come from `jax.eval_shape`; their shardings
from the logical-axis rules on a mesh of the requested shape (no devices are
needed: only the axis sizes matter).  Activations are an estimate, stated
with its formula, for a rematerialised layer scan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np

from memrecall import sharding as sharding_lib
from memrecall.config import ModelConfig
from memrecall.model import abstract_params
from memrecall.train import state as state_lib


class _AxisSizes:
  """Stands in for a Mesh where only `.shape` is read."""

  def __init__(self, sizes: Mapping[str, int]):
    self.shape = {a: int(sizes.get(a, 1)) for a in sharding_lib.MESH_AXES}


def sharded_bytes(shape, dtype, logical_axes, mesh_sizes: Mapping[str, int]) -> int:
  """Bytes one device holds of an array sharded by the rules table."""
  mesh = _AxisSizes(mesh_sizes)
  spec = sharding_lib.logical_to_spec(logical_axes, shape, mesh)
  split = 1
  for entry in spec:
    for axis in (entry if isinstance(entry, tuple) else (entry,)):
      if axis is not None:
        split *= mesh.shape[axis]
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // split


@dataclasses.dataclass
class MemoryPlan:
  params: int
  optimizer: int
  activations: int
  memory_bank: int
  devices: int

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.activations + self.memory_bank


def plan(config: ModelConfig, mesh_sizes: Mapping[str, int], *, trainable: str = "backbone",
         batch: int = 1, turn_tokens: int = 2048, bank_chunks: int = 0, slots: int = 1024,
         microbatches: int = 1) -> MemoryPlan:
  """Per-device bytes of parameters, AdamW moments, activations and a memory bank.

  batch: rows (questions x rollouts) per step; turn_tokens: tokens of one
  teacher-forced turn (compressed slots + prompt + memory update).
  Activation estimate (full remat, layers scanned): the saved layer inputs
  L x b x T x E, one layer's working set b x T x (4E + 3M + 2(H+2K)D), and the
  float32 logits b x T x V, in the compute dtype (logits float32), where b is
  the per-device rows of one microbatch (batch / (data x fsdp x microbatches)).
  """
  boxed = abstract_params(config)
  flat = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  param_bytes = sum(sharded_bytes(leaf.value.shape, leaf.value.dtype, leaf.names, mesh_sizes)
                    for leaf in flat)
  paths = {tuple(p) for p in state_lib.trainable_paths(
      jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)),
      trainable)}
  flat_boxed = flax_flatten(boxed)
  moments = sum(2 * sharded_bytes(leaf.value.shape, leaf.value.dtype, leaf.names, mesh_sizes)
                for path, leaf in flat_boxed.items() if path in paths)
  sizes = _AxisSizes(mesh_sizes).shape
  rows = max(1, math.ceil(batch / (sizes["data"] * sizes["fsdp"] * microbatches)))
  dt = np.dtype(config.jnp_dtype).itemsize
  e, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
  qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
  activations = (config.num_layers * rows * turn_tokens * e * dt
                 + rows * turn_tokens * (4 * e + 3 * m + 2 * qkv) * dt // sizes["tensor"]
                 + rows * turn_tokens * v * 4 // sizes["tensor"])
  bank_shape = (bank_chunks, config.num_layers, 2, slots, config.num_kv_heads, config.head_dim)
  bank = sharded_bytes(bank_shape, config.jnp_dtype, ("chunks", None, None, None, "act_kv_heads",
                                                      None), mesh_sizes) if bank_chunks else 0
  return MemoryPlan(params=param_bytes, optimizer=moments, activations=activations,
                    memory_bank=bank, devices=math.prod(sizes.values()))


def flax_flatten(tree) -> dict:
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  return flax.traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
