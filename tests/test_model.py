"""The decoder against an independent float64 reference, HF transformers fixtures and its own cache."""

import json
import os
import re

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ml_dtypes

import reference
from tests.conftest import FIXTURES, needs_cuda_plugin, needs_libtpu
from memrecall.models import hf_checkpoint, qwen2 as model, sampling
from memrecall.models.config import ModelConfig
from memrecall.models.safetensors_io import iter_checkpoint_files


def _hf_weights(directory):
  return {name: np.array(f.get(name)) for name, f in iter_checkpoint_files(directory)}


def _valid_rel_error(ours, ref, mask):
  mask = mask.astype(bool)
  return np.abs(np.asarray(ours)[mask] - ref[mask]).max() / np.abs(ref[mask]).max()


@pytest.mark.parametrize("directory,prefix", [("qwen2_tiny", "logits"),
                                              ("qwen2_tiny_sharded", "logits"),
                                              ("qwen2_tiny_tied", "tied_logits")])
def test_logits_match_transformers_fixture(hf_reference, directory, prefix):
  params, config = hf_checkpoint.load_hf_checkpoint(os.path.join(FIXTURES, directory),
                                                    matmul_precision="highest")
  tokens, mask = hf_reference[f"{prefix}/input_ids"], hf_reference[f"{prefix}/attention_mask"]
  # The batch mixes no padding, left padding and right padding.
  assert (mask == 0).any(axis=1).sum() == 2
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert _valid_rel_error(logits, hf_reference[f"{prefix}/logits"], mask) <= 1e-4


def test_logits_match_float64_loop_reference(hf_reference, tiny_dir):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, matmul_precision="highest")
  hf_config = json.load(open(os.path.join(tiny_dir, "config.json")))
  tokens, mask = hf_reference["logits/input_ids"], hf_reference["logits/attention_mask"]
  ref = reference.forward(_hf_weights(tiny_dir), hf_config, tokens, mask)
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert _valid_rel_error(logits, ref, mask) <= 1e-5


@pytest.mark.parametrize("query_block,mlp_chunk_tokens", [(model.QUERY_BLOCK, 0), (2, 0), (2, 5)])
def test_random_init_matches_reference_through_export(tmp_path, monkeypatch, query_block,
                                                      mlp_chunk_tokens):
  """Random memrecall params, exported to HF names, agree with the float64 loop reference
  (query_block 2: causal attention in blocks of 2 queries, each skipping the later keys;
  mlp_chunk_tokens 5: the MLP over 2 rows x 2 positions at a time, 4 chunks for 7 positions,
  the last overlapping the third)."""
  monkeypatch.setattr(model, "QUERY_BLOCK", query_block)
  config = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=3,
                       num_heads=6, num_kv_heads=3, head_dim=8, rope_theta=500.0,
                       tie_word_embeddings=True, matmul_precision="highest",
                       mlp_chunk_tokens=mlp_chunk_tokens)
  params = model.init_params(config, jax.random.key(3))
  # Make biases and norms non-trivial so that their paths are exercised.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), params)
  hf_checkpoint.save_hf_checkpoint(params, config, tmp_path)
  tokens = np.random.default_rng(0).integers(0, 97, (2, 7))
  mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
  ref = reference.forward(_hf_weights(tmp_path), config.to_hf_dict(), tokens, mask)
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert _valid_rel_error(logits, ref, mask) <= 1e-5


def test_a_config_is_initialised_by_one_traced_program():
  """A second `init_params` of the same config (and mesh) runs the program the first compiled,
  with new values from a new key: a jit made per call traced and lowered it again each time."""
  from jax import monitoring
  config = ModelConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=8)
  keys = [jax.random.key(seed) for seed in range(3)]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
  traces = []
  def count(event, duration, **kw):
    if event == "/jax/core/compile/jaxpr_trace_duration":
      traces.append(duration)
  model._init_program.cache_clear()  # pylint: disable=protected-access  (a rerun traces again)
  monitoring.register_event_duration_secs_listener(count)
  try:
    first = model.init_params(config, keys[0])
    once = len(traces)
    second = model.init_params(config, keys[1])
    again = len(traces)
    model.init_params(config, keys[2], mesh)  # another mesh: its own program
  finally:
    monitoring.unregister_event_duration_listener(count)
  assert once >= 1 and again == once and len(traces) > again
  embed = lambda p: np.asarray(p["embedding"])
  assert embed(first).shape == embed(second).shape and not np.array_equal(embed(first),
                                                                          embed(second))


