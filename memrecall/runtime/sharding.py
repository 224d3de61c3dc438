"""Logical axis names, the one rules table mapping them to mesh axes, and meshes.

Every parameter and the main activations are annotated with *logical* axis
names (`"embed"`, `"heads"`, ...).  `LOGICAL_AXIS_RULES` says which mesh axis
each name is split over; changing the parallelism of the whole codebase means
changing this table (or the mesh shape), never the model code.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism that also
shards parameters and optimizer state) and `tensor` (Megatron-style model
parallelism over heads and MLP columns).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
  """A mesh shape these devices cannot form (too many devices asked, or a size that does not
  divide them): launchers turn it into a one-line error naming their --mesh flag."""

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("chunks", ("data", "fsdp")),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices).

  `shape` gives the size of each axis; at most one entry may be -1 (fill with
  the remaining devices).  The default puts every device on `fsdp`.  A mesh
  smaller than the device list uses its first devices (e.g. one of eight).
  `shape["dcn"]`, a mapping like `{"data": 2}`, splits axes across slices (TPU
  multi-slice) or hosts (multi-node GPU): each axis is then ICI size x DCN size,
  and devices are laid out so that only the DCN part crosses the slow network.
  Axes are `Auto` so that GSPMD propagates shardings from the rules table.
  """
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    shape = {"fsdp": -1}
  if not isinstance(shape, Mapping):
    shape = dict(zip(MESH_AXES, shape))
  shape = dict(shape)
  dcn = {k: int(v) for k, v in dict(shape.pop("dcn", None) or {}).items()}
  if any(v != 1 for v in dcn.values()):
    return _hybrid_mesh(shape, dcn, devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise MeshError(f"{len(devices)} device{'s' if len(devices) != 1 else ''} cannot fill mesh "
                      f"{dict(shape)}: the sizes given ({known} devices) do not divide them")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices):
    raise MeshError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
        f"but {len(devices)} are available")
  device_array = np.asarray(devices[:math.prod(sizes)]).reshape(sizes)
  return Mesh(device_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _hybrid_mesh(ici: Mapping[str, int], dcn: Mapping[str, int], devices) -> Mesh:
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  unknown = (set(ici) | set(dcn)) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  ici_shape = [int(ici.get(a, 1)) for a in MESH_AXES]
  dcn_shape = [int(dcn.get(a, 1)) for a in MESH_AXES]
  if -1 in ici_shape or -1 in dcn_shape:
    raise ValueError("a mesh with a DCN part needs explicit sizes (no -1)")
  if math.prod(ici_shape) * math.prod(dcn_shape) != len(devices):
    raise MeshError(f"ICI {ici_shape} x DCN {dcn_shape} does not cover {len(devices)} devices")
  # Slices on TPU; on other platforms each process is one granule (a host of GPUs).
  granule_is_process = jax.default_backend() != "tpu"
  array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                               process_is_granule=granule_is_process)
  return Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """Maps logical axis names to a `PartitionSpec` through `rules`.

  When `shape` and `mesh` are given, a dimension that the mesh axes do not
  divide evenly is replicated instead (e.g. 2 KV heads on a 4-way tensor axis),
  and a mesh axis is never used twice in one spec.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in the axis rules table")
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a not in used and (mesh is None or a in mesh.shape))
    if mesh is not None and shape is not None:
      # Drop trailing mesh axes until the product divides the dimension.
      while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def logical_split(logical_axis: str, mesh, size: int | None = None,
                  rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> int:
  """How many parts the rules split a dimension named `logical_axis` into on `mesh` (anything
  with a `.shape` of axis sizes); given its `size`, only over the mesh axes that divide it."""
  entry = logical_to_spec((logical_axis,), None if size is None else (size,), mesh, rules)[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[a] for a in axes)


def batch_shards(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> int:
  """How many parts the rules split a batch's rows into on `mesh` (when they divide it)."""
  return logical_split("batch", mesh, rules=rules)


def logical_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def rows_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  """A batch array's sharding ([B, ...]): rows over the `batch` axes of the rules, the rest
  replicated (all of it when the mesh's batch axes do not divide B)."""
  return logical_sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh)


