"""The decoder against an independent float64 reference, HF transformers fixtures and its own cache."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from conftest import FIXTURES
from memrecall import hf_checkpoint, model
from memrecall.config import ModelConfig
from memrecall.safetensors_io import iter_checkpoint_files


def _hf_weights(directory):
  return {name: np.array(f.get(name)) for name, f in iter_checkpoint_files(directory)}


def _valid_rel_error(ours, ref, mask):
  mask = mask.astype(bool)
  return np.abs(np.asarray(ours)[mask] - ref[mask]).max() / np.abs(ref[mask]).max()


@pytest.mark.parametrize("directory,prefix", [("qwen2_tiny", "logits"),
                                              ("qwen2_tiny_sharded", "logits"),
                                              ("qwen2_tiny_tied", "tied_logits")])
def test_logits_match_transformers_fixture(hf_reference, directory, prefix):
  params, config = hf_checkpoint.load_hf_checkpoint(os.path.join(FIXTURES, directory))
  tokens, mask = hf_reference[f"{prefix}/input_ids"], hf_reference[f"{prefix}/attention_mask"]
  # The batch mixes no padding, left padding and right padding.
  assert (mask == 0).any(axis=1).sum() == 2
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert _valid_rel_error(logits, hf_reference[f"{prefix}/logits"], mask) <= 1e-4


def test_logits_match_float64_loop_reference(hf_reference, tiny_dir):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir)
  hf_config = json.load(open(os.path.join(tiny_dir, "config.json")))
  tokens, mask = hf_reference["logits/input_ids"], hf_reference["logits/attention_mask"]
  ref = reference.forward(_hf_weights(tiny_dir), hf_config, tokens, mask)
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert _valid_rel_error(logits, ref, mask) <= 1e-5


def test_random_init_matches_reference_through_export(tmp_path):
  """Random memrecall params, exported to HF names, agree with the float64 loop reference."""
  config = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=3,
                       num_heads=6, num_kv_heads=3, head_dim=8, rope_theta=500.0,
                       tie_word_embeddings=True)
  params = model.init_params(config, jax.random.key(3))
  # Make biases and norms non-trivial so that their paths are exercised.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), params)
  hf_checkpoint.save_hf_checkpoint(params, config, tmp_path)
  tokens = np.random.default_rng(0).integers(0, 97, (2, 7))
  mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
  ref = reference.forward(_hf_weights(tmp_path), config.to_hf_dict(), tokens, mask)
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert _valid_rel_error(logits, ref, mask) <= 1e-5


def test_cached_decode_equals_full_forward_at_every_step(tiny_dir):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(3, config.vocab_size, (2, 12)))
  prompt_mask = jnp.asarray([[1] * 5, [0, 0, 1, 1, 1]], bool)
  full_mask = jnp.concatenate([prompt_mask, jnp.ones((2, 7), bool)], axis=1)
  full, _ = model.forward(params, config, tokens, full_mask)
  cache = model.init_cache(config, 2, 12)
  logits, cache = model.forward(params, config, tokens[:, :5], prompt_mask, cache)
  np.testing.assert_allclose(logits[0], full[0, :5], atol=1e-5)
  np.testing.assert_allclose(logits[1, 2:], full[1, 2:5], atol=1e-5)
  for t in range(5, 12):
    step_logits, cache = model.forward(params, config, tokens[:, t:t + 1], None, cache)
    np.testing.assert_allclose(step_logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
  assert int(cache.index) == 12
  np.testing.assert_array_equal(cache.next_position, [12, 10])


def test_bfloat16_compute_stays_close_to_float32(tiny_dir, hf_reference):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, param_dtype="bfloat16",
                                                    dtype="bfloat16")
  assert params["layers"]["mlp"]["up_kernel"].dtype == jnp.bfloat16
  tokens, mask = hf_reference["logits/input_ids"], hf_reference["logits/attention_mask"]
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert logits.dtype == jnp.float32
  assert _valid_rel_error(logits, hf_reference["logits/logits"], mask) <= 0.05


def test_remat_does_not_change_gradients(tiny_dir):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir)
  tokens = jnp.arange(3, 19).reshape(2, 8)

  def loss(p, cfg):
    logits, _ = model.forward(p, cfg, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  plain = jax.grad(loss)(params, config)
  for policy in ("full", "dots"):
    rematted = jax.grad(loss)(params, config.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
      np.testing.assert_allclose(a, b, atol=1e-6)


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
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir)
  logits, _ = model.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  assert _valid_rel_error(logits, ref, mask) <= 1e-4