@pytest.mark.parametrize("query_block", [model.QUERY_BLOCK, 2])
def test_cached_decode_equals_full_forward_at_every_step(tiny_dir, monkeypatch, query_block):
  """query_block 2: the prompt written into a cache with room after it attends in blocks."""
  monkeypatch.setattr(model, "QUERY_BLOCK", query_block)
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, matmul_precision="highest")
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(3, config.vocab_size, (2, 12)))
  prompt_mask = jnp.asarray([[1] * 5, [0, 0, 1, 1, 1]], bool)
  full_mask = jnp.concatenate([prompt_mask, jnp.ones((2, 7), bool)], axis=1)
  full, _ = model.forward(params, config, tokens, full_mask)
  cache = model.init_cache(config, 2, 12)
  logits, cache = model.forward(params, config, tokens[:, :5], prompt_mask, cache)
  np.testing.assert_allclose(logits[0], full[0, :5], atol=1e-5)
  np.testing.assert_allclose(logits[1, 2:], full[1, 2:5], atol=1e-5)
  # Four tokens at once after the prompt (queries in the middle of the cache), then one by one.
  chunk_logits, cache = model.forward(params, config, tokens[:, 5:9], None, cache)
  np.testing.assert_allclose(chunk_logits, full[:, 5:9], atol=1e-5, rtol=1e-5)
  for t in range(9, 12):
    step_logits, cache = model.forward(params, config, tokens[:, t:t + 1], None, cache)
    np.testing.assert_allclose(step_logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
  assert int(cache.index) == 12
  np.testing.assert_array_equal(cache.next_position, [12, 10])


def test_per_layer_layout_equals_the_scanned_stack(tiny_dir):
  """`unstack_layers` (inference's layout) gives the scanned stack's logits and cache, and
  `stack_layers` restores the checkpoint layout exactly."""
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, matmul_precision="highest")
  split, split_config = model.unstack_layers(params, config)
  assert not split_config.scan_layers and "layers" not in split
  assert sorted(k for k in split if k.startswith("layers_")) == [
      f"layers_{i}" for i in range(config.num_layers)]
  abstract = jax.tree.map(lambda x: x.shape, nn.unbox(model.abstract_params(split_config)))
  assert abstract == jax.tree.map(lambda x: x.shape, split)
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, config.vocab_size, (2, 9)))
  mask = jnp.asarray([[1] * 9, [0, 0] + [1] * 7], bool)
  np.testing.assert_allclose(model.forward(split, split_config, tokens, mask)[0],
                             model.forward(params, config, tokens, mask)[0], atol=2e-5, rtol=1e-5)
  caches = [model.init_cache(config, 2, 10), model.init_cache(split_config, 2, 10)]
  assert isinstance(caches[1].k, tuple) and len(caches[1].k) == config.num_layers
  for t in (tokens[:, :8], tokens[:, 8:]):
    (a, caches[0]), (b, caches[1]) = (model.forward(params, config, t, None, caches[0]),
                                      model.forward(split, split_config, t, None, caches[1]))
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.stack(caches[1].k), caches[0].k, atol=1e-5)
  np.testing.assert_allclose(np.stack(caches[1].v), caches[0].v, atol=1e-5)
  restored, restored_config = model.stack_layers(split, split_config)
  assert restored_config == config
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  assert model.unstack_layers(split, split_config)[0] is split  # already split: unchanged
  with pytest.raises(ValueError, match="lack per-layer subtrees"):
    model.stack_layers({k: v for k, v in split.items() if k != "layers_1"}, split_config)


