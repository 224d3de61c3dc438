"""What a plan or a compile targets: TPU slices' hosts and names, GPU cards by name."""

import collections

import pytest

from memrecall.capacity import gpu_hosts, targets, tpu_slices
from tests.conftest import needs_cuda_plugin, needs_libtpu


@needs_libtpu
@pytest.mark.parametrize("name,hosts", [
    ("v5e-8", {0: 8}), ("v6e-8", {0: 8}), ("v5e:4x2", {0: 8}), ("v5e-4", {0: 4}),
    ("v5e-16", {0: 4, 1: 4, 2: 4, 3: 4}), ("v6e-16", {0: 4, 1: 4, 2: 4, 3: 4}),
    ("v5p-16", {0: 4, 1: 4}), ("v5p-8", {0: 4})])
def test_deviceless_slices_have_cloud_tpus_hosts(name, hosts):
  """An 8-chip v5e or v6e slice is one VM of 8 chips (Cloud TPU's v5e and v6e pages); libtpu's
  deviceless default made it two hosts of 4.  Larger v5e/v6e slices and every v5p one are
  hosts of 4."""
  tpu = tpu_slices.parse_slice(name)
  devices = tpu_slices.deviceless_devices(tpu)
  assert dict(collections.Counter(d.process_index for d in devices)) == hosts
  assert tpu.chips_per_host == next(iter(hosts.values()))


@needs_libtpu
def test_evaluation_on_a_v5e_8_runs_on_all_its_chips():
  """One process holds a v5e-8's 8 chips, so evaluation's mesh (`aot.host_mesh`) is the
  run's whole mesh."""
  from configs import tiny
  from memrecall.capacity import aot
  from memrecall.run_builder import build_run
  run = build_run(tiny.get_config("sft"),
                  tpu_slices.deviceless_devices(tpu_slices.parse_slice("v5e-8")))
  assert aot.host_mesh(run) is run.mesh and run.mesh.size == 8


def test_a_slice_without_a_default_grid_says_what_to_give():
  """v5p-96 counts 96 TensorCores, 48 chips: no power of two, so the error says so, names no
  launcher's flag, and offers a grid libtpu takes (it had offered an 8-chip v5p:2x2x2)."""
  with pytest.raises(tpu_slices.TopologyError) as error:
    targets.parse_target("v5p-96")
  message = str(error.value)
  assert message.startswith("'v5p-96' (v5p names count TensorCores, 2 per chip): 48 v5p chips "
                            "is not a power of two"), message
  assert "--topology" not in message and message.endswith("e.g. v5p:4x4x3")
  assert tpu_slices.parse_slice("v5p:4x4x3").chips == 48
  assert str(pytest.raises(tpu_slices.TopologyError, tpu_slices.parse_slice, "v5e-24").value) \
      .endswith("e.g. v5e:4x6")
  with pytest.raises(tpu_slices.TopologyError, match="sides multiplying to 6\\)$"):
    tpu_slices.parse_slice("v5p-12")  # 6 chips: no grid of whole hosts to offer


@pytest.mark.parametrize("name,description", [
    ("a100:8", "NVIDIA A100-SXM4-80GB"), ("a100-40gb:8", "NVIDIA A100-SXM4-40GB"),
    ("a100-80gb-pcie:2x4", "NVIDIA A100 80GB PCIe"), ("h100-pcie:8", "NVIDIA H100 PCIe")])
def test_each_card_xla_describes_has_a_name(name, description):
  target = targets.parse_target(name)
  assert target.accelerator_type == description
  assert targets.parse_target(target.topology) == target


def test_an_unknown_variant_of_a_card_lists_the_names():
  with pytest.raises(targets.TopologyError) as error:
    targets.parse_target("a100-80gb:8")
  assert str(error.value) == ("unknown GPU card 'a100-80gb' in 'a100-80gb:8'; choose from h100, "
                              "h100-pcie, h200, b200, a100, a100-40gb, a100-80gb-pcie")


@needs_cuda_plugin
def test_card_memories_are_the_plugins():
  configs = gpu_hosts.embedded_target_configs(gpu_hosts._plugin_library(gpu_hosts.plugin()[0]))
  assert set(gpu_hosts.MEMORY_BYTES) == set(gpu_hosts.CARDS)
  for card, description in gpu_hosts.CARDS.items():
    assert gpu_hosts.device_memory_bytes(configs[description]) == gpu_hosts.MEMORY_BYTES[card]
