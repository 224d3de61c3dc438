"""What a recipe is compiled for without the hardware: a TPU slice or GPU hosts, by name.

`parse_target("v5p-64")` is a TPU slice (memrecall.capacity.tpu_slices), `parse_target(
"h100:8")` GPU hosts (memrecall.capacity.gpu_hosts); `deviceless` turns either into devices
for the compiler alone, each device's memory, and the compiler that will plan it.
"""

from __future__ import annotations

import dataclasses

from memrecall.capacity import gpu_hosts, tpu_slices
from memrecall.capacity.tpu_slices import TopologyError  # noqa: F401  (one error for both)

Target = tpu_slices.Slice | gpu_hosts.GpuHosts


def parse_target(name: str) -> Target:
  if gpu_hosts.looks_like_gpu(name):
    return gpu_hosts.parse_gpu_hosts(name)
  try:
    return tpu_slices.parse_slice(name)
  except TopologyError as e:
    if tpu_slices.looks_like_tpu(name):  # a TPU slice, misnamed: its own error says how
      raise
    raise TopologyError(f"{e}; or GPU hosts such as h100:8 or h200:2x8 (cards: "
                        f"{', '.join(gpu_hosts.CARDS)})") from None


def is_gpu(target: Target) -> bool:
  return isinstance(target, gpu_hosts.GpuHosts)


# JAX preallocates this share of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION's default).
GPU_POOL_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Deviceless:
  """A target's devices for the compiler, one device's memory, the compiler's name, and the
  share of that memory the runtime allocates by default (None: all of it)."""
  devices: list
  memory_bytes_per_device: float
  compiler: str
  pool_fraction: float | None = None

  @property
  def pool_bytes(self) -> int:
    """What the runtime lets a device allocate by default (a device's `bytes_limit`)."""
    return int(self.memory_bytes_per_device * (self.pool_fraction or 1.0))


def deviceless(target: Target, gpu_target_config: str | None = None) -> Deviceless:
  """Devices to compile for.  A TPU's memory per device is its chip's HBM (split between a
  chip's TensorCores when each is a device); a GPU's, the card's memory as its target config
  (`gpu_target_config`: a file, else the CUDA plugin's own) gives it."""
  if is_gpu(target):
    text = gpu_hosts.target_config(target, gpu_target_config)
    devices = gpu_hosts.deviceless_devices(target, text)
    _, compiler = gpu_hosts.plugin() or ("", "a CUDA plugin")
    return Deviceless(devices, float(gpu_hosts.device_memory_bytes(text)), compiler,
                      GPU_POOL_FRACTION)
  devices = tpu_slices.deviceless_devices(target)
  return Deviceless(devices, tpu_slices.hbm_bytes_per_device(target, len(devices)),
                    f"libtpu {tpu_slices.libtpu_version()}")