def test_a_forward_traces_no_initializer_and_names_a_parameter_of_the_wrong_shape(tiny_dir,
                                                                                 monkeypatch):
  """Reading existing parameters traces none of their initializers (Flax's own check traced
  each one at every read: a third of a recall program's tracing), and a parameter of another
  shape is still refused by name."""
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, gate_lora_rank=2)
  tokens, mask = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool)
  traced = []  # the functions Flax's parameter reads trace (Scope.param's lambdas)
  eval_shape = jax.eval_shape
  def recording(f, *args, **kwargs):
    if ".param." in f.__qualname__:
      traced.append(f.__qualname__)
    return eval_shape(f, *args, **kwargs)
  monkeypatch.setattr(jax, "eval_shape", recording)
  jax.make_jaxpr(lambda p: model.forward(p, config, tokens, mask))(params)
  assert traced == []
  for path, wrong in ((("final_norm", "scale"), (config.hidden_size + 1,)),
                      (("layers", "attention", "q_kernel"), (config.num_layers, 3, 4, 5))):
    bad = jax.tree.map(lambda x: x, params)
    node = bad
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = jnp.zeros(wrong)
    with pytest.raises(flax.errors.ScopeParamShapeError, match=f'"{path[-1]}"'):
      model.forward(bad, config, tokens, mask)


def test_inference_params_hold_the_compute_dtype_and_change_no_output(tiny_dir):
  """float32 master weights computed in bfloat16: the inference copy stores what each product
  casts to (bfloat16; the gate's float32 head as it is), and its logits and cache are those of
  the master weights bit for bit."""
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, dtype="bfloat16", gate_lora_rank=2,
                                                    compressor=True)
  assert config.param_dtype == "float32"
  cast, cast_config = model.inference_params(params, config)
  split, split_config = model.unstack_layers(params, config)
  assert cast_config == split_config.replace(param_dtype="bfloat16")
  assert cast["layers_0"]["mlp"]["up_kernel"].dtype == jnp.bfloat16
  assert cast["embedding"].dtype == cast["beacon_embedding"].dtype == jnp.bfloat16
  assert cast["gate_head"].dtype == cast["gate_bias"].dtype == jnp.float32  # read in float32
  tokens = jnp.asarray(np.random.default_rng(3).integers(3, config.vocab_size, (2, 7)))
  mask = jnp.asarray([[1] * 7, [0] + [1] * 6], bool)
  caches = [model.init_cache(split_config, 2, 8), model.init_cache(cast_config, 2, 8)]
  (a, caches[0]), (b, caches[1]) = (model.forward(split, split_config, tokens, mask, caches[0]),
                                    model.forward(cast, cast_config, tokens, mask, caches[1]))
  np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  jax.tree.map(np.testing.assert_array_equal, caches[1], caches[0])
  # Already in the inference layout and the compute dtype: nothing to do.
  same, same_config = model.inference_params(cast, cast_config)
  assert same is cast and same_config == cast_config


def _cpu():
  """These tests read XLA:CPU's compiled HLO (its op names and fusions), on any machine."""
  try:
    return jax.default_device(jax.devices("cpu")[0])
  except RuntimeError:
    pytest.skip("JAX_PLATFORMS leaves out the CPU backend whose HLO this test reads")


def test_per_layer_decode_step_copies_no_weights():
  """The reason for the layout: a scanned stack's decode step copies weight slices (XLA's
  dynamic-slices of the stack); per-layer arrays are read where they lie."""
  with _cpu():
    _per_layer_decode_step_copies_no_weights()


