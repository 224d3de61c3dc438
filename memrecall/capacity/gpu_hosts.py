"""GPU hosts by name (`h100:8`, `h200:2x8`), and deviceless GPU devices to compile for.

XLA's GPU compiler compiles without a GPU when it is given a target config (a
`GpuTargetConfigProto`: the card's cores, shared memory, bandwidth, compute capability):
`jax.experimental.topologies.get_topology_desc(..., "cuda", target_config=..., topology=
"1xHOSTSxGPUS")` then gives devices that exist only for the compiler, as libtpu's deviceless
TPUs do (memrecall.capacity.tpu_slices).  The CUDA plugin must be installed (INSTALL: about
200 MB, no driver or GPU needed); jax 0.12's carries XLA's own target configs for the cards it
knows, read from it here, or one is given as a file (`--gpu_target_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import mmap
import os
import re

from memrecall.capacity.tpu_slices import TopologyError

# Cards by short name -> the `device_description_str` of XLA's target config for them.  A
# bare name is the SXM card XLA's config describes (`a100`: the 80 GB SXM4); other variants
# the plugin carries configs for have names of their own.
CARDS = {"h100": "NVIDIA H100 80GB HBM3", "h100-pcie": "NVIDIA H100 PCIe",
         "h200": "NVIDIA H200 141GB HBM3e", "b200": "NVIDIA B200",
         "a100": "NVIDIA A100-SXM4-80GB", "a100-40gb": "NVIDIA A100-SXM4-40GB",
         "a100-80gb-pcie": "NVIDIA A100 80GB PCIe"}
# Each card's memory as its target config gives it (`device_memory_size`, jax 0.12's plugin):
# what launch/plan.py judges a GPU mesh against when nothing is compiled.
MEMORY_BYTES = {"h100": 84942979072, "h100-pcie": 84942979072, "h200": 151397597184,
                "b200": 191514411008, "a100": 85100068864, "a100-40gb": 42331013120,
                "a100-80gb-pcie": 79050250240}
# The CUDA plugins jax has shipped, newest first (the GPU image carries the CUDA 13 one).
PLUGINS = (("jax_plugins.xla_cuda13", "jax-cuda13-plugin"),
           ("jax_plugins.xla_cuda12", "jax-cuda12-plugin"))
INSTALL = ("pip install 'jax[cuda12-local]' at jax's version (memrecall's gpu-aot extra: the "
           "plugin without the CUDA libraries)")


class GpuTargetError(TopologyError):
  """A GPU host name that is not understood, or a target config that cannot be had."""


@dataclasses.dataclass(frozen=True)
class GpuHosts:
  """`hosts` machines of `gpus_per_host` cards of one kind (`card`: a key of CARDS)."""
  card: str
  hosts: int
  gpus_per_host: int

  @property
  def chips(self) -> int:
    return self.hosts * self.gpus_per_host

  @property
  def topology(self) -> str:
    """The name it was parsed from, normalised: `h100:8` or `h100:2x8`."""
    shape = (f"{self.hosts}x" if self.hosts > 1 else "") + str(self.gpus_per_host)
    return f"{self.card}:{shape}"

  @property
  def accelerator_type(self) -> str:
    return CARDS[self.card]


def looks_like_gpu(name: str) -> bool:
  """Whether `name` is meant as GPU hosts: a card's short name before the colon, or a variant
  of one (`a100-80gb`), which `parse_gpu_hosts` then refuses naming the cards it knows."""
  card = name.strip().lower().partition(":")[0]
  return card in CARDS or card.partition("-")[0] in CARDS


def parse_gpu_hosts(name: str) -> GpuHosts:
  """`h100:8` (one host of 8 cards) or `h200:2x8` (two hosts of 8) -> GpuHosts."""
  found = re.fullmatch(r"([a-z0-9-]+):(?:(\d+)x)?(\d+)", name.strip().lower())
  if found and found[1] not in CARDS:
    raise GpuTargetError(f"unknown GPU card {found[1]!r} in {name!r}; choose from "
                         f"{', '.join(CARDS)}")
  if not found:
    raise GpuTargetError(f"unknown GPU hosts {name!r}: give CARD:GPUS or CARD:HOSTSxGPUS, e.g. "
                         f"h100:8 or h200:2x8 (cards: {', '.join(CARDS)})")
  hosts, gpus = int(found[2] or 1), int(found[3])
  if hosts < 1 or gpus < 1:
    raise GpuTargetError(f"{name!r}: hosts and GPUs per host are at least 1")
  return GpuHosts(found[1], hosts, gpus)


def installed(module: str) -> bool:
  """Whether `module` can be imported (a dotted name whose parent is absent cannot)."""
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def plugin() -> tuple[str, str] | None:
  """The installed CUDA plugin's module and its name with version
  (`jax-cuda12-plugin 0.12.0.1`), or None."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  for module, dist in PLUGINS:
    if installed(module):
      try:
        return module, f"{dist} {metadata.version(dist)}"
      except metadata.PackageNotFoundError:
        return module, f"{dist} (version unknown)"
  return None


