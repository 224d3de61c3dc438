"""The KV-cache sampler: parity with transformers' greedy generate, filters, seeds and log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memrecall.models import hf_checkpoint, qwen2 as model, sampling


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  return hf_checkpoint.load_hf_checkpoint(tiny_dir, matmul_precision="highest")


def _settings(config, **kw):
  return sampling.SamplingConfig(eos_ids=config.eos_token_ids, pad_id=config.pad_token_id, **kw)


def test_greedy_matches_transformers_generate(tiny, hf_reference):
  params, config = tiny
  prompt, mask = hf_reference["generate/input_ids"], hf_reference["generate/attention_mask"]
  expected = hf_reference["generate/output_ids"][:, prompt.shape[1]:]
  out = sampling.generate(params, config, prompt, mask, jax.random.key(0), max_new_tokens=32,
                          sampling=_settings(config))
  np.testing.assert_array_equal(out.tokens, expected)
  # Row 0 stops at its EOS (the 13th token), row 1 runs all 32 steps.
  np.testing.assert_array_equal(out.lengths, [13, 32])
  np.testing.assert_array_equal(out.done, [True, False])
  assert (out.logprobs[0, 13:] == 0).all()


def test_top_k_one_equals_greedy(tiny, hf_reference):
  params, config = tiny
  prompt, mask = hf_reference["generate/input_ids"], hf_reference["generate/attention_mask"]
  greedy = sampling.generate(params, config, prompt, mask, jax.random.key(0), max_new_tokens=20,
                             sampling=_settings(config))
  top1 = sampling.generate(params, config, prompt, mask, jax.random.key(7), max_new_tokens=20,
                           sampling=_settings(config, temperature=1.3, top_k=1))
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)


def test_fixed_seed_reproduces_and_seeds_differ(tiny):
  params, config = tiny
  prompt = jnp.arange(3, 11).reshape(1, 8).repeat(4, axis=0)
  settings = _settings(config, temperature=1.0, top_p=0.95)
  a = sampling.generate(params, config, prompt, None, jax.random.key(5), max_new_tokens=16,
                        sampling=settings)
  b = sampling.generate(params, config, prompt, None, jax.random.key(5), max_new_tokens=16,
                        sampling=settings)
  c = sampling.generate(params, config, prompt, None, jax.random.key(6), max_new_tokens=16,
                        sampling=settings)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert not np.array_equal(a.tokens, c.tokens)
  # Identical prompts in one batch still get different samples.
  assert len({tuple(row) for row in np.asarray(a.tokens)}) > 1


def test_a_row_with_its_own_key_samples_the_same_in_any_batch(tiny):
  """Keys per row (`row_keys`): a row's sample comes from its key alone, not from its place in
  the batch or the rows beside it, which is what lets a resumed or regrouped run redraw it."""
  params, config = tiny
  settings = _settings(config, temperature=1.0, top_p=0.95)
  prompts = jnp.asarray([[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]])
  keys = jax.random.split(jax.random.key(9), 3)
  together = sampling.generate(params, config, prompts, None, keys, max_new_tokens=12,
                               sampling=settings)
  reordered = sampling.generate(params, config, prompts[::-1], None, keys[::-1],
                                max_new_tokens=12, sampling=settings)
  alone = sampling.generate(params, config, prompts[1:2], None, keys[1:2], max_new_tokens=12,
                            sampling=settings)
  np.testing.assert_array_equal(reordered.tokens[::-1], together.tokens)
  np.testing.assert_array_equal(alone.tokens[0], together.tokens[1])
  # One key for the batch is split into the rows' keys.
  one = sampling.generate(params, config, prompts, None, jax.random.key(9), max_new_tokens=12,
                          sampling=settings)
  np.testing.assert_array_equal(one.tokens, together.tokens)
  with pytest.raises(ValueError, match="one per row"):
    sampling.generate(params, config, prompts, None, keys[:2], max_new_tokens=12,
                      sampling=settings)


@pytest.mark.parametrize("temperature, top_k", [(0.6, 50), (0.0, 0)])
def test_recorded_logprobs_are_under_the_sampling_temperature(tiny, temperature, top_k):
  """A sample's log-probs are those of softmax(logits / t) at its temperature (greedy: t = 1),
  before top-k: a float64 log-softmax of the teacher-forced logits, and what the RL loss
  scores with `token_logprobs(..., temperature=)` (the update's ratio starts at 1)."""
  params, config = tiny
  settings = _settings(config, temperature=temperature, top_k=top_k)
  t = settings.logprob_temperature
  assert t == (temperature or 1.0)
  prompt = jnp.asarray([[0, 0, 5, 9, 40, 77], [11, 12, 13, 14, 15, 16]])
  mask = prompt != 0
  out = sampling.generate(params, config, prompt, mask, jax.random.key(1), max_new_tokens=12,
                          sampling=settings)
  for row in range(2):
    n = int(out.lengths[row])
    seq = jnp.concatenate([prompt[row], out.tokens[row, :n]])[None]
    seq_mask = jnp.concatenate([mask[row], jnp.ones((n,), bool)])[None]
    hidden, _ = model.forward(params, config, seq, seq_mask, return_hidden=True)
    hidden = hidden[:, prompt.shape[1] - 1:-1]
    logits = np.asarray(model.head_logits(params, config, hidden)[0], np.float64) / t
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = logp[np.arange(n), np.asarray(out.tokens[row, :n])]
    np.testing.assert_allclose(out.logprobs[row, :n], expected, atol=1e-5)
    scored, _ = model.token_logprobs(params, config, hidden, out.tokens[row, :n][None],
                                     temperature=t)
    np.testing.assert_allclose(scored[0], expected, atol=1e-5)


def _numpy_filter(logits, temperature, top_k, top_p):
  """Reference top-k/top-p, Hugging Face's warpers step by step: keep every token at least the
  k-th best, then sort ascending (stably) and drop each whose mass with all below is <= 1 - p,
  never the last."""
  out = logits / temperature
  for row in out:
    if top_k:
      row[row < np.sort(row)[-top_k]] = -np.inf
    order = np.argsort(row, kind="stable")
    probs = np.exp(row[order] - row.max())
    drop = np.cumsum(probs / probs.sum()) <= 1 - top_p
    drop[-1] = False
    row[order[drop]] = -np.inf
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (5, 1.0), (10, 0.8), (0, 1.0)])
def test_filter_logits_matches_numpy(top_k, top_p):
  logits = np.random.default_rng(top_k).normal(size=(3, 40)).astype(np.float32) * 2
  settings = sampling.SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
  ours = np.asarray(sampling.filter_logits(jnp.asarray(logits), settings))
  ref = _numpy_filter(logits.astype(np.float64), 0.7, top_k, top_p)
  kept = np.isfinite(ref)
  np.testing.assert_array_equal(ours > np.finfo(np.float32).min, kept)
  np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