def _per_layer_decode_step_copies_no_weights():
  config = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=384, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=32, matmul_precision="highest")
  params = model.init_params(config, jax.random.key(0))
  # A layer kernel's shapes: [128, 384], [384, 128], [128, 4, 32], [4, 32, 128] ...
  kernels = {tuple(x.shape[1:]) for path, x in jax.tree_util.tree_leaves_with_path(params["layers"])
             if "kernel" in jax.tree_util.keystr(path)}

  def weight_sized_copies(params, config):
    step = jax.jit(lambda p, c, t: model.forward(p, config, t, None, c))
    text = step.lower(params, model.init_cache(config, 1, 8),
                      jnp.ones((1, 1), jnp.int32)).compile().as_text()
    shapes = re.findall(r"= f32\[([0-9,]+)\][^ ]* (?:fusion|copy|slice|dynamic-slice|transpose)\(",
                        text)
    shapes = [tuple(int(d) for d in s.split(",")) for s in shapes]
    # A copied kernel, a slice of the stack ([1, ...]) or a reshaped/transposed kernel.
    sizes = {np.prod(k) for k in kernels}
    return sum(s in kernels or s[1:] in kernels or (len(s) == 2 and np.prod(s) in sizes)
               for s in shapes)

  assert weight_sized_copies(params, config) > 0  # the scanned stack does copy
  assert weight_sized_copies(*model.unstack_layers(params, config)) == 0


def test_decode_loop_copies_neither_the_cache_nor_a_weight():
  """A decode step must move only what it reads: in the compiled sampling loop (inference's
  per-layer layout) every cache-sized array is a loop parameter or an in-place update (a
  dynamic-update-slice), never a copy, transpose or concatenation (a [B, S, K, D] cache was
  transposed by every layer, and the stacked one rebuilt, at every step), and no weight is
  copied."""
  with _cpu():
    _decode_loop_copies_neither_the_cache_nor_a_weight()


@needs_cuda_plugin
def test_7b_decode_loop_compiled_for_an_h100_copies_neither_the_cache_nor_a_weight():
  """The loop at Qwen2.5-7B shapes (bfloat16, batch 8; abstract inputs, nothing allocated)
  compiled by XLA's GPU compiler for a deviceless H100: its own layouts and fusions, which the
  CPU's HLO cannot show.  XLA merges each layer's q/k/v products into one gemm fusion that
  reads the three kernels where they lie; at toy shapes it materialises their concatenation
  at every step instead, so this runs at the shape that matters."""
  from configs import models
  from memrecall.capacity import targets
  try:
    device = targets.deviceless(targets.parse_target("h100:1")).devices[0]
  except (ImportError, targets.TopologyError) as e:  # an older plugin (a GPU image's own)
    pytest.skip(f"this CUDA plugin compiles for no deviceless GPU: {e}")
  config = ModelConfig.from_dict(models.model_config("qwen2.5-7b").to_dict())
  _decode_loop_copies_neither_the_cache_nor_a_weight(config, batch=8, size=1024, device=device)


def _top_level_instructions(text: str):
  """(name, dtype, shape, op) of every instruction outside fused computations (a fusion's
  body is one kernel: what it reads and writes is the fusion's own operands and result)."""
  fused = set(re.findall(r"kind=k\w+, calls=%([\w.-]+)", text))
  keep = True
  for line in text.splitlines():
    header = re.match(r"(?:ENTRY )?%([\w.-]+) .*\{$", line)
    if header:
      keep = header[1] not in fused
    found = re.match(r"\s*(?:ROOT )?%([\w.-]+) = (f32|bf16)\[([0-9,]+)\]\{[0-9,]*\} ([\w-]+)\(",
                     line)
    if keep and found:
      yield found[1], found[2], tuple(int(d) for d in found[3].split(",")), found[4]


