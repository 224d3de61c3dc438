"""The compressor against a float64 per-window loop and against the public reference's outputs."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from memrecall.method import compressor
from memrecall.models import hf_checkpoint, qwen2 as model
from memrecall.models.config import ConfigError, ModelConfig
from memrecall.runtime import sharding
from memrecall.train import objectives


@pytest.fixture(scope="module")
def random_compressor_model(tmp_path_factory):
  """A random model with beacon parameters, exported to HF names for the reference."""
  config = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=300.0, compressor=True,
                       matmul_precision="highest")
  params = model.init_params(config, jax.random.key(0))
  params = jax.tree.map(
      lambda x: x + 0.2 * jax.random.normal(jax.random.key(x.size), x.shape), params)
  directory = tmp_path_factory.mktemp("compressor_model")
  hf_checkpoint.save_hf_checkpoint(params, config, directory)
  weights = {n: np.array(f.get(n)) for n, f in
             hf_checkpoint.iter_checkpoint_files(directory)}
  return params, config, weights


@pytest.mark.parametrize("chunk,window,ratio,length", [
    (16, 8, 4, 16),   # two windows, no padding
    (24, 8, 2, 41),   # three windows; the second chunk padded (17 of 24 real)
    (12, 12, 3, 7),   # one window, a chunk shorter than C
    (16, 16, 8, 30),
])
@pytest.mark.parametrize("query_block", [model.QUERY_BLOCK, 3])
def test_matches_float64_window_loop(random_compressor_model, monkeypatch, chunk, window, ratio,
                                     length, query_block):
  """query_block 3: raw query rows attend in blocks that skip the keys they cannot see."""
  params, config, weights = random_compressor_model
  monkeypatch.setattr(model, "QUERY_BLOCK", query_block)
  jax.clear_caches()  # `compress` was traced with the other block size
  settings = compressor.CompressorConfig(chunk_size=chunk, window=window, ratio=ratio)
  document = np.random.default_rng(length).integers(3, config.vocab_size, length)
  ids, mask = compressor.chunk_document(document, chunk, pad_id=0)
  memory = compressor.compress(params, config, settings, jnp.asarray(ids), jnp.asarray(mask))
  assert memory.k.shape == (2, ids.shape[0], chunk // ratio, 2, 8)
  hf_config = config.to_hf_dict()
  for c in range(ids.shape[0]):
    expected = reference.compress_chunk(weights, hf_config, ids[c], mask[c], window, ratio)
    for layer, (k, v) in enumerate(expected):
      np.testing.assert_allclose(memory.k[layer, c], k, atol=1e-5)
      np.testing.assert_allclose(memory.v[layer, c], v, atol=1e-5)
    slots = mask[c].reshape(-1, ratio).any(-1)
    np.testing.assert_array_equal(memory.slot_mask[c], slots)


@pytest.mark.parametrize("head_chunk_tokens", [0, 5])
def test_raw_token_scores_match_float64_window_loop(random_compressor_model, head_chunk_tokens):
  """The pre-training objective's inputs: the raw tokens' next-token log-probs as the
  compressor sees them (`compressor_hidden`, then the LM head in chunks of 2 rows x 2
  positions at head_chunk_tokens 5) against the float64 loop's logits."""
  params, config, weights = random_compressor_model
  config = config.replace(head_chunk_tokens=head_chunk_tokens)
  settings = compressor.CompressorConfig(chunk_size=24, window=8, ratio=2)
  document = np.random.default_rng(3).integers(3, config.vocab_size, 41)
  ids, mask = compressor.chunk_document(document, 24, pad_id=0)  # the second chunk padded
  hidden = compressor.compressor_hidden(params, config, settings, jnp.asarray(ids),
                                        jnp.asarray(mask))
  logp, _ = model.token_logprobs(params, config, hidden[:, :-1], jnp.asarray(ids[:, 1:]))
  boundary = []  # predicted from the first token of a later window: it sees only beacons
  for c in range(ids.shape[0]):
    _, logits = reference.compress_chunk(weights, config.to_hf_dict(), ids[c], mask[c], 8, 2,
                                         raw_logits=True)
    top = logits.max(-1, keepdims=True)
    ref = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    expected = np.take_along_axis(ref[:-1], ids[c, 1:, None], -1)[:, 0]
    real = mask[c, 1:].astype(bool) & mask[c, :-1].astype(bool)
    np.testing.assert_allclose(np.asarray(logp[c])[real], expected[real], atol=2e-5)
    boundary += [expected[j] for j in (8, 16) if real[j]]
  # The objective's loss and boundary metric on the same chunks.
  setup = objectives.TrainSetup(config, settings, prompts=None, reader=None)
  _, metrics = objectives.compressor_loss(params, setup, jnp.asarray(ids), jnp.asarray(mask))
  assert len(boundary) == 3  # 8 and 16 of the whole chunk, 8 of the padded one (17 tokens)
  np.testing.assert_allclose(metrics["boundary_nll"], -np.mean(boundary), atol=2e-5)