def _plugin_library(module: str) -> str:
  spec = importlib.util.find_spec(module)
  found = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.so")))
  if not found:
    raise GpuTargetError(f"the CUDA plugin {module} has no library: install its PJRT package "
                         "too (jax-cuda12-pjrt or jax-cuda13-pjrt, at jax's version)")
  return max(found, key=os.path.getsize)


@functools.lru_cache(maxsize=None)
def embedded_target_configs(library: str) -> dict[str, str]:
  """The target configs XLA compiled into the plugin's library, by `device_description_str`:
  text protos, each starting at `gpu_device_info {` and ending at its NUL byte."""
  configs = {}
  with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    for start in re.finditer(rb"gpu_device_info \{\n", data):
      end = data.find(b"\0", start.start())
      text = data[start.start():end].decode("utf-8", "replace")
      name = re.search(r'\ndevice_description_str: "([^"]+)"', text)
      if name and "\nplatform_name:" in text:
        configs.setdefault(name[1], text)
  return configs


def target_config(target: GpuHosts, path: str | None = None) -> str:
  """The card's GpuTargetConfigProto as text: from `path` when given, else the plugin's own."""
  if path:
    try:
      return open(path, encoding="utf-8").read()
    except OSError as e:
      raise GpuTargetError(f"--gpu_target_config: cannot read {path}: {e.strerror}") from None
  found = plugin()
  if found is None:
    raise ImportError(f"compiling for a GPU without one needs the CUDA plugin (no GPU or "
                      f"driver needed): {INSTALL}")
  configs = embedded_target_configs(_plugin_library(found[0]))
  name = CARDS[target.card]
  if name not in configs:
    raise GpuTargetError(f"{found[1]} carries no target config for {name} "
                         f"(it has: {', '.join(sorted(configs)) or 'none'}); give one with "
                         "--gpu_target_config=FILE (XLA's xla/backends/gpu/target_config/specs)")
  return configs[name]


def device_memory_bytes(config_text: str) -> int:
  """The card's memory as its target config gives it (`device_memory_size`)."""
  found = re.search(r"\bdevice_memory_size: (\d+)", config_text)
  if not found:
    raise GpuTargetError("the GPU target config has no device_memory_size")
  return int(found[1])


def deviceless_devices(target: GpuHosts, config_text: str) -> list:
  """The hosts' GPUs, for the compiler only (nothing runs on them)."""
  # The plugin checks CUDA library versions against a driver only when CUDA is a platform to
  # run on; compiling runs on the CPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(
        target.topology, "cuda", target_config=config_text,
        topology=f"1x{target.hosts}x{target.gpus_per_host}")
  except NotImplementedError:
    if plugin() is None:
      raise ImportError(f"jax found no CUDA plugin to compile with: {INSTALL}") from None
    raise ImportError(f"{plugin()[1]} is installed but jax did not register it: without a GPU "
                      "its start-up check of the driver fails unless JAX_PLATFORMS=cpu is set "
                      "before jax starts") from None
  except Exception as e:  # the plugin's own words: a target config it cannot parse
    raise GpuTargetError(f"the CUDA plugin refuses {target.topology}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  return list(topology.devices)
