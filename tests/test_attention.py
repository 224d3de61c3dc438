"""`attend`'s XLA path against a float64 loop over heads and against jax's own XLA attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memrecall.models.attention import (attend, attend_with_shared_prefix, causal_key_limits,
                                        grouped_attention, resolve_implementation)


def naive_attention(query, key, value, mask):
  """float64, one (batch, head) at a time: softmax(q k^T / sqrt(D)) v over the allowed keys."""
  b, t, h, d = query.shape
  kv_heads = key.shape[2]
  mask = np.broadcast_to(mask, (b, h, t, key.shape[1]))
  out = np.zeros((b, t, h, d))
  for i in range(b):
    for n in range(h):
      j = n // (h // kv_heads)  # the key/value head query head n shares
      logits = query[i, :, n].astype(np.float64) @ key[i, :, j].astype(np.float64).T / np.sqrt(d)
      logits = np.where(mask[i, n], logits, -np.inf)
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      out[i, :, n] = (weights / weights.sum(-1, keepdims=True)) @ value[i, :, j]
  return out


def _inputs(b=2, t=5, s=7, h=4, kv_heads=2, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, t, h, d)).astype(np.float32),
          rng.normal(size=(b, s, kv_heads, d)).astype(np.float32),
          rng.normal(size=(b, s, kv_heads, d)).astype(np.float32), rng)


@pytest.mark.parametrize("mask_shape", [(2, 1, 5, 7), (2, 4, 5, 7), (1, 1, 5, 7), (2, 1, 1, 7),
                                        (5, 7)])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_attention_matches_a_float64_loop(mask_shape, kv_heads):
  query, key, value, rng = _inputs(kv_heads=kv_heads)
  mask = rng.random(mask_shape) < 0.7
  mask[..., 0] = True  # every query row sees a key
  out = grouped_attention(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value),
                          jnp.asarray(mask), "highest")
  np.testing.assert_allclose(out, naive_attention(query, key, value, mask), atol=2e-6)
  with jax.default_matmul_precision("highest"):
    expected = jax.nn.dot_product_attention(query, key, value, mask=jnp.asarray(mask),
                                            implementation="xla")
  np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("runs", [1, 3])
def test_a_shared_prefix_is_the_float64_softmax_over_prefix_and_own_keys(kv_heads, runs):
  """Rows i*R .. i*R + R - 1 over prefix i's keys and their own, as one softmax over the keys
  laid side by side: a causal own mask (T=2), a prefix row with holes, a query row whose own
  keys are all masked (it still reads the prefix), and a prefix with no valid key."""
  groups, t, s, p, h, d = 2, 2, 5, 6, 4, 8
  rows = groups * runs
  query, key, value, rng = _inputs(b=rows, t=t, s=s, h=h, kv_heads=kv_heads)
  shared_key, shared_value = (rng.normal(size=(groups, p, kv_heads, d)).astype(np.float32)
                              for _ in range(2))
  own_mask = np.broadcast_to(np.arange(s)[None] <= np.arange(s - t, s)[:, None], (rows, t, s)).copy()
  own_mask[1] = rng.random((t, s)) < 0.6
  own_mask[0, 0] = False  # this query row reads the prefix only
  shared_mask = rng.random((groups, p)) < 0.7
  shared_mask[0, 0] = True
  if runs > 1:
    shared_mask[1] = False  # these rows read their own keys only
  heads_major = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))
  out = attend_with_shared_prefix(jnp.asarray(query), heads_major(key), heads_major(value),
                                  jnp.asarray(own_mask)[:, None], heads_major(shared_key),
                                  heads_major(shared_value), jnp.asarray(shared_mask), "highest")
  prefix_of = np.arange(rows) // runs
  keys = np.concatenate([shared_key[prefix_of], key], axis=1)
  values = np.concatenate([shared_value[prefix_of], value], axis=1)
  mask = np.concatenate([np.broadcast_to(shared_mask[prefix_of][:, None], (rows, t, p)), own_mask],
                        axis=2)[:, None]
  np.testing.assert_allclose(out, naive_attention(query, keys, values, mask), atol=2e-6)
  with pytest.raises(ValueError, match="do not split"):
    attend_with_shared_prefix(jnp.asarray(query[:rows - 1]), heads_major(key[:rows - 1]),
                              heads_major(value[:rows - 1]), None, heads_major(shared_key),
                              heads_major(shared_value), jnp.asarray(shared_mask))


def test_grouped_attention_without_mask_and_a_row_with_no_key_stays_finite():
  query, key, value, _ = _inputs()
  np.testing.assert_allclose(grouped_attention(query, key, value, None, "highest"),
                             naive_attention(query, key, value, np.ones((1, 1, 5, 7), bool)),
                             atol=2e-6)
  mask = np.ones((2, 1, 5, 7), bool)
  mask[1, 0, 3] = False  # query row 3 of batch 1 may attend to nothing
  assert np.isfinite(np.asarray(grouped_attention(query, key, value, jnp.asarray(mask)))).all()


def test_grouped_attention_gradients_match_jax_attention():
  query, key, value, rng = _inputs()
  mask = jnp.asarray(np.tril(np.ones((5, 7), bool), k=2))[None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  ours = jax.grad(loss(lambda q, k, v: grouped_attention(q, k, v, mask, "highest")),
                  argnums=(0, 1, 2))(query, key, value)
  with jax.default_matmul_precision("highest"):
    theirs = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, implementation="xla")), argnums=(0, 1, 2))(query, key, value)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_bfloat16_inputs_keep_float32_logits_and_return_bfloat16():
  query, key, value, _ = _inputs()
  mask = jnp.ones((2, 1, 5, 7), bool)
  out = grouped_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (query, key, value)), mask)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), naive_attention(query, key, value, mask),
                             atol=5e-2)
  # The tolerance alone cannot see bfloat16 logits (their error is 0.011 here): the first
  # product's accumulator and the softmax are float32 in the program itself.
  jaxpr = jax.make_jaxpr(lambda q, k, v: grouped_attention(q, k, v, mask))(
      *(jnp.asarray(x, jnp.bfloat16) for x in (query, key, value)))
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots[0].params["preferred_element_type"] == jnp.float32
  assert dots[0].outvars[0].aval.dtype == jnp.float32


def test_attend_on_cpu_takes_the_xla_path_and_rejects_unknown_implementations():
  assert resolve_implementation("auto", jnp.bfloat16, 64) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  query, key, value, _ = _inputs()
  np.testing.assert_array_equal(attend(query, key, value, None, "xla"),
                                grouped_attention(query, key, value, None))
  with pytest.raises(ValueError, match="unknown attention implementation"):
    attend(query, key, value, None, "flash")


def test_key_limits_skip_only_what_the_mask_hides():
  query, key, value, _ = _inputs(t=5, s=9)
  causal = np.arange(9)[None, :] <= 4 + np.arange(5)[:, None]  # queries are keys 4..8
  limits = causal_key_limits(5, 9, 2)
  assert limits == ((2, 6), (4, 8), (5, 9))
  assert causal_key_limits(5, 9, 5) is None
  mask = jnp.asarray(causal)[None, None]
  expected = naive_attention(query, key, value, causal[None, None])
  np.testing.assert_allclose(attend(query, key, value, mask, "xla", limits, "highest"), expected,
                             atol=2e-6)
  # The KV cache's kv-head-major layout: the same function of the same keys.
  heads_major = [jnp.asarray(x).transpose(0, 2, 1, 3) for x in (key, value)]
  np.testing.assert_allclose(attend(query, *heads_major, mask, "xla", limits, "highest", True),
                             expected, atol=2e-6)
  np.testing.assert_allclose(attend(query, *heads_major, mask, "xla", None, "highest", True),
                             expected, atol=2e-6)
  with pytest.raises(ValueError, match="do not cover"):
    attend(query, key, value, mask, "xla", ((2, 6), (4, 8)))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel runs on a GPU only")
@pytest.mark.parametrize("case", ["prefill", "update_over_cache", "compression_window"])
def test_cudnn_matches_the_float64_loop_at_7b_head_shapes(case):
  """Qwen2.5-7B's heads (28 query, 4 KV, head_dim 128) in bfloat16 through cuDNN's kernel, as
  `auto` picks it on a GPU, against the float64 loop: a causal prefill, a memory update's
  prompt over cached slots (heads-major cache, as the model passes it), and a compression
  window with a fully masked row (its output is ignored, so only finiteness is asked)."""
  b, h, k, d = 2, 28, 4, 128
  t, s = {"prefill": (256, 256), "update_over_cache": (96, 352),
          "compression_window": (80, 120)}[case]
  rng = np.random.default_rng(7)
  q, key, value = (rng.normal(size=shape).astype(np.float32)
                   for shape in ((b, t, h, d), (b, s, k, d), (b, s, k, d)))
  rows, cols = np.arange(t)[:, None], np.arange(s)[None, :]
  mask = np.broadcast_to(cols <= rows + (s - t), (b, 1, t, s)).copy()  # causal after a prefix
  if case == "compression_window":
    mask[:, :, 5] = False  # a padding row: no key at all
  as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  cache = lambda x: as_bf16(x).transpose(0, 2, 1, 3) if case == "update_over_cache" else as_bf16(x)
  out = attend(as_bf16(q), cache(key), cache(value), jnp.asarray(mask), implementation="cudnn",
               heads_major=case == "update_over_cache")
  out = np.asarray(out.astype(jnp.float32))
  rounded = lambda x: np.asarray(as_bf16(x).astype(jnp.float32))
  want = naive_attention(rounded(q), rounded(key), rounded(value), mask)
  seen = mask.any(-1)[:, 0]  # [B, T]: rows with a key
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[seen], want[seen], atol=3e-2, rtol=3e-2)
