"""The one attention function of memrecall.

Every attention in the codebase (decoder, KV-cache decode, compressor windows,
gate) goes through `attend`, so the implementation choice is made once:
`jax.nn.dot_product_attention` with cuDNN's fused kernel on GPU where its
constraints hold (≈13x faster than the XLA path at T=4096 on an H100), and
everywhere else `grouped_attention`, a portable XLA formulation laid out for
large matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)

KeyLimits = tuple[tuple[int, int], ...]


def resolve_implementation(requested: str, dtype, head_dim: int) -> str | None:
  """Picks the `implementation=` argument for `jax.nn.dot_product_attention`.

  "auto" chooses cuDNN on a GPU backend for half-precision inputs with a head
  size cuDNN supports, XLA otherwise.  "cudnn" forces cuDNN (and fails loudly
  where it is unavailable), "xla" forces the portable path.
  """
  if requested == "xla":
    return "xla"
  if requested == "cudnn":
    return "cudnn"
  if requested != "auto":
    raise ValueError(f"unknown attention implementation {requested!r}")
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu and jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES] and head_dim % 8 == 0 \
      and head_dim <= 128:
    return "cudnn"
  return "xla"


def attend(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
           implementation: str = "auto", key_limits: KeyLimits | None = None,
           precision: str | None = None, heads_major: bool = False) -> jax.Array:
  """Grouped-query scaled dot-product attention.

  Args:
    query: [B, T, H, D].
    key, value: [B, S, K, D] with H % K == 0 (K key/value heads shared by H/K
      query heads each); [B, K, S, D] with `heads_major` (the KV cache's layout, which the
      XLA path's products read in place).
    mask: boolean, broadcastable to [B, H, T, S]; True where a query may attend.
      A query row with no allowed key returns finite values (its output is
      garbage and must be ignored by the caller).
    implementation: "auto", "xla" or "cudnn".
    key_limits: static structure of the mask, ((query_end, key_count), ...) in query order
      and covering all T rows: rows [previous query_end, query_end) may only attend to the
      first key_count keys.  The mask must already say so; the XLA path uses it to skip the
      keys a block cannot see (exactly: their softmax weights are zero), cuDNN's kernel
      ignores it.
    precision: the XLA path's `precision=` ("highest" for float32 comparisons; cuDNN's
      kernel only runs half precision).
    heads_major: key and value are [B, K, S, D].

  Returns:
    [B, T, H, D] in the query's dtype.
  """
  impl = resolve_implementation(implementation, query.dtype, query.shape[-1])
  if heads_major and impl == "cudnn" and implementation == "auto" and query.shape[1] == 1:
    impl = "xla"  # a decode step: one pass over the cache, where cuDNN needs it transposed
  if impl == "cudnn":
    if heads_major:
      key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
      heads_major = False
    try:
      return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      if implementation == "cudnn":
        raise
      # shapes or mask layout cuDNN rejects at trace time: the XLA path below
  if key_limits is None:
    return grouped_attention(query, key, value, mask, precision, heads_major)
  if key_limits[-1][0] != query.shape[1]:
    raise ValueError(f"key_limits {key_limits} do not cover the {query.shape[1]} query rows")
  mask = None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  outputs, start = [], 0
  keys = (slice(None), slice(None)) if heads_major else (slice(None),)
  for end, count in key_limits:  # a few static blocks
    block_mask = None if mask is None else mask[
        :, :, slice(start, end) if mask.shape[2] > 1 else slice(None),
        slice(0, count) if mask.shape[3] > 1 else slice(None)]
    first = keys + (slice(0, count),)
    block_query = query[:, start:end]
    if outputs:
      # The block starts when the one before has ended, so one block's float32 scores are
      # live at a time.  Without it XLA's GPU scheduler ran every block's score product
      # first: a 32-row 6.7K-token prefill held 36 GiB of scores at once (2026-12-06).
      block_query, outputs[-1] = jax.lax.optimization_barrier((block_query, outputs[-1]))
    outputs.append(grouped_attention(block_query, key[first], value[first], block_mask,
                                     precision, heads_major))
    start = end
  return jnp.concatenate(outputs, axis=1)


def causal_key_limits(queries: int, keys: int, block: int) -> KeyLimits | None:
  """key_limits of a causal mask whose T queries are the last T of S keys at most: row i sees
  no key after S - T + i (a prompt written into a cache with room after it, or a
  cacheless forward with S = T).  None when T fits one block."""
  if queries <= block:
    return None
  return tuple((end, keys - queries + end) for end in block_ends(queries, block))


def block_ends(rows: int, block: int) -> list[int]:
  """Where consecutive blocks of `block` rows end, the last one short: 5, 2 -> [2, 4, 5]."""
  return sorted(set(range(block, rows, block)) | {rows})


def grouped_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      mask: jax.Array | None, precision: str | None = None,
                      heads_major: bool = False) -> jax.Array:
  """`attend`'s XLA path: the same computation as `jax.nn.dot_product_attention`'s, laid out
  for large matmuls.

  The H/K query heads that share a key/value head become extra query rows, so both products
  are one [G*T, D] x [D, S] and one [G*T, S] x [S, D] matmul per (batch, key/value head).
  On CPU the attention of a compression window (T = 1280, S = 1536, mid shape) measured 72
  against 115 ms for `jax.nn.dot_product_attention(implementation="xla")`, whose per-group
  products are small and strided.  Logits and softmax are float32; the probabilities are
  cast to the values' dtype before the second product, as there.  Keys and values are
  [B, S, K, D], or [B, K, S, D] with `heads_major` (then neither is copied).
  """
  b, t, h, d = query.shape
  if heads_major:
    k, v = key, value  # [B, K, S, D]
  else:
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
  kv_heads, s = k.shape[1], k.shape[2]
  g = h // kv_heads
  logits_dtype = jnp.promote_types(query.dtype, jnp.float32)
  q = query.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
  logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=logits_dtype,
                      precision=precision)
  logits = _masked(logits * jnp.asarray(1 / np.sqrt(d), logits_dtype), mask, t)  # [B, K, G*T, S]
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v, precision=precision)  # [B, K, G*T, D]
  return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _masked(logits: jax.Array, mask: jax.Array | None, t: int) -> jax.Array:
  """Scores [B, K, G*T, S] (query heads sharing a kv head as extra rows, head n = k * G + j)
  with `mask` (broadcastable to [B, H, T, S]) applied as a large negative score: a row with no
  allowed key gets a uniform softmax, finite where -inf would give NaN."""
  if mask is None:
    return logits
  kv_heads, gt, s = logits.shape[1:]
  g = gt // t
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  mask_batch, mask_heads = mask.shape[:2]
  mask = jnp.broadcast_to(mask, (mask_batch, mask_heads, t, s))
  if mask_heads == 1:  # one mask for every head: repeated over the G query rows
    mask = jnp.broadcast_to(mask[:, :, None], (mask_batch, 1, g, t, s)).reshape(
        mask_batch, 1, g * t, s)
  else:
    mask = mask.reshape(mask_batch, kv_heads, g * t, s)
  return jnp.where(mask, logits, jnp.asarray(0.7 * jnp.finfo(logits.dtype).min, logits.dtype))


def attend_with_shared_prefix(query: jax.Array, key: jax.Array, value: jax.Array,
                              mask: jax.Array | None, shared_key: jax.Array,
                              shared_value: jax.Array, shared_mask: jax.Array,
                              precision: str | None = None) -> jax.Array:
  """Attention of R*B' query rows, each over its own keys and over a prefix shared by each
  run of R consecutive rows (row i with prefix i // R), as one softmax over both.

  The gate scores R chunks of a row against one prompt: laid out as R rows of
  [chunk slots | prompt | token], the prompt's keys and values were copied R times and then
  read R times (at Qwen2.5-7B shapes, 16 chunks of 1024 slots, a 1.4K-token prompt and batch
  8, XLA's CPU compiler held 16.6 GiB of such copies; TPU's fused them into the products).
  Here each part's scores are taken
  against its own keys, the prefix's read once for the R rows that share it, and the two
  parts are normalised together by their joint maximum and sum (the log-sum-exp merge):
  the same weights as one softmax over the concatenated keys.

  Args:
    query: [R*B', T, H, D].
    key, value: [R*B', K, S, D] (heads major, as the KV cache): each row's own keys.
    mask: broadcastable to [R*B', H, T, S].
    shared_key, shared_value: [B', K, P, D]; shared_mask: [B', P], the prefix's valid keys
      (every query may see every valid prefix key).
    precision: as `attend`'s.

  Returns:
    [R*B', T, H, D] in the query's dtype.
  """
  rows, t, h, d = query.shape
  groups, kv_heads, p = shared_key.shape[:3]
  if rows % groups:
    raise ValueError(f"{rows} query rows do not split into runs over {groups} shared prefixes")
  r, g, s = rows // groups, h // kv_heads, key.shape[2]
  logits_dtype = jnp.promote_types(query.dtype, jnp.float32)
  scale = jnp.asarray(1 / np.sqrt(d), logits_dtype)
  q = query.reshape(rows, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(rows, kv_heads,
                                                                               g * t, d)
  own = _masked(jnp.einsum("bkqd,bksd->bkqs", q, key, preferred_element_type=logits_dtype,
                           precision=precision) * scale, mask, t)  # [R*B', K, G*T, S]
  # The R rows of a prefix as extra query rows of one product: [B', K, R*G*T, P].
  q_shared = q.reshape(groups, r, kv_heads, g * t, d).transpose(0, 2, 1, 3, 4).reshape(
      groups, kv_heads, r * g * t, d)
  shared = jnp.einsum("bkqd,bkpd->bkqp", q_shared, shared_key,
                      preferred_element_type=logits_dtype, precision=precision) * scale
  shared = _masked(shared, shared_mask[:, None, None, :], r * g * t)
  # Per-query statistics in the own part's row order: [R*B', K, G*T].
  to_rows = lambda x: x.reshape(groups, kv_heads, r, g * t).transpose(0, 2, 1, 3).reshape(
      rows, kv_heads, g * t)
  top = jnp.maximum(own.max(-1), to_rows(shared.max(-1)))
  from_rows = lambda x: x.reshape(groups, r, kv_heads, g * t).transpose(0, 2, 1, 3).reshape(
      groups, kv_heads, r * g * t)
  own_weights = jnp.exp(own - top[..., None])
  shared_weights = jnp.exp(shared - from_rows(top)[..., None])
  total = own_weights.sum(-1) + to_rows(shared_weights.sum(-1))  # [R*B', K, G*T]
  own_probs = (own_weights / total[..., None]).astype(value.dtype)
  shared_probs = (shared_weights / from_rows(total)[..., None]).astype(value.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", own_probs, value, preferred_element_type=logits_dtype,
                   precision=precision)  # [R*B', K, G*T, D]
  from_shared = jnp.einsum("bkqp,bkpd->bkqd", shared_probs, shared_value,
                           preferred_element_type=logits_dtype, precision=precision)
  out = out + from_shared.reshape(groups, kv_heads, r, g * t, d).transpose(0, 2, 1, 3, 4).reshape(
      rows, kv_heads, g * t, d)
  out = out.astype(value.dtype)
  return out.reshape(rows, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(rows, t, h, d)