def _decode_loop_copies_neither_the_cache_nor_a_weight(config=None, batch=3, size=40,
                                                       device=None):
  """device: compile abstract inputs for it (a deviceless GPU), else real ones for the default
  device.  A weight is copied if an array shaped like one, or like a merged or transposed
  [hidden, n] projection, is made anywhere but as a parameter."""
  if config is None:
    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=16)
  layout = {}

  def inputs():
    params, layout["config"] = model.unstack_layers(
        model.init_params(config, jax.random.key(0)), config)
    return (params, model.init_cache(layout["config"], batch, size),
            jnp.zeros((batch, config.vocab_size)), jax.random.key(1))
  if device is None:
    args = inputs()
  else:
    on_device = jax.sharding.SingleDeviceSharding(device)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device),
                        jax.eval_shape(inputs))
  params, cache, logits, key = args
  lowered = sampling.sample_loop.lower(
      params, layout["config"], cache, logits, key, max_new_tokens=4,
      sampling=sampling.SamplingConfig(eos_ids=(1,)))
  text = lowered.compile().as_text()
  layer = (batch, size, config.num_kv_heads, config.head_dim)
  cache_shapes = {(batch, config.num_kv_heads, size, config.head_dim), layer,
                  (config.num_layers, batch, config.num_kv_heads, size, config.head_dim),
                  (config.num_layers,) + layer}
  weight_shapes = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim >= 2}
  hidden = config.hidden_size
  weight_like = lambda shape: shape in weight_shapes or (
      len(shape) == 2 and hidden in shape and min(shape) >= config.head_dim)
  found = {}
  for name, _, shape, op in _top_level_instructions(text):
    if shape in cache_shapes:
      found.setdefault("cache", []).append((name, op))
    elif weight_like(shape) and op not in ("parameter", "get-tuple-element", "bitcast"):
      found.setdefault("weight", []).append((name, op))
  # An in-place update fusion is named for its root: dynamic-update-slice (CPU) or
  # loop_dynamic_update_slice_fusion (GPU).
  in_place = lambda name, op: op in ("parameter", "get-tuple-element", "dynamic-update-slice",
                                     "bitcast") or (op == "fusion" and re.search(
                                         "dynamic.update.slice", name))
  assert found["cache"] and all(in_place(*x) for x in found["cache"]), found["cache"]
  assert not found.get("weight"), found["weight"]


def test_every_dot_takes_the_configured_precision(tiny_dir):
  """`matmul_precision` reaches every dot of the model: the LM head, projections, MLP,
  attention (with and without a cache), the compressor's beacon projections, the gate's
  adapters and head.  ("default" leaves them to `jax_default_matmul_precision`.)"""
  from memrecall.method import compressor
  base = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, compressor=True, gate_lora_rank=2)
  settings = compressor.CompressorConfig(chunk_size=16, window=8, ratio=4)

  def precisions(config):
    params = model.init_params(config, jax.random.key(0))
    tokens = jnp.ones((1, 6), jnp.int32)
    programs = [
        jax.jit(lambda p: model.forward(p, config, tokens, use_lora=True)).lower(params),
        jax.jit(lambda p, c: model.forward(p, config, tokens[:, :1], None, c)).lower(
            params, model.init_cache(config, 1, 8)),
        jax.jit(lambda p: compressor.compress(p, config, settings, jnp.ones((2, 16), jnp.int32),
                                              jnp.ones((2, 16), bool))).lower(params),
        jax.jit(lambda p: model.Qwen2(config).apply({"params": p}, jnp.ones((1, 32)),
                                                    method=model.Qwen2.gate_logit)).lower(params)]
    found = []
    for lowered in programs:
      for line in lowered.as_text().splitlines():
        if "stablehlo.dot_general" in line:
          found.append(re.search(r"precision = \[(\w+), (\w+)\]", line).groups()
                       if "precision" in line else ("DEFAULT", "DEFAULT"))
    return found

  highest = precisions(base.replace(matmul_precision="highest"))
  assert len(highest) >= 20 and set(highest) == {("HIGHEST", "HIGHEST")}
  assert set(precisions(base)) == {("DEFAULT", "DEFAULT")}
  with pytest.raises(ValueError, match="matmul_precision must be one of"):
    base.replace(matmul_precision="tf32")


def test_bfloat16_compute_stays_close_to_float32(tiny_dir, hf_reference):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, param_dtype="bfloat16",
                                                    dtype="bfloat16")
  assert params["layers"]["mlp"]["up_kernel"].dtype == jnp.bfloat16
  tokens, mask = hf_reference["logits/input_ids"], hf_reference["logits/attention_mask"]
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert logits.dtype == jnp.float32
  assert _valid_rel_error(logits, hf_reference["logits/logits"], mask) <= 0.05


