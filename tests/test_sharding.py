"""Sharded execution over a simulated 8-device CPU mesh equals one device; the rules table."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memrecall.models import hf_checkpoint, qwen2 as model, sampling
from memrecall.runtime import sharding

# Every test here builds a mesh over 8 devices (or checks make_mesh's errors against them).
pytestmark = pytest.mark.multidevice


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_import_places_parameters_on_their_shardings(tiny_dir, mesh):
  params, _ = hf_checkpoint.load_hf_checkpoint(tiny_dir, mesh=mesh)
  up = params["layers"]["mlp"]["up_kernel"]  # [layers, embed, mlp]
  assert up.sharding.spec == P(None, "fsdp", "tensor")
  assert len(up.addressable_shards) == 8 and up.addressable_shards[0].data.shape == (2, 32, 64)
  assert params["layers"]["attention"]["k_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert params["embedding"].sharding.spec == P("tensor", "fsdp")
  # Sharded import holds exactly the single-device values.
  single, _ = hf_checkpoint.load_hf_checkpoint(tiny_dir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single)):
    np.testing.assert_array_equal(a, b)


def test_sharded_forward_and_sampler_match_one_device(tiny_dir, mesh, hf_reference):
  single, config = hf_checkpoint.load_hf_checkpoint(tiny_dir)
  sharded, _ = hf_checkpoint.load_hf_checkpoint(tiny_dir, mesh=mesh)
  tokens = jnp.asarray(hf_reference["logits/input_ids"][:2].repeat(2, 0))  # batch 4
  mask = jnp.asarray(hf_reference["logits/attention_mask"][:2].repeat(2, 0))
  expected, _ = model.forward(single, config, tokens, mask)
  settings = sampling.SamplingConfig(temperature=1.0, top_k=40, eos_ids=config.eos_token_ids)
  expected_sample = sampling.generate(single, config, tokens, mask, jax.random.key(3),
                                      max_new_tokens=10, sampling=settings)
  with jax.set_mesh(mesh):
    logits, _ = jax.jit(model.forward, static_argnums=1)(sharded, config, tokens, mask)
    sample = sampling.generate(sharded, config, tokens, mask, jax.random.key(3), max_new_tokens=10,
                               sampling=settings)
  np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(sample.tokens, expected_sample.tokens)
  np.testing.assert_allclose(sample.logprobs, expected_sample.logprobs, atol=1e-5)


def test_init_params_respects_the_mesh(mesh):
  config = model.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8)
  sharded = model.init_params(config, jax.random.key(0), mesh)
  single = model.init_params(config, jax.random.key(0))
  assert sharded["lm_head"].sharding.spec == P("fsdp", "tensor")
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_array_equal(a, b)


def test_rules_replicate_dimensions_the_mesh_does_not_divide(mesh):
  # 3 KV heads cannot be split 2 ways: replicated rather than failing.
  assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)
  # "batch" maps to (data, fsdp): 4 rows use both axes, 2 rows only the first.
  assert sharding.logical_to_spec(("batch", None), (4, 5), mesh) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("batch", None), (2, 5), mesh) == P("data", None)
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec(("no_such_axis",))


def test_make_mesh_shapes_and_errors():
  assert sharding.make_mesh({"tensor": 2, "fsdp": -1}).shape == {"data": 1, "fsdp": 4, "tensor": 2}
  assert sharding.make_mesh().shape["fsdp"] == 8
  with pytest.raises(ValueError, match="needs 12 devices, but 8 are available"):
    sharding.make_mesh({"data": 3, "fsdp": 4})
  assert sharding.make_mesh({"data": 1, "fsdp": 1}).devices.size == 1
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"pipeline": 2})
  with pytest.raises(ValueError, match=r"8 devices cannot fill mesh .*: the sizes given \(3 "
                                       r"devices\) do not divide them"):
    sharding.make_mesh({"data": 3, "fsdp": -1})


def test_hybrid_mesh_keeps_dcn_axes_across_processes():
  # One process with 8 devices: a DCN split is refused unless it matches the granules.
  with pytest.raises(ValueError, match="does not cover"):
    sharding.make_mesh({"fsdp": 2, "dcn": {"data": 2}})
  with pytest.raises(ValueError, match="explicit sizes"):
    sharding.make_mesh({"fsdp": -1, "dcn": {"data": 2}})
  # A DCN size of 1 everywhere is a plain mesh.
  assert sharding.make_mesh({"fsdp": 8, "dcn": {"data": 1}}).shape["fsdp"] == 8


def test_a_process_whose_devices_hold_interleaved_rows_is_refused():
  """Each process builds its contiguous block of a global batch (RL pairs rollouts with its
  rows by it): devices of process 0 of 2 holding rows 0-1 and 4-5 of 8 (a hybrid mesh with
  its DCN factor on fsdp while data > 1, as two processes showed) are refused, naming
  mesh.dcn; rows 0-3 pass, however the devices split them."""
  from memrecall.runtime import distributed
  rows = lambda *blocks: [(slice(a, b), slice(None)) for a, b in blocks]
  distributed.check_process_rows(rows((0, 2), (2, 4)), 8, process=0, processes=2)
  distributed.check_process_rows(rows((4, 8), (4, 8)), 8, process=1, processes=2)  # replicas
  with pytest.raises(sharding.MeshError, match=r"from row 0 to 5, not rows 0-3.*mesh.dcn"):
    distributed.check_process_rows(rows((0, 2), (4, 6)), 8, process=0, processes=2)
  with pytest.raises(sharding.MeshError, match="not rows 4-7"):  # the whole batch (dcn on tensor)
    distributed.check_process_rows(rows((0, 8)), 8, process=1, processes=2)


@pytest.mark.parametrize("setting, memory, mesh, chosen, tensor, kv_heads", [
    ("auto", 360, {"fsdp": 8}, "replicated", None, None),  # the copy is a third of the device
    ("auto", 359, {"fsdp": 8}, "tensor", 2, None),         # less: a half each on groups of two
    ("auto", 100, {"fsdp": 8}, "tensor", 4, None),         # a quarter each: groups of four
    ("auto", 30, {"fsdp": 8}, "sharded", None, None),      # not even an eighth: sharded
    ("auto", None, {"fsdp": 8}, "sharded", None, None),    # memory unknown (CPUs): sharded
    ("tensor", 3600, {"fsdp": 8}, "tensor", 2, None),      # the fewest devices that hold a third
    ("tensor", 30, {"fsdp": 8}, "tensor", 8, None),        # none do: all of them
    ("tensor", None, {"fsdp": 8}, "tensor", 8, None),      # unknown: as many as held the weights
    ("tensor", None, {"data": 2, "fsdp": 2, "tensor": 2}, "tensor", 4, None),
    ("sharded", 3600, {"fsdp": 8}, "sharded", None, None),  # as asked, whatever fits
    ("replicated", 1, {"fsdp": 8}, "replicated", None, None),
    # With the model's KV heads: groups that split them evenly come first.
    ("tensor", 3600, {"fsdp": 8}, "tensor", 2, 4),    # the fewest still divides them
    ("tensor", 3600, {"fsdp": 6}, "tensor", 3, 3),    # 2 fits but would not split 3 heads
    ("auto", 100, {"fsdp": 8}, "tensor", 4, 2),       # only 4 and 8 fit: the fewest, uneven
    ("tensor", None, {"fsdp": 8}, "tensor", 2, 2),    # unknown: the most that split 2 heads
    ("tensor", None, {"fsdp": 8}, "tensor", 8, 8),
    ("tensor", None, {"fsdp": 6}, "tensor", 2, 4),    # of 2, 3 and 6 only 2 splits 4 heads
    ("tensor", None, {"fsdp": 6}, "tensor", 6, 5),    # none splits 5: as many as held them
])
def test_inference_weights_replicate_a_copy_up_to_a_third_of_a_device_else_split_it(
    setting, memory, mesh, chosen, tensor, kv_heads):
  """A copy of 120 bytes split evenly over a tensor axis, on eight (or six) devices of
  `memory`, for a model of `kv_heads` key/value heads (None: not said)."""
  devices = math.prod(mesh.values())
  mesh = sharding.make_mesh(mesh, jax.devices()[:devices])
  placement, runs_on = sharding.inference_weights(
      setting, mesh, lambda m: 120 // m.shape["tensor"], memory, kv_heads)
  assert placement == chosen
  if tensor is None:
    assert runs_on is mesh
  else:  # the same devices, in their order, as data x tensor
    assert dict(runs_on.shape) == {"data": devices // tensor, "fsdp": 1, "tensor": tensor}
    assert list(runs_on.devices.flat) == list(mesh.devices.flat)


def test_inference_weights_name_a_bad_setting_and_cpus_report_no_memory():
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  with pytest.raises(ValueError, match="unknown weight placement 'copy'; choose from auto, "
                                       "sharded, tensor, replicated"):
    sharding.inference_weights("copy", mesh, lambda m: 1, 1)
  with pytest.raises(sharding.MeshError, match="a tensor axis of 3 does not divide 2 devices"):
    sharding.tensor_mesh(mesh, 3)
  assert sharding.device_memory(jax.devices("cpu")[0]) is None


def test_parameters_an_fsdp_axis_does_not_divide_are_named_before_training():
  """A hidden size of 64 on fsdp 6: the rules keep those dimensions whole, so each device
  would hold them entirely; `undivided` lists them and training says so before reading any
  weight.  On fsdp 4 nothing is kept whole and nothing is said."""
  from memrecall import run_builder
  from memrecall.models import qwen2
  from memrecall.train import trainer
  from tests.train.conftest import small_config
  for fsdp, expect_warning in ((6, True), (4, False)):
    config = small_config("sft")
    config.mesh.update(data=1, fsdp=fsdp, tensor=1)
    run = run_builder.build_run(config, jax.devices()[:fsdp])
    whole = sharding.undivided(qwen2.abstract_params(run.model), run.mesh)
    assert bool(whole) == expect_warning, whole
    assert all(run.model.hidden_size in shape for _, shape, _ in whole)
    lines = []
    trainer._warn_undivided(run, qwen2.abstract_params(run.model), lines.append)
    assert len(lines) == expect_warning, lines
    if expect_warning:
      assert "kept whole on every device of mesh" in lines[0] and "hidden size 64" in lines[0]