def test_top_p_cuts_tied_tokens_by_sorted_position_as_hugging_face():
  """Four equal logits at top_p 0.3: Hugging Face keeps two of them (the higher ids), not all
  four.  Ties at the cutoff are common where logits come from bfloat16."""
  settings = sampling.SamplingConfig(temperature=1.0, top_p=0.3)
  logits = jnp.asarray([[0.0, 0.0, 0.0, 0.0, -9.0]])
  kept = np.asarray(sampling.filter_logits(logits, settings)) > np.finfo(np.float32).min
  np.testing.assert_array_equal(kept[0], [False, False, True, True, False])
  np.testing.assert_array_equal(np.isfinite(_numpy_filter(np.asarray(logits, np.float64), 1.0,
                                                          0, 0.3))[0], kept[0])


def test_sampling_frequencies_follow_the_filtered_distribution():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  settings = sampling.SamplingConfig(temperature=1.0, top_p=0.8)
  draws = sampling.sample_token(jnp.tile(logits, (4000, 1)),
                                jax.random.split(jax.random.key(0), 4000), settings)
  freq = np.bincount(np.asarray(draws), minlength=4) / 4000
  # top-p 0.8 keeps {0.5, 0.3}: renormalised to 0.625 / 0.375.
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)


def test_prompt_ids_outside_the_vocabulary_are_refused(tiny):
  """Padding included: a masked id past the table embeds as NaN and turns the row's outputs
  NaN (greedy decoding would then silently emit token 0)."""
  params, config = tiny
  prompt = jnp.asarray([[config.vocab_size, 5, 6, 7]])
  with pytest.raises(ValueError, match="prompt ids must lie in"):
    sampling.generate(params, config, prompt, prompt != config.vocab_size, jax.random.key(0),
                      max_new_tokens=2, sampling=_settings(config))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(top_p=0.9), dict(top_k=5)])
def test_invalid_sampling_settings_are_refused(kwargs):
  with pytest.raises(ValueError):
    sampling.SamplingConfig(**kwargs)


def test_bad_prompts_are_refused(tiny):
  params, config = tiny
  with pytest.raises(ValueError, match="non-empty"):
    sampling.generate(params, config, jnp.zeros((1, 0), jnp.int32), None, jax.random.key(0),
                      max_new_tokens=4, sampling=_settings(config))
  with pytest.raises(ValueError, match="at least one real token"):
    sampling.generate(params, config, jnp.ones((2, 3), jnp.int32), jnp.asarray([[1, 1, 1], [0, 0, 0]]),
                      jax.random.key(0), max_new_tokens=4, sampling=_settings(config))
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampling.generate(params, config, jnp.ones((1, 3), jnp.int32), None, jax.random.key(0),
                      max_new_tokens=0, sampling=_settings(config))