def test_compute_copy_rounds_as_astype_with_astypes_derivatives():
  rng = np.random.default_rng(0)
  scale = np.float32(10.0) ** rng.integers(-44, 38, 60_000).astype(np.float32)
  values = np.concatenate([
      (rng.standard_normal(60_000) * scale).astype(np.float32),
      # every half-way case (ties to even, both parities) and every NaN/Inf exponent pattern
      ((np.arange(1 << 16, dtype=np.uint32) << 16) | 0x8000).view(np.float32),
      np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 3.4028235e38, 1e-45, 1.2e-38],
               np.float32)])
  ours = np.asarray(jax.jit(lambda x: model.compute_copy(x, jnp.bfloat16))(values))
  with np.errstate(invalid="ignore"):  # the NaNs
    want = values.astype(ml_dtypes.bfloat16)  # ml_dtypes' own rounding, not XLA's
  assert ours.dtype == want.dtype
  nan = np.isnan(want.astype(np.float32))
  np.testing.assert_array_equal(np.isnan(ours.astype(np.float32)), nan)
  np.testing.assert_array_equal(ours.view(np.uint16)[~nan], want.view(np.uint16)[~nan])

  weights = jnp.asarray(values[:1000])
  cotangent = jnp.asarray(rng.standard_normal(1000), jnp.bfloat16)
  grad = lambda cast: jax.grad(lambda w: jnp.vdot(cast(w), cotangent).astype(jnp.float32))(weights)
  np.testing.assert_array_equal(grad(lambda w: model.compute_copy(w, jnp.bfloat16)),
                                grad(lambda w: w.astype(jnp.bfloat16)))
  tangent = jnp.asarray(rng.standard_normal(1000), jnp.float32)
  jvp = lambda cast: jax.jvp(cast, (weights,), (tangent,))
  for ours, theirs in zip(jvp(lambda w: model.compute_copy(w, jnp.bfloat16)),
                          jvp(lambda w: w.astype(jnp.bfloat16))):
    np.testing.assert_array_equal(ours, theirs)
  assert model.compute_copy(weights, jnp.float32) is weights


def test_float32_weights_in_bfloat16_products_give_astypes_loss_and_gradient(tiny_dir, monkeypatch):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, param_dtype="float32",
                                                    dtype="bfloat16")
  tokens = jnp.arange(3, 19).reshape(2, 8)

  def loss(p):
    # XLA's attention: cuDNN's backward need not be deterministic on a GPU, and bit-equality
    # is about the weights' cast, not the attention kernel.
    logits, _ = model.forward(p, config.replace(remat="full", attention="xla"), tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  ours = jax.value_and_grad(loss)(params)
  monkeypatch.setattr(model, "compute_copy", lambda w, dtype: w.astype(dtype))
  plain = jax.value_and_grad(loss)(params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), strict=True):
    np.testing.assert_array_equal(a, b)


@needs_libtpu
def test_tpu_step_holds_no_bfloat16_copy_of_a_weight_stack(monkeypatch):
  """float32 weights, bfloat16 products, two passes over the layers (as a step's block scan
  makes): compiled for a TPU, no bfloat16 buffer shaped like a whole [L, ...] weight stack
  (the compiler's bfloat16 propagation hoists a plain cast's; the control shows it still does)."""
  from jax.sharding import SingleDeviceSharding
  from memrecall.capacity import tpu_slices
  config = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=3,
                       num_heads=2, num_kv_heads=1, head_dim=64, param_dtype="float32",
                       dtype="bfloat16", remat="full", gate_lora_rank=4)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nn.unbox(model.abstract_params(config)))
  tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
  stacks = {"bf16[%s]" % ",".join(map(str, leaf.shape)) for leaf in jax.tree.leaves(params["layers"])}
  device = SingleDeviceSharding(tpu_slices.deviceless_devices(tpu_slices.parse_slice("v5e:2x2"))[0])

  def loss(p, tokens):
    def block(total, _):
      logits, _ = model.forward(p, config, tokens)
      return total + logits.mean(), None
    return jax.lax.scan(block, 0.0, None, length=2)[0]

  def bfloat16_stacks():
    text = jax.jit(jax.grad(loss), in_shardings=device, out_shardings=device).lower(
        params, tokens).compile().as_text()
    return sorted(s for s in stacks if s in text)

  assert bfloat16_stacks() == []
  monkeypatch.setattr(model, "compute_copy", lambda w, dtype: w.astype(dtype))
  assert bfloat16_stacks() != []  # a plain cast is still hoisted: the check above can fail


