"""TPU slices by name, their chips and HBM, and deviceless TPU devices to compile for.

A slice is named as Cloud TPU names it (`v5p-64`: 64 TensorCores = 32 chips;
`v5e-4`, `v6e-8`: chips) or as a topology (`v5p:2x4x4`, `v5e:2x2`).  With
`libtpu` installed, `jax.experimental.topologies.get_topology_desc` turns a
topology into TPU devices that exist only for the compiler: a program lowered
and compiled for a mesh of them gets the TPU compiler's own memory plan on a
machine without a TPU (launch/compile.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 1024 ** 3

# HBM per chip (GiB), as Cloud TPU's pages give it: v4 32, v5e 16, v5p 95, v6e 32.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# Cloud TPU names count TensorCores for v4 and v5p (two per chip), chips for v5e and v6e.
_CORES_PER_CHIP_IN_NAME = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


class TopologyError(ValueError):
  """A slice name or topology that is not understood, or a mesh that does not cover it."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """generation (v4, v5e, v5p, v6e) and chip grid (e.g. (2, 4, 4))."""
  generation: str
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology(self) -> str:
    """The string `get_topology_desc` takes, e.g. `v5p:2x4x4`."""
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU name, e.g. `v5p-64` (what TPU_ACCELERATOR_TYPE holds on a real VM)."""
    return f"{self.generation}-{self.chips * _CORES_PER_CHIP_IN_NAME[self.generation]}"

  @property
  def hbm_gib_per_chip(self) -> float:
    return HBM_GIB[self.generation]

  @property
  def chips_per_host(self) -> int:
    """Chips of one host (TPU VM): an 8-chip v5e or v6e slice is one VM of 8 (v5litepod-8,
    v6e-8); larger ones, and every v4 or v5p slice, are VMs of 4 (Cloud TPU's v5e, v6e and
    v5p pages)."""
    if self.generation in ("v5e", "v6e") and self.chips == 8:
      return 8
    return min(self.chips, 4)


def looks_like_tpu(name: str) -> bool:
  """Whether `name` starts with a TPU generation (`v5p-96`, `v5e:2x2`, `v5litepod-8`)."""
  head = re.split(r"[-:]", name.strip().lower(), maxsplit=1)[0]
  return _ALIASES.get(head, head) in HBM_GIB


def _generation(text: str) -> str:
  gen = _ALIASES.get(text.lower(), text.lower())
  if gen not in HBM_GIB:
    raise TopologyError(f"unknown TPU generation {text!r}; choose from {sorted(HBM_GIB)}")
  return gen


def default_shape(generation: str, chips: int) -> tuple[int, ...]:
  """Cloud TPU's usual grid for `chips` chips: 3-D for v4/v5p (4 -> 2x2x1, 32 -> 2x4x4,
  64 -> 4x4x4), 2-D for v5e/v6e (4 -> 2x2, 8 -> 2x4, 16 -> 4x4): the smallest side doubled,
  the later one on ties."""
  dims = _DIMS[generation]
  if chips < 1 or chips & (chips - 1):
    grid = _grid(chips, dims)
    example = f", e.g. {generation}:{'x'.join(map(str, grid))}" if grid else ""
    raise TopologyError(f"{chips} {generation} chips is not a power of two, so it has no "
                        f"default grid: name its topology instead ({generation}:"
                        + "x".join("ABC"[:dims]) + f", sides multiplying to {chips}){example}")
  shape = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
  if dims == 3 and chips < 4:
    raise TopologyError(f"the smallest {generation} slice has 4 chips ({generation}-8)")
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def _grid(chips: int, dims: int) -> tuple[int, ...] | None:
  """The most even grid of `chips` whose first two sides are even, so hosts of 2x2 chips tile
  it (libtpu refused v5p:3x4x4), or None: 48 v5p chips -> 4x4x3."""
  if chips % 4:
    return None
  rest = chips // 4
  grids = [(2 * a, 2 * (rest // a)) if dims == 2 else (2 * a, 2 * b, rest // (a * b))
           for a in range(1, rest + 1) if rest % a == 0
           for b in (range(1, rest // a + 1) if dims == 3 else [1]) if (rest // a) % b == 0]
  return min(grids, key=lambda g: (max(g) / min(g), [-x for x in reversed(g)]))


def parse_slice(name: str) -> Slice:
  """`v5p-64` (a Cloud TPU accelerator type) or `v5p:2x4x4` (a topology) -> Slice."""
  text = name.strip()
  topo = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text, re.IGNORECASE)
  if topo:
    gen = _generation(topo[1])
    shape = tuple(int(s) for s in topo[2].split("x"))
    if len(shape) != _DIMS[gen] or min(shape) < 1:
      raise TopologyError(f"topology {name!r}: {gen} slices are {_DIMS[gen]}-D, e.g. "
                          f"{gen}:" + "x".join(["2"] * _DIMS[gen]))
    return Slice(gen, shape)
  accel = re.fullmatch(r"([a-z0-9]+)-(\d+)", text, re.IGNORECASE)
  if accel:
    gen = _generation(accel[1])
    count = int(accel[2])
    per = _CORES_PER_CHIP_IN_NAME[gen]
    if count % per:
      raise TopologyError(f"{name!r}: {gen} names count TensorCores, {per} per chip")
    try:
      return Slice(gen, default_shape(gen, count // per))
    except TopologyError as e:
      cores = f" ({gen} names count TensorCores, {per} per chip)" if per > 1 else ""
      raise TopologyError(f"{name!r}{cores}: {e}") from None
  raise TopologyError(f"unknown TPU topology {name!r}: give a slice like v5p-64 or v5e-4, or "
                      "a topology like v5p:2x4x4 or v5e:2x2")


def quiet_libtpu(accelerator_type: str) -> None:
  """Environment that keeps libtpu from probing cloud metadata when no TPU VM is around;
  set before libtpu loads (the first `get_topology_desc`).  A real TPU VM's values stay."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu takes /tmp/libtpu_lockfile for a real TPU; deviceless compiles share no chip, so
  # two of them (parallel tests, a background 7B compile) may run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
  os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")


def libtpu_version() -> str | None:
  """The installed libtpu's version, or None when it cannot be imported."""
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None
  for dist in ("libtpu", "libtpu-nightly"):
    try:
      return metadata.version(dist)
    except metadata.PackageNotFoundError:
      continue
  return "unknown"


def deviceless_devices(tpu: Slice) -> list:
  """The slice's TPU devices, for the compiler only (nothing runs on them)."""
  if libtpu_version() is None:
    raise ImportError("compiling for a TPU without one needs libtpu: pip install libtpu "
                      "(the version jax[tpu] pins)")
  quiet_libtpu(tpu.accelerator_type)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu lays every slice out in hosts of 4 chips; an 8-chip v5e or v6e is one VM of 8.
  hosts = ({"chips_per_host_bounds": [*tpu.shape, 1][:3]} if tpu.chips_per_host == 8 else {})
  try:
    return list(topologies.get_topology_desc(tpu.topology, "tpu", **hosts).devices)
  except Exception as e:  # libtpu's own words: an unsupported shape
    raise TopologyError(f"libtpu refuses topology {tpu.topology}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def hbm_bytes_per_device(tpu: Slice, devices: int) -> float:
  """HBM of one device: a chip's, split when each TensorCore is its own device (v4 without
  megacore shows 2 devices per chip)."""
  return tpu.hbm_gib_per_chip * GiB * tpu.chips / max(devices, 1)