def param_shardings(boxed_tree: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a tree of `nn.Partitioned` (abstract or concrete) leaves.

  Leaves that carry no logical names are replicated.
  """
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      names = leaf.get_partition_spec()
      return logical_sharding(tuple(names), leaf.value.shape, mesh, rules)
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def undivided(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
              ) -> list[tuple[str, tuple[int, ...], int]]:
  """(path, shape, bytes) of each parameter the rules would split over more devices than its
  sharding does, because those mesh axes do not divide it (`logical_to_spec` keeps such a
  dimension whole): on an fsdp axis of 6, every 7B weight would sit whole on every device."""
  def split(spec) -> int:
    axes = [a for entry in spec if entry is not None
            for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh.shape[a] for a in axes)

  out = []
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    if not isinstance(leaf, nn.Partitioned):
      continue
    names, shape = tuple(leaf.get_partition_spec()), tuple(leaf.value.shape)
    if split(logical_to_spec(names, None, mesh, rules)) > split(
        logical_to_spec(names, shape, mesh, rules)):
      out.append((jax.tree_util.keystr(path), shape,
                  math.prod(shape) * np.dtype(leaf.value.dtype).itemsize))
  return out


# Where inference (evaluation, answering) keeps its weights on a mesh.  "sharded": by the rules,
# as training keeps them; a mesh with an fsdp axis then all-gathers every layer's weights again
# at every decode step (13.2 GiB per GPU per token for 7B on 8 H100s: the interconnect, not HBM,
# sets decode's speed; docs/2026-12-06-gpu-deviceless-compile.md).  "replicated": one whole
# copy on each device, placed once, each device reading its own rows with it.  "tensor": the
# same devices formed into `data x tensor` (`tensor_mesh`), the weights split by the rules over
# heads, MLP columns and vocabulary on `tensor` and kept there: a decode step all-reduces each
# layer's activations (a few KiB per row) instead of gathering its weights, and the rows split
# over `data`.  "auto": replicated when that copy takes at most REPLICATE_UP_TO of a device's
# memory, leaving the rest to the banks, caches and activations of its rows; else tensor over
# the fewest devices whose share fits the same budget; else sharded.  Where a device does not
# say its memory (CPUs), auto keeps the weights sharded.
INFERENCE_WEIGHTS = ("auto", "sharded", "tensor", "replicated")
REPLICATE_UP_TO = 1 / 3


def tensor_mesh(mesh: Mesh, tensor: int) -> Mesh:
  """`mesh`'s devices, in their order, as `data x tensor` (fsdp 1) with `tensor` devices per
  group: where "tensor" inference keeps its weights (tensor 1: every device a data shard)."""
  devices = list(mesh.devices.flat)
  if tensor < 1 or len(devices) % tensor:
    raise MeshError(f"a tensor axis of {tensor} does not divide {len(devices)} devices")
  return make_mesh({"data": len(devices) // tensor, "tensor": tensor}, devices)


def inference_weights(setting: str, mesh: Mesh, bytes_on: Callable[[Mesh], int],
                      device_bytes: int | None, kv_heads: int | None = None
                      ) -> tuple[str, Mesh]:
  """(placement, the mesh the loop runs on) for an inference copy: `setting` (one of
  INFERENCE_WEIGHTS) decided on `mesh`'s devices, of `device_bytes` each (None: unknown).

  bytes_on(m): what one device holds of the copy sharded by the rules on mesh m (on a mesh of
  one data axis, all of it).  "tensor" takes the fewest devices per group whose share fits
  REPLICATE_UP_TO of a device (all of them where none does); where the memory is unknown, as
  many as `mesh` splits the weights over (its fsdp x tensor).  kv_heads: the model's key/value
  heads; a group that divides them is taken first (and, memory unknown, the largest such group
  up to fsdp x tensor): a group that does not keeps a whole KV cache on each of its devices,
  and its attention's partial results move between them at every step."""
  if setting not in INFERENCE_WEIGHTS:
    raise ValueError(f"unknown weight placement {setting!r}; choose from "
                     f"{', '.join(INFERENCE_WEIGHTS)}")
  if setting in ("sharded", "replicated"):
    return setting, mesh
  budget = None if device_bytes is None else REPLICATE_UP_TO * device_bytes
  if setting == "auto" and budget is not None and bytes_on(tensor_mesh(mesh, 1)) <= budget:
    return "replicated", mesh
  even = lambda t: kv_heads is None or kv_heads % t == 0
  # Fewest devices first, those that split the KV heads evenly before those that do not.
  groups = sorted((t for t in range(2, mesh.size + 1) if mesh.size % t == 0),
                  key=lambda t: not even(t))
  fits = [t for t in groups if budget is not None and bytes_on(tensor_mesh(mesh, t)) <= budget]
  if setting == "auto":
    return ("tensor", tensor_mesh(mesh, fits[0])) if fits else ("sharded", mesh)
  if fits:
    return "tensor", tensor_mesh(mesh, fits[0])
  if budget is not None:
    return "tensor", tensor_mesh(mesh, mesh.size)
  weight_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
  return "tensor", tensor_mesh(mesh, max((t for t in groups if t <= weight_shards and even(t)),
                                         default=weight_shards))


def device_bytes_of(tree: Any, shardings: Any) -> int:
  """What one device holds of `tree` (arrays or abstract arrays) placed with `shardings`."""
  def one(x, s):
    return int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def device_memory(device) -> int | None:
  """The bytes `device`'s allocator may hold (JAX's pool on a GPU), or None where its backend
  does not say (CPUs)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without the query raise)
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def logical_axes_tree(boxed_tree: Any) -> Any:
  """The logical axis names of every leaf (tuple of names, or None)."""
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return tuple(leaf.get_partition_spec())
    return None
  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _current_mesh():
  """The mesh of `jax.set_mesh` when it has memrecall's axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding when running under `jax.set_mesh`; else a no-op."""
  mesh = _current_mesh()
  if mesh is None:
    return x
  spec = logical_to_spec(logical_axes, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def logical_shards(logical_axis: str, size: int) -> int:
  """How many devices a dimension of `size` named `logical_axis` is split over under the
  current `jax.set_mesh` (1 without one, or when its mesh axes do not divide `size`)."""
  mesh = _current_mesh()
  return 1 if mesh is None else logical_split(logical_axis, mesh, size)