@pytest.mark.parametrize("prefix,window,ratio,block", [(0, 8, 4, 3), (6, 8, 2, 4), (4, 12, 3, 5)])
def test_key_limits_only_skip_keys_the_mask_hides(prefix, window, ratio, block):
  raw_mask = np.random.default_rng(window).random((2, window)) < 0.8
  _, mask = compressor.window_inputs(jnp.asarray(raw_mask), prefix, ratio)
  mask = np.asarray(mask)[:, 0]  # [N, T, P + T]
  limits = model.compression_key_limits(prefix, window, window // ratio, block)
  _, all_valid = compressor.window_inputs(jnp.ones((1, window), bool), prefix, ratio)
  start = 0
  for end, count in limits:
    assert not mask[:, start:end, count:].any()
    assert np.asarray(all_valid)[0, 0, end - 1, count - 1]  # no tighter limit exists
    start = end
  assert start == window + window // ratio
  assert len(limits) == -(-window // block) + 1
  assert model.compression_key_limits(prefix, window, window // ratio, window) is None
  # the interleaved key order the limits assume
  rows = np.arange(window + window // ratio)[None, :, None]
  interleaved = np.asarray(model.interleave_beacons(jnp.asarray(rows), window // ratio))[0, :, 0]
  np.testing.assert_array_equal(interleaved, np.argsort(compressor._interleaved_order(window, ratio)))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialised_compression_has_the_same_values_and_gradients(random_compressor_model,
                                                                      remat):
  params, config, _ = random_compressor_model
  settings = compressor.CompressorConfig(chunk_size=16, window=8, ratio=4)
  ids, mask = compressor.chunk_document(np.arange(3, 30), 16, pad_id=0)

  def loss(params, config):
    memory = compressor.compress(params, config, settings, jnp.asarray(ids), jnp.asarray(mask))
    return jnp.sum(memory.k ** 2) + jnp.sum(jnp.sin(memory.v))

  plain = jax.value_and_grad(loss)(params, config)
  remat_config = dataclasses.replace(config, remat=remat)
  rematerialised = jax.value_and_grad(loss)(params, remat_config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
               plain, rematerialised)
  # The last layer's MLP never reaches the memory; the layers before it do.
  mlp = plain[1]["layers"]["mlp"]["down_kernel"]  # [L, M, E]
  assert np.abs(mlp[-1]).max() == 0 and np.abs(mlp[0]).max() > 0


@pytest.mark.parametrize("group_size", [3, 5, 8])
def test_compression_in_groups_equals_one_call(random_compressor_model, group_size):
  """Groups (the last one padded when 8 % group_size != 0) give one call's values and gradients."""
  params, config, _ = random_compressor_model
  whole = compressor.CompressorConfig(chunk_size=16, window=8, ratio=4)
  grouped = dataclasses.replace(whole, group_size=group_size)
  document = np.random.default_rng(1).integers(3, config.vocab_size, 8 * 16 - 5)
  ids, mask = (jnp.asarray(x) for x in compressor.chunk_document(document, 16, pad_id=0))

  def loss(params, settings):
    memory = compressor.compress(params, config, settings, ids, mask)
    return jnp.sum(memory.k ** 2) + jnp.sum(jnp.sin(memory.v)), memory

  (value, expected), grads = jax.value_and_grad(loss, has_aux=True)(params, whole)
  (grouped_value, memory), grouped_grads = jax.value_and_grad(loss, has_aux=True)(params, grouped)
  assert memory.k.shape == expected.k.shape == (2, 8, 4, 2, 8)
  # Batched matmuls of another size round differently: float32 ulps, not exact.
  np.testing.assert_allclose(memory.k, expected.k, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(memory.v, expected.v, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(memory.slot_mask, expected.slot_mask)
  np.testing.assert_allclose(grouped_value, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
               grouped_grads, grads)


@pytest.mark.multidevice
def test_groups_on_a_mesh_take_each_devices_own_chunks(random_compressor_model):
  """Under a mesh splitting 24 chunks over 8 devices (3 each), groups of 2 take 2 chunks from
  every device (the last padded): the values of one call, the output still split by chunk,
  and no data moved between devices (the parameters are replicated here).  Groups of the
  whole batch made every device compress every chunk of a group and replicated the output."""
  params, config, _ = random_compressor_model
  whole = compressor.CompressorConfig(chunk_size=16, window=8, ratio=4, group_size=0)
  document = np.random.default_rng(4).integers(3, config.vocab_size, 24 * 16 - 7)
  ids, mask = (jnp.asarray(x) for x in compressor.chunk_document(document, 16, pad_id=0))
  expected = compressor.compress(params, config, whole, ids, mask)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  with jax.set_mesh(mesh):
    split = sharding.logical_sharding(("chunks", None), ids.shape, mesh)
    ids, mask = jax.device_put(ids, split), jax.device_put(mask, split)
    grouped = dataclasses.replace(whole, group_size=2)
    compiled = jax.jit(compressor.compress, static_argnums=(1, 2)).lower(
        params, config, grouped, ids, mask).compile()
    memory = compiled(params, ids, mask)
  assert memory.k.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
  hlo = compiled.as_text()
  assert " while(" in hlo  # the groups' loop
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo, collective
  np.testing.assert_allclose(memory.k, expected.k, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(memory.v, expected.v, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(memory.slot_mask, expected.slot_mask)


def test_compression_for_gradients_is_one_call_whatever_the_group_size(random_compressor_model):
  """A training loss compresses its rows in one call: a group loop would add a float32
  gradient accumulator of the parameters' size to the step."""
  params, config, _ = random_compressor_model
  ids = jnp.ones((6, 16), jnp.int32)
  def program(group_size):
    settings = compressor.CompressorConfig(chunk_size=16, window=8, ratio=4, group_size=group_size)
    loss = lambda p: jnp.sum(compressor.compress(p, config, settings, ids, ids > 0,
                                                 for_gradients=True).k)
    return jax.jit(jax.grad(loss)).lower(params).as_text()
  assert program(1) == program(0)


@pytest.mark.parametrize("group_size", [0, 3])
def test_per_layer_layout_compresses_as_the_scanned_stack(random_compressor_model, group_size):
  params, config, _ = random_compressor_model
  settings = compressor.CompressorConfig(chunk_size=16, window=8, ratio=4, group_size=group_size)
  document = np.random.default_rng(3).integers(3, config.vocab_size, 6 * 16 - 3)
  ids, mask = (jnp.asarray(x) for x in compressor.chunk_document(document, 16, pad_id=0))
  expected = compressor.compress(params, config, settings, ids, mask)
  memory = compressor.compress(*model.unstack_layers(params, config), settings, ids, mask)
  np.testing.assert_allclose(memory.k, expected.k, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(memory.v, expected.v, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(memory.slot_mask, expected.slot_mask)


def test_compression_does_not_copy_the_layer_weights():
  """Skipping the last layer's unused work must not materialise a slice of the layer stack."""
  config = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=1024, num_layers=8,
                       num_heads=4, num_kv_heads=2, head_dim=16, compressor=True,
                       matmul_precision="highest")
  params = model.init_params(config, jax.random.key(0))
  settings = compressor.CompressorConfig(chunk_size=16, window=8, ratio=4)
  ids = jnp.zeros((4, 16), jnp.int32)
  compiled = compressor.compress.lower(params, config, settings, ids, ids > 0).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert analysis.temp_size_in_bytes < 0.5 * param_bytes, (analysis.temp_size_in_bytes,
                                                            param_bytes)


def test_compression_backward_keeps_no_weight_gradient_per_window():
  """The layer loop is the outer one (`compressor._window_layers`), so the backward pass makes
  one stacked weight gradient for all of a chunk's windows.  With the window loop outside, each
  window's layer scan made its own (a stack of the layers' size, alive until the block's
  backward ended); 4 windows then needed about 3.5 stacks of temporaries at 4 layers, 2
  windows 1.7.  Now each window more costs one layer's gradient and its activations."""
  config = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=1024, num_layers=8,
                       num_heads=4, num_kv_heads=2, head_dim=16, compressor=True, remat="full",
                       matmul_precision="highest")
  params = model.init_params(config, jax.random.key(0))
  stack_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))
  def temp_bytes(windows):
    settings = compressor.CompressorConfig(chunk_size=8 * windows, window=8, ratio=4)
    ids = jnp.ones((2, 8 * windows), jnp.int32)
    loss = lambda p: jnp.sum(compressor.compress(p, config, settings, ids, ids > 0,
                                                 for_gradients=True).k ** 2)
    analysis = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis()
    if analysis is None:
      pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes
  per_window = (temp_bytes(4) - temp_bytes(2)) / 2
  assert per_window < 0.25 * stack_bytes, (per_window, stack_bytes)


def test_matches_the_public_reference_fixture(lychee_reference, lychee_dir):
  params, config = hf_checkpoint.load_hf_checkpoint(lychee_dir, matmul_precision="highest")
  assert config.compressor
  settings = compressor.CompressorConfig.from_hf_dict(
      json.loads(str(lychee_reference["config_json"])), chunk_size=1024)
  assert (settings.window, settings.ratio) == (512, 4)
  ids, mask = compressor.chunk_document(lychee_reference["in/text_ids"][0], 1024, pad_id=0)
  memory = compressor.compress(params, config, settings, jnp.asarray(ids), jnp.asarray(mask))
  for c in range(3):
    np.testing.assert_array_equal(ids[c], lychee_reference[f"chunk{c}/text_ids"][0])
    np.testing.assert_array_equal(memory.slot_mask[c], lychee_reference[f"chunk{c}/kv_mask"][0] == 1)
    for layer in range(2):
      for name, ours in (("key", memory.k), ("value", memory.v)):
        ref = lychee_reference[f"chunk{c}/layer{layer}/{name}"][0].transpose(1, 0, 2)  # [S, K, D]
        rel = np.abs(np.asarray(ours[layer, c]) - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, (c, layer, name, rel)


def test_plain_qwen2_checkpoint_gets_initialised_beacons(tiny_dir):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, compressor=True,
                                                    matmul_precision="highest")
  attention = params["layers"]["attention"]
  for p in "qkv":
    np.testing.assert_array_equal(attention[f"beacon_{p}_kernel"], attention[f"{p}_kernel"])
    np.testing.assert_array_equal(attention[f"beacon_{p}_bias"], attention[f"{p}_bias"])
  eos = config.eos_token_ids[0]
  np.testing.assert_array_equal(params["beacon_embedding"][0], params["embedding"][eos])


def test_bad_settings_and_inputs():
  with pytest.raises(ConfigError, match="group_size"):
    compressor.CompressorConfig(chunk_size=16, window=8, ratio=4, group_size=-1)
  with pytest.raises(ConfigError, match="multiple of the window"):
    compressor.CompressorConfig(chunk_size=100, window=64, ratio=4)
  with pytest.raises(ConfigError, match="multiple of the ratio"):
    compressor.CompressorConfig(chunk_size=60, window=30, ratio=4)
  with pytest.raises(ValueError, match="document is empty"):
    compressor.chunk_document([], 16, 0)
  config = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=8, matmul_precision="highest")
  params = model.init_params(config, jax.random.key(0))
  with pytest.raises(ConfigError, match="no compressor parameters"):
    compressor.compress(params, config, compressor.CompressorConfig(16, 8, 4),
                        jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), bool))