def test_remat_does_not_change_gradients(tiny_dir):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, matmul_precision="highest")
  tokens = jnp.arange(3, 19).reshape(2, 8)

  def loss(p, cfg):
    logits, _ = model.forward(p, cfg, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  plain = jax.grad(loss)(params, config)
  for policy in ("full", "dots"):
    rematted = jax.grad(loss)(params, config.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
      np.testing.assert_allclose(a, b, atol=1e-6)


def test_the_mlp_in_token_chunks_gives_the_same_values_and_gradients(tiny_dir):
  """`mlp_chunk_tokens` runs the MLP over a few positions at a time (here 2 rows x 3, 6 chunks
  for 16 positions, the last overlapping): logits, the gate's adapters on the MLP, and every
  gradient are those of the MLP in one piece."""
  params, config = hf_checkpoint.load_hf_checkpoint(
      tiny_dir, matmul_precision="highest", gate_lora_rank=4,
      gate_lora_targets=("gate", "up", "down"))
  params = jax.tree.map(lambda x: x + 0.01, params)  # adapters' B away from zero
  tokens = jnp.arange(3, 35).reshape(2, 16)

  def loss(p, cfg):
    logits, _ = model.forward(p, cfg, tokens, use_lora=True)
    return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

  whole, chunked = (jax.grad(loss, has_aux=True)(params, config.replace(mlp_chunk_tokens=n))
                    for n in (0, 7))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
  assert np.abs(np.asarray(whole[0]["layers"]["mlp"]["up_lora_b"])).max() > 0


def test_the_mlp_in_token_chunks_holds_one_chunks_activations():
  """The compiled prefill's temporaries: the MLP's [rows, positions, intermediate] activations
  in one piece (4 x 512 x 2048 x 4 B = 16 MiB per copy) against one chunk's."""
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=2048, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=16)
  params = model.init_params(config, jax.random.key(0))
  tokens = jnp.zeros((4, 512), jnp.int32)

  def temp_bytes(chunk_tokens):
    cfg = config.replace(mlp_chunk_tokens=chunk_tokens)
    compiled = jax.jit(lambda p, t: model.forward(p, cfg, t, return_hidden=True)[0]).lower(
        params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(256)
  assert whole >= 16 * 2 ** 20 and whole > 4 * chunked, (whole, chunked)


@pytest.mark.parametrize("head_chunk_tokens", [0, 5])
def test_token_logprobs_match_float64_reference(hf_reference, tiny_dir, head_chunk_tokens):
  """Teacher-forced log-probs and entropies from the hidden states, in one piece and over 2
  rows x 2 positions at a time (head_chunk_tokens 5: 4 chunks for 7 positions, the last
  overlapping), against the float64 loop's logits."""
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, matmul_precision="highest",
                                                    head_chunk_tokens=head_chunk_tokens)
  hf_config = json.load(open(os.path.join(tiny_dir, "config.json")))
  tokens, mask = hf_reference["logits/input_ids"], hf_reference["logits/attention_mask"]
  tokens, mask = tokens[:2, :8], np.ones_like(mask[:2, :8])
  logits = reference.forward(_hf_weights(tiny_dir), hf_config, tokens, mask)[:, :-1]
  ref_logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)  # float64 log-softmax
  targets = tokens[:, 1:]
  hidden, _ = model.forward(params, config, jnp.asarray(tokens), return_hidden=True)
  logp, entropy = model.token_logprobs(params, config, hidden[:, :-1], jnp.asarray(targets))
  np.testing.assert_allclose(logp, np.take_along_axis(ref_logp, targets[..., None], -1)[..., 0],
                             atol=2e-5)
  np.testing.assert_allclose(entropy, -(np.exp(ref_logp) * ref_logp).sum(-1), atol=2e-5)


@pytest.mark.parametrize("directory", ["qwen2_tiny", "qwen2_tiny_tied"])
def test_token_logprobs_in_chunks_give_the_same_gradients(directory):
  """Each chunk is recomputed in the backward pass: the gradients of a loss over the
  log-probs, to every parameter and to the hidden states, are those in one piece (2 rows x 4
  positions at a time: chunks at 0, 4, 8 and 11 of 15 positions, the last overlapping), with
  an LM head of its own or the embedding read as one (tied)."""
  params, config = hf_checkpoint.load_hf_checkpoint(os.path.join(FIXTURES, directory),
                                                    matmul_precision="highest")
  tokens = jnp.arange(3, 35).reshape(2, 16)
  hidden, _ = model.forward(params, config, tokens, return_hidden=True)

  def loss(p, h, cfg):
    logp, entropy = model.token_logprobs(p, cfg, h[:, :-1], tokens[:, 1:])
    return jnp.mean(logp * jnp.arange(15.0)), entropy

  whole, chunked = (jax.grad(loss, argnums=(0, 1), has_aux=True)(
      params, hidden, config.replace(head_chunk_tokens=n)) for n in (0, 9))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-6)


def test_chunks_count_the_rows_one_device_holds():
  """Under a mesh the chunks bound a device's tokens: 16 rows over data 2 x fsdp 4 are 2 rows a
  device, so 50 tokens a chunk is 25 positions (of 100: 4 chunks), not 3; without a mesh (or
  where the batch axes do not divide the rows) every row is a device's."""
  from memrecall.runtime import sharding
  assert model.device_token_chunks(16, 100, 50) == model.token_chunks(16, 100, 50) == (34, 3)
  with jax.set_mesh(sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})):
    assert model.device_token_chunks(16, 100, 50) == model.token_chunks(2, 100, 50) == (4, 25)
    assert model.device_token_chunks(3, 100, 50) == model.token_chunks(3, 100, 50)


@pytest.mark.parametrize("with_gradient", [False, True])
def test_token_logprobs_in_chunks_hold_one_chunks_logits(with_gradient):
  """The compiled scoring's temporaries: [rows, positions, vocab] float32 logits in one
  piece (4 x 512 x 8192 x 4 B = 64 MiB per copy) against one chunk's, with its gradient."""
  config = ModelConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=16)
  params = model.init_params(config, jax.random.key(0))
  hidden = jnp.ones((4, 512, 32))
  targets = jnp.zeros((4, 512), jnp.int32)

  def temp_bytes(chunk_tokens):
    cfg = config.replace(head_chunk_tokens=chunk_tokens)
    score = lambda p, h: model.token_logprobs(p, cfg, h, targets)[0].sum()
    f = jax.grad(score, argnums=(0, 1)) if with_gradient else score
    compiled = jax.jit(f).lower(params, hidden).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(256)
  assert whole >= 64 * 2 ** 20 and whole > 6 * chunked, (whole, chunked)  # 8 chunks


def test_live_transformers_comparison_when_installed(hf_reference, tiny_dir):
  """Compares against transformers itself where torch and transformers are importable."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      tiny_dir, attn_implementation="eager", torch_dtype=torch.float32)
  tokens, mask = hf_reference["logits/input_ids"], hf_reference["logits/attention_mask"]
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens).long(), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(positions).long()).logits.numpy()
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, matmul_precision="highest")
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert _valid_rel_error(logits, ref, mask) <= 1e-4
