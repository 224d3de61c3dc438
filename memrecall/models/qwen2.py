"""A Qwen2-compatible decoder as pure Flax (linen) modules with a functional KV cache.

Parameters live in an explicit tree (`init_params`), every leaf annotated with
logical axis names (see `sharding.py`); layers are stacked on a leading
`layers` axis and run under `nn.scan`, so compile time does not grow with depth
(`ModelConfig.scan_layers`; inference may unstack them, see `unstack_layers`).
The KV cache is a plain pytree (`KVCache`) passed in and returned, never a
hidden Flax collection, so it can be donated, sharded and spliced (the
Reasoner puts compressed memory slots in front of its prompt).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.errors
import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp

from memrecall.models.attention import (attend, attend_with_shared_prefix, block_ends,
                                        causal_key_limits)
from memrecall.models.config import ModelConfig
from memrecall.runtime import sharding
from memrecall.runtime.sharding import with_logical_constraint

Array = jax.Array
_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  """`module.param`, reading an existing parameter without tracing its initializer.

  Flax checks an existing parameter's shape by `jax.eval_shape` of the initializer, at every
  read of every parameter in every trace: a third of tracing a recall program. The shape is
  known here, so it is compared directly, with Flax's error.
  """
  if module.has_variable("params", name):
    value = nn.meta.unbox(module.get_variable("params", name))
    if jnp.shape(value) != tuple(shape):
      raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, jnp.shape(value),
                                             tuple(shape))
    return value
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


@jax.custom_jvp
def _bfloat16_by_bits(x: Array) -> Array:
  """float32 -> bfloat16 rounded to nearest even, bit for bit `astype`'s, in integer ops."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16
  rounded = jnp.where(jnp.isnan(x), jnp.uint32(0x7FC0), rounded)  # a NaN stays a quiet NaN
  return jax.lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)


@_bfloat16_by_bits.defjvp
def _bfloat16_by_bits_jvp(primals, tangents):  # linear, as astype: its transpose casts back
  return _bfloat16_by_bits(*primals), tangents[0].astype(jnp.bfloat16)


def compute_copy(weight: Array, dtype) -> Array:
  """A parameter as the products read it, in the compute dtype, cast where it is read.

  float32 master weights with bfloat16 products are cast in integer ops (the same bits as
  `astype`): a plain convert of a scanned layer's slice is moved out of the loop by the TPU
  compiler's bfloat16 propagation, which then holds a bfloat16 copy of the whole weight stack
  for every loop over it (docs/2026-12-05-weights-cast-where-read.md).  Derivatives are
  `astype`'s: the tangent cast, the cotangent cast back.
  """
  if weight.dtype == dtype:
    return weight
  if weight.dtype == jnp.float32 and dtype == jnp.bfloat16:
    return _bfloat16_by_bits(weight)
  return weight.astype(dtype)


# --- building blocks ---------------------------------------------------------


def lora_delta(module: nn.Module, name: str, x: Array, in_axes: tuple, out_shape: tuple,
               out_axes: tuple, use: bool) -> Array | None:
  """The gate's low-rank update of projection `name`, or None.

  Declared whenever the config has a gate (so init creates it) but applied
  only when `use`; B starts at zero, so a new adapter changes nothing.
  """
  factors = lora_factors(module, name, x.shape[x.ndim - len(in_axes):], in_axes, out_shape,
                         out_axes, use)
  return None if factors is None else apply_lora(module.config, x, factors)


def lora_factors(module: nn.Module, name: str, in_shape: tuple, in_axes: tuple,
                 out_shape: tuple, out_axes: tuple, use: bool) -> tuple[Array, Array] | None:
  """`lora_delta`'s adapter (A, B) in the compute dtype, declared as it declares them; None
  where it is not applied."""
  cfg = module.config
  if not cfg.has_gate or name not in cfg.gate_lora_targets:
    return None
  a = _param(module, f"{name}_lora_a", nn.initializers.normal(stddev=0.02),
             tuple(in_shape) + (cfg.gate_lora_rank,), in_axes + (None,), cfg.jnp_param_dtype)
  b = _param(module, f"{name}_lora_b", nn.initializers.zeros, (cfg.gate_lora_rank,) + out_shape,
             (None,) + out_axes, cfg.jnp_param_dtype)
  if not use:
    return None
  return compute_copy(a, cfg.jnp_dtype), compute_copy(b, cfg.jnp_dtype)


def apply_lora(cfg: ModelConfig, x: Array, factors: tuple[Array, Array]) -> Array:
  """x's low-rank update: (x . A) . B x alpha / rank, A contracting x's trailing axes."""
  a, b = factors
  low = jnp.tensordot(x.astype(cfg.jnp_dtype), a, axes=a.ndim - 1,
                      precision=cfg.precision)  # [..., r]
  scale = cfg.gate_lora_alpha / cfg.gate_lora_rank
  return jnp.tensordot(low, b, axes=1, precision=cfg.precision) * scale


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in float32 as Qwen2 does."""
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return compute_copy(scale, self.dtype) * normed.astype(self.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos/sin tables for rotary embeddings. positions: [B, T] -> 2 x [B, T, D] float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, D]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates x: [B, T, N, D] by the half-split (GPT-NeoX / Qwen2) convention."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


# Query rows per attention block where the mask has a static structure (causal prompts,
# compression windows: `attention.attend`'s key_limits).
QUERY_BLOCK = 128


def interleave_beacons(x: Array, beacon_rows: int) -> Array:
  """A window's rows [W raw, G beacons] -> the interleaved order (r raw, 1 beacon, r raw, ...).

  x: [N, W + G, ...]; a concatenation and reshapes, no gather."""
  n, rows = x.shape[:2]
  ratio = (rows - beacon_rows) // beacon_rows
  raw = x[:, :rows - beacon_rows].reshape((n, beacon_rows, ratio) + x.shape[2:])
  return jnp.concatenate([raw, x[:, rows - beacon_rows:, None]], axis=2).reshape(x.shape)


def compression_key_limits(prefix: int, window: int, beacon_rows: int, block: int):
  """`attend`'s key_limits for a compression window, keys [prefix, own rows interleaved].

  Raw row i sits at interleaved index i + i // r and sees the keys up to it, so a block of
  raw rows ending at row b sees the first P + (b - 1) + (b - 1) // r + 1 keys; beacons are
  spread over the window and see them all.  None when blocking skips nothing.
  """
  ratio = window // beacon_rows
  limits = tuple((end, prefix + end + (end - 1) // ratio) for end in block_ends(window, block))
  if len(limits) == 1:  # one block of raw rows sees all but the last beacon: nothing to skip
    return None
  return limits + ((window + beacon_rows, prefix + window + beacon_rows),)


def head_projection(x: Array, kernel: Array, bias: Array, config: ModelConfig) -> Array:
  """x [B, T, E] @ kernel [E, H, D] + bias [H, D] -> [B, T, H, D] in the compute dtype: a
  q/k/v projection (also the compressor's, which projects beacon rows alone)."""
  dtype = config.jnp_dtype
  return jnp.einsum("bte,ehd->bthd", x.astype(dtype), compute_copy(kernel, dtype),
                    precision=config.precision) + compute_copy(bias, dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with q/k/v bias and rotary embeddings.

  Three ways to run, chosen by what `layer_kv` holds:
  * None: attend over the current tokens only (training forward).
  * a KV cache `{"k", "v"}` (rotated keys): write the new keys/values at
    `write_index`, attend over the whole cache (`mask` says which slots).  With
    `{"shared_k", "shared_v"}` beside them (`forward`'s shared_prefix), each run of R rows also
    attends to one row of those, and `mask` is (the cache's mask, the prefix's [B/R, P]).
  * compression (`beacon_rows > 0`): the last `beacon_rows` rows are beacons
    and use their own q/k/v projections; `layer_kv` is the pre-RoPE prefix of
    earlier windows' beacons, rotated here with the leading part of cos/sin;
    the returned `layer_kv` is this window's beacon keys/values, pre-RoPE.
  Compression windows, and with `causal` (the caller's mask is causal, its T queries the last
  T of the S keys at most, as `forward`'s masks), have a static mask structure: blocks of
  query rows skip the keys they cannot see (`attention.attend`'s key_limits).
  """
  config: ModelConfig
  beacon_rows: int = 0
  use_lora: bool = False
  causal: bool = False

  def project(self, x: Array, name: str, num_heads: int, heads_axis: str) -> Array:
    cfg = self.config
    kernel = _param(self, f"{name}_kernel", _KERNEL_INIT,
                    (cfg.hidden_size, num_heads, cfg.head_dim), ("embed", heads_axis, "head_dim"),
                    cfg.jnp_param_dtype)
    bias = _param(self, f"{name}_bias", nn.initializers.zeros, (num_heads, cfg.head_dim),
                  (heads_axis, "head_dim"), cfg.jnp_param_dtype)
    out = head_projection(x, kernel, bias, cfg)
    delta = lora_delta(self, name, x, ("embed",), (num_heads, cfg.head_dim),
                       (heads_axis, "head_dim"), self.use_lora)
    return out if delta is None else out + delta

  def qkv(self, x: Array) -> tuple[Array, Array, Array]:
    """Pre-RoPE q [B, T, H, D], k and v [B, T, K, D]; beacon rows use the beacon projections."""
    cfg = self.config
    heads = {"q": (cfg.num_heads, "heads"), "k": (cfg.num_kv_heads, "kv_heads"),
             "v": (cfg.num_kv_heads, "kv_heads")}
    ordinary = {p: self.project(x[:, :x.shape[1] - self.beacon_rows], p, *heads[p]) for p in "qkv"}
    if not cfg.compressor:
      return ordinary["q"], ordinary["k"], ordinary["v"]
    # Declared whenever the tree has them, so that init creates them.
    beacon = {p: self.project(x[:, x.shape[1] - self.beacon_rows:], f"beacon_{p}", *heads[p])
              for p in "qkv"}
    return tuple(jnp.concatenate([ordinary[p], beacon[p]], axis=1) for p in "qkv")

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
               layer_kv: dict[str, Array] | None = None,
               write_index: Array | None = None) -> tuple[Array, dict[str, Array] | None]:
    cfg = self.config
    q, k, v = self.qkv(x)  # [B, T, H, D], [B, T, K, D], [B, T, K, D]
    key_limits, heads_major, shared = None, False, None
    if self.beacon_rows:
      own = {"k": k[:, -self.beacon_rows:], "v": v[:, -self.beacon_rows:]}
      prefix = layer_kv["k"].shape[1]
      q = apply_rope(q, cos[:, prefix:], sin[:, prefix:])
      k = apply_rope(jnp.concatenate([layer_kv["k"].astype(k.dtype), k], axis=1), cos, sin)
      v = jnp.concatenate([layer_kv["v"].astype(v.dtype), v], axis=1)
      # Own keys in the interleaved order the mask's columns use (compressor.window_inputs).
      # (Roping the prefix and the own rows apart and concatenating once measured 7% slower
      # compression at the mid shape.)
      k, v = (jnp.concatenate([a[:, :prefix], interleave_beacons(a[:, prefix:], self.beacon_rows)],
                              axis=1) for a in (k, v))
      key_limits = compression_key_limits(prefix, x.shape[1] - self.beacon_rows, self.beacon_rows,
                                          QUERY_BLOCK)
      layer_kv = own
    else:
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      if layer_kv is not None and "shared_k" in layer_kv:  # `forward`'s shared_prefix
        shared = (layer_kv["shared_k"].astype(q.dtype), layer_kv["shared_v"].astype(q.dtype))
        layer_kv = {"k": layer_kv["k"], "v": layer_kv["v"]}
        mask, shared_mask = mask
      if layer_kv is not None:  # the cache is kv-head major: [B, K, S, D]
        start = (0, 0, write_index, 0)
        layer_kv = {n: jax.lax.dynamic_update_slice(
            layer_kv[n], new.transpose(0, 2, 1, 3).astype(layer_kv[n].dtype), start)
                    for n, new in (("k", k), ("v", v))}
        k, v = layer_kv["k"].astype(q.dtype), layer_kv["v"].astype(q.dtype)
        heads_major = True
      if self.causal:
        key_limits = causal_key_limits(q.shape[1], k.shape[2 if heads_major else 1], QUERY_BLOCK)
    if shared is None:
      out = attend(q, k, v, mask, cfg.attention, key_limits, cfg.precision,
                   heads_major)  # [B, T, H, D]
    else:
      out = attend_with_shared_prefix(q, k, v, mask, *shared, shared_mask, cfg.precision)
    out = with_logical_constraint(out, ("batch", "length", "act_heads", None))
    o_kernel = _param(self, "o_kernel", _KERNEL_INIT, (cfg.num_heads, cfg.head_dim, cfg.hidden_size),
                      ("heads", "head_dim", "embed"), cfg.jnp_param_dtype)
    # As one [B, T, H*D] x [H*D, E] product: the kernel's reshape is free, where the einsum
    # let XLA CPU copy a transposed kernel at every decode step.
    b, t = out.shape[:2]
    o_kernel = compute_copy(o_kernel, out.dtype).reshape(-1, cfg.hidden_size)
    y = jnp.matmul(out.reshape(b, t, -1), o_kernel, precision=cfg.precision)
    delta = lora_delta(self, "o", out, ("heads", "head_dim"), (cfg.hidden_size,), ("embed",),
                       self.use_lora)
    return (y if delta is None else y + delta), layer_kv


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), over at most `mlp_chunk_tokens`
  tokens at a time (`in_token_chunks`)."""
  config: ModelConfig
  use_lora: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, pdtype = cfg.jnp_dtype, cfg.jnp_param_dtype
    e, m = cfg.hidden_size, cfg.intermediate_size
    chunked = device_token_chunks(*x.shape[:2], cfg.mlp_chunk_tokens) is not None
    in_axes, out_axes = ("embed", "mlp"), ("mlp", "embed")

    def weights(name, shape, axes):
      kernel = compute_copy(_param(self, f"{name}_kernel", _KERNEL_INIT, shape, axes, pdtype),
                            dtype)
      return kernel, lora_factors(self, name, shape[:1], axes[:1], shape[1:], axes[1:],
                                  self.use_lora)

    def gathered(weight, axes):
      kernel, factors = weight
      if factors is not None:
        factors = (fsdp_gathered(factors[0], axes[:1] + (None,)),
                   fsdp_gathered(factors[1], (None,) + axes[1:]))
      return fsdp_gathered(kernel, axes), factors

    gate = weights("gate", (e, m), in_axes)
    up = weights("up", (e, m), in_axes)
    down = weights("down", (m, e), out_axes)
    if chunked:
      # Read at every chunk: gathered over the fsdp axis once, before the loop (else each
      # chunk gathers them again).  The barrier ties the gathered copy to this call's input,
      # so it is made here, for this layer, and neither shared with nor hoisted for another
      # call of the same weights (a decode loop's steps gather their own, as before).
      (gate, up, down), x = jax.lax.optimization_barrier(((gate, up, down), x))
      gate, up, down = gathered(gate, in_axes), gathered(up, in_axes), gathered(down, out_axes)

    def linear(inputs, weight):
      kernel, factors = weight
      out = jnp.matmul(inputs, kernel, precision=cfg.precision)
      return out if factors is None else out + apply_lora(cfg, inputs, factors)

    def swiglu(x):  # [B, t, E]
      hidden = jax.nn.silu(linear(x, gate)) * linear(x, up)  # [B, t, M]
      hidden = with_logical_constraint(hidden, ("batch", "length", "act_mlp"))
      return linear(hidden, down)

    return in_token_chunks(swiglu, x.astype(dtype), cfg.mlp_chunk_tokens)


def fsdp_gathered(weight: Array, logical_axes: tuple) -> Array:
  """A weight with the fsdp split of its embed axis undone (its other splits kept): what a
  loop that reads it at every iteration gathers once before it, behind a barrier."""
  return with_logical_constraint(weight, tuple(None if a == "embed" else a
                                               for a in logical_axes))


def token_chunks(rows: int, positions: int, chunk_tokens: int) -> tuple[int, int] | None:
  """(number, width) of `in_token_chunks`' chunks for a device's `rows` x `positions`; None:
  in one piece (a decode step's single position, however many rows, is one piece)."""
  if not chunk_tokens or rows * positions <= chunk_tokens:
    return None
  n = -(-positions // max(1, chunk_tokens // rows))
  return (n, -(-positions // n)) if n > 1 else None


def device_token_chunks(rows: int, positions: int, chunk_tokens: int) -> tuple[int, int] | None:
  """`token_chunks` of a [rows, positions, ...] activation under the current mesh: for the
  rows one device holds (the batch split over the mesh's batch axes), since the chunks bound
  what a device holds and how many rows each of its matmuls reads."""
  return token_chunks(rows // sharding.logical_shards("batch", rows), positions, chunk_tokens)


def in_token_chunks(f, xs, chunk_tokens: int):
  """f (position-wise: arrays [B, t, ...] -> arrays [B, t, ...]) over xs' positions in chunks
  of at most `chunk_tokens` tokens (rows x positions) a device, one chunk after another; 0:
  all at once.  xs and f's result are pytrees of arrays sharing their first two axes [B, T].

  The MLP's [B, T, M] intermediate is 5.3x the hidden state at Qwen2.5-7B: a 32-row prefill
  of a 6.7K-token MemAgent prompt holds 7.6 GiB of it; the LM head's [B, T, V] logits are
  42x it.  In chunks only one chunk's is live, and each chunk's matmuls are still
  [chunk_tokens, E] x [E, M].  The n chunks are of equal width, the last one ending at T (it
  may overlap the one before and write the same values again, fewer than n positions a row),
  so the loop holds one f and writes one output in place.
  """
  b, t = jax.tree.leaves(xs)[0].shape[:2]
  chunks = device_token_chunks(b, t, chunk_tokens)
  if chunks is None:
    return f(xs)
  n, width = chunks
  part_shape = lambda x: jax.ShapeDtypeStruct((b, width) + x.shape[2:], x.dtype)
  shapes = jax.eval_shape(f, jax.tree.map(part_shape, xs))

  def chunk(i, out):
    start = jnp.minimum(i * width, t - width)
    parts = f(jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, width, axis=1), xs))
    return jax.tree.map(lambda o, p: jax.lax.dynamic_update_slice_in_dim(o, p, start, axis=1),
                        out, parts)

  out = jax.tree.map(lambda s: jnp.zeros((b, t) + s.shape[2:], s.dtype), shapes)
  return jax.lax.fori_loop(0, n, chunk, out)


class DecoderLayer(nn.Module):
  """Pre-norm residual block; scanned over the stacked `layers` axis."""
  config: ModelConfig
  beacon_rows: int = 0
  use_lora: bool = False
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array, layer_cache, cos: Array, sin: Array, mask: Array,
               write_index: Array | None):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=name)
    attn_out, layer_cache = Attention(cfg, self.beacon_rows, self.use_lora, self.causal,
                                          name="attention")(
        norm("input_norm")(x), cos, sin, mask, layer_cache, write_index)
    x = x + attn_out
    x = x + MLP(cfg, self.use_lora, name="mlp")(norm("post_attention_norm")(x))
    x = with_logical_constraint(x, ("batch", "length", "act_embed"))
    return x, layer_cache


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Qwen2(nn.Module):
  """Embedding, the scanned decoder stack, the final norm and the LM head.

  `embed`, `decode` and `logits` are exposed separately so that callers that
  build their own input embeddings (the compressor's beacon tokens) or need
  hidden states (the gate's head) reuse the same parameters.  `beacon_rows`
  switches the layers to compression (see `Attention`); the parameter tree is
  the same either way; `use_lora` applies the gate's adapters; `causal` promises causal
  masks (see `Attention`).
  """
  config: ModelConfig
  beacon_rows: int = 0
  use_lora: bool = False
  causal: bool = False

  def setup(self):
    cfg = self.config
    self.embedding = _param(self, "embedding", _KERNEL_INIT, (cfg.vocab_size, cfg.hidden_size),
                            ("vocab", "embed"), cfg.jnp_param_dtype)
    if cfg.compressor:
      self.beacon_embedding = _param(self, "beacon_embedding", _KERNEL_INIT, (1, cfg.hidden_size),
                                     (None, "embed"), cfg.jnp_param_dtype)
    layer = DecoderLayer
    if cfg.remat != "none":
      layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    if cfg.scan_layers:
      self.layers = nn.scan(
          layer,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.beacon_rows, self.use_lora, self.causal, name="layers")
    else:  # subtrees layers_0, layers_1, ...
      self.layers = [layer(cfg, self.beacon_rows, self.use_lora, self.causal)
                     for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)
    if cfg.has_gate:
      self.gate_head = _param(self, "gate_head", nn.initializers.zeros, (cfg.hidden_size,),
                              ("embed",), cfg.jnp_param_dtype)
      self.gate_bias = _param(self, "gate_bias", nn.initializers.zeros, (), (),
                              cfg.jnp_param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(self, "lm_head", _KERNEL_INIT, (cfg.hidden_size, cfg.vocab_size),
                            ("embed", "vocab"), cfg.jnp_param_dtype)

  def embed(self, tokens: Array) -> Array:
    """tokens [B, T] -> [B, T, E] in the compute dtype."""
    return compute_copy(jnp.take(self.embedding, tokens, axis=0), self.config.jnp_dtype)

  def beacons(self, batch: int, count: int) -> Array:
    """The beacon embedding repeated: [batch, count, E]."""
    return jnp.broadcast_to(compute_copy(self.beacon_embedding, self.config.jnp_dtype),
                            (batch, count, self.config.hidden_size))

  def decode(self, x: Array, positions: Array, mask: Array, cache_kv=None,
             write_index: Array | None = None):
    """Runs every layer. x: [B, T, E]; positions: [B, T]; mask: [B, 1, T, S].

    Returns the final-normed hidden states [B, T, E] and the updated cache (`{"k", "v"}`, each
    in `KVCache`'s layout: [L, B, K, S, D] for scanned layers, a tuple of L [B, K, S, D]
    arrays for per-layer ones) or None.
    """
    cfg = self.config
    x = with_logical_constraint(x, ("batch", "length", "act_embed"))
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    if cfg.scan_layers:
      x, cache_kv = self.layers(x, cache_kv, cos, sin, mask, write_index)
      return self.final_norm(x), cache_kv
    out = []  # each layer's returned cache: one array per layer, never restacked
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache_kv is None else {n: a[i] for n, a in cache_kv.items()}
      x, layer_cache = layer(x, layer_cache, cos, sin, mask, write_index)
      out.append(layer_cache)
    if out[0] is not None:
      cache_kv = {n: tuple(c[n] for c in out) for n in out[0]}
    return self.final_norm(x), cache_kv

  def logits(self, hidden: Array) -> Array:
    """hidden [B, T, E] -> float32 logits [B, T, V]."""
    head = self.embedding.T if self.config.tie_word_embeddings else self.lm_head
    # Accumulated and returned in float32: bfloat16 logits near 20 are 0.125 apart, noise the
    # sampler's and the learner's log-probs (RL's ratio) would each round differently.
    logits = jnp.matmul(hidden, compute_copy(head, hidden.dtype), precision=self.config.precision,
                        preferred_element_type=jnp.float32)
    logits = with_logical_constraint(logits, ("batch", "length", "act_vocab"))
    return logits.astype(jnp.float32)

  def gate_logit(self, hidden: Array) -> Array:
    """The relevance head: hidden [..., E] -> float32 logit [...]."""
    h = hidden.astype(jnp.float32)
    return (jnp.matmul(h, self.gate_head.astype(jnp.float32), precision=self.config.precision)
            + self.gate_bias.astype(jnp.float32))

  def __call__(self, tokens: Array, positions: Array, mask: Array, cache_kv=None,
               write_index: Array | None = None, return_hidden: bool = False):
    hidden, cache_kv = self.decode(self.embed(tokens), positions, mask, cache_kv, write_index)
    if self.config.has_gate and self.is_initializing():
      self.gate_logit(hidden)  # create the head's parameters
    if return_hidden:
      return hidden, cache_kv
    return self.logits(hidden), cache_kv


# --- functional entry points -------------------------------------------------


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer plus the bookkeeping to append to them.

  k, v:         keys (rotated) and values, kv-head major so that attention's products read
                them where they lie (a [B, S, K, D] cache was transposed, i.e. copied whole, by
                every layer at every decode step): [L, B, K, S, D] with scanned layers, a tuple
                of L arrays [B, K, S, D] with per-layer ones (`ModelConfig.scan_layers`; each
                array is then updated in place by the decode loop, where one stacked array was
                rebuilt at every step).  `cache_layout` converts from [L, B, K, S, D].
  key_mask:     [B, S] bool, which slots hold a real token.
  index:        int32 scalar, the next slot to write (shared by all rows).
  next_position:[B] int32, the RoPE position of each row's next real token.
  """
  k: Array | tuple[Array, ...]
  v: Array | tuple[Array, ...]
  key_mask: Array
  index: Array
  next_position: Array

  @property
  def size(self) -> int:
    return self.key_mask.shape[1]


def cache_layout(config: ModelConfig, x: Array) -> Array | tuple[Array, ...]:
  """[L, B, K, S, D] -> `KVCache`'s layout for `config` (stacked, or one array per layer)."""
  return x if config.scan_layers else tuple(x[i] for i in range(config.num_layers))


def slots_to_cache(config: ModelConfig, x: Array) -> Array | tuple[Array, ...]:
  """Compressed memory slots [L, B, S, K, D] (the compressor's layout) in `KVCache`'s layout:
  one transpose per memory update, not per decode step."""
  return cache_layout(config, x.astype(config.jnp_dtype).transpose(0, 1, 3, 2, 4))


def concat_slots(parts: list) -> Array | tuple[Array, ...]:
  """Concatenates caches' keys (or values) along their slot axis, in either layout."""
  if isinstance(parts[0], tuple):
    return tuple(jnp.concatenate(layer, axis=2) for layer in zip(*parts))
  return jnp.concatenate(parts, axis=3)


def init_cache(config: ModelConfig, batch: int, size: int, dtype=None) -> KVCache:
  """An empty cache with room for `size` tokens per row."""
  shape = (config.num_layers, batch, config.num_kv_heads, size, config.head_dim)
  empty = lambda: cache_layout(config, jnp.zeros(shape, config.jnp_dtype if dtype is None else dtype))
  return KVCache(
      k=empty(), v=empty(), key_mask=jnp.zeros((batch, size), bool), index=jnp.zeros((), jnp.int32),
      next_position=jnp.zeros((batch,), jnp.int32))


def positions_from_mask(token_mask: Array, start: Array | int = 0) -> Array:
  """RoPE positions: real tokens count up from `start` ([B] or scalar); pads repeat."""
  start = jnp.asarray(start, jnp.int32)
  if start.ndim == 1:
    start = start[:, None]
  return start + jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_valid(x: Array, token_mask: Array) -> Array:
  """Each row's entry at its last real token: [B, T, ...] -> [B, ...] (left or right padding)."""
  t = token_mask.shape[-1]
  last = t - 1 - jnp.argmax(token_mask[:, ::-1].astype(jnp.int32), axis=-1)  # [B]
  index = last.reshape((-1, 1) + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)[:, 0]


def causal_mask(token_mask: Array) -> Array:
  """[B, T] validity -> [B, 1, T, T]: causal and key-padding mask."""
  t = token_mask.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return causal[None, None] & token_mask[:, None, None, :].astype(bool)


def forward(params, config: ModelConfig, tokens: Array, token_mask: Array | None = None,
            cache: KVCache | None = None, *, use_lora: bool = False,
            return_hidden: bool = False,
            shared_prefix: tuple[Array, Array, Array] | None = None
            ) -> tuple[Array, KVCache | None]:
  """Logits for `tokens` [B, T] (float32 [B, T, V]), optionally appending to `cache`.

  Without a cache this is the training forward: causal attention over the
  valid tokens, positions counted over `token_mask` (left or right padding).
  With a cache, the tokens are written at `cache.index` and attend to every
  valid slot before them; positions continue from `cache.next_position`.
  The caller must leave room: `cache.index + T <= cache.size`.
  `use_lora` applies the gate's adapters; `return_hidden` returns the final
  hidden states [B, T, E] instead of logits.

  `shared_prefix` (k, v in `KVCache`'s layout with B/R rows, key_mask [B/R, P]; with a cache
  only): keys every run of R consecutive rows also attends to, rotated, before the cache's
  (`attention.attend_with_shared_prefix`): R rows that share a prompt read it once instead
  of each holding a copy.
  """
  model = Qwen2(config, use_lora=use_lora, causal=True)  # the masks below are causal
  if token_mask is None:
    token_mask = jnp.ones(tokens.shape, bool)
  token_mask = token_mask.astype(bool)
  if cache is None:
    if shared_prefix is not None:
      raise ValueError("shared_prefix needs a cache (it is read beside the cache's keys)")
    positions = positions_from_mask(token_mask)
    logits, _ = model.apply({"params": params}, tokens, positions, causal_mask(token_mask),
                            return_hidden=return_hidden)
    return logits, None
  positions = positions_from_mask(token_mask, cache.next_position)
  key_mask = jax.lax.dynamic_update_slice(cache.key_mask, token_mask, (0, cache.index))
  t, s = tokens.shape[1], cache.size
  causal = jnp.arange(s)[None, :] <= cache.index + jnp.arange(t)[:, None]  # [T, S]
  mask = causal[None, None] & key_mask[:, None, None, :]
  cache_kv = {"k": cache.k, "v": cache.v}
  if shared_prefix is not None:
    shared_k, shared_v, shared_mask = shared_prefix
    cache_kv.update(shared_k=shared_k, shared_v=shared_v)
    mask = (mask, shared_mask.astype(bool))
  logits, kv = model.apply({"params": params}, tokens, positions, mask, cache_kv, cache.index,
                           return_hidden=return_hidden)
  cache = KVCache(k=kv["k"], v=kv["v"], key_mask=key_mask, index=cache.index + t,
                  next_position=cache.next_position + token_mask.sum(-1, dtype=jnp.int32))
  return logits, cache


def head_logits(params, config: ModelConfig, hidden: Array) -> Array:
  """The LM head on hidden states [B, T, E] -> float32 logits [B, T, V]: for callers that
  take `forward(..., return_hidden=True)` and need logits at a few positions only (at 152K
  vocabulary entries the head's output is the largest activation of a turn)."""
  return Qwen2(config).apply({"params": params}, hidden, method=Qwen2.logits)


def token_logprobs(params, config: ModelConfig, hidden: Array, targets: Array,
                   temperature: float = 1.0) -> tuple[Array, Array]:
  """Log-probs [B, T] of `targets` [B, T] under the LM head at `hidden` [B, T, E], and the
  entropies [B, T] of those distributions (no gradient); temperature: of softmax(logits / t),
  the distribution a sampler at that temperature drew from.

  Over at most `config.head_chunk_tokens` tokens a device at a time (`in_token_chunks`), each
  chunk recomputed in the backward pass, so the [B, T, V] logits and their float32
  log-softmax live one chunk at a time (32 rows a device of 1024-token updates, RL's
  reference pass on 8 GPUs: 28 GiB whole)."""
  chunked = device_token_chunks(*targets.shape, config.head_chunk_tokens) is not None
  if chunked:
    # Read at every chunk: cast and gathered over the fsdp axis once, before the loop, as the
    # MLP's weights are (the barrier keeps that copy to this call).
    name, axes = (("embedding", ("vocab", "embed")) if config.tie_word_embeddings
                  else ("lm_head", ("embed", "vocab")))
    head, hidden = jax.lax.optimization_barrier(
        (compute_copy(params[name], hidden.dtype), hidden))
    params = {**params, name: fsdp_gathered(head, axes)}

  def score(chunk):
    h, y = chunk  # [B, t, E], [B, t]
    logits = head_logits(params, config, h)  # [B, t, V]
    logp = jax.nn.log_softmax(logits if temperature == 1.0 else logits / temperature)
    token_logp = jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp) * logp).sum(-1)
    return token_logp, jax.lax.stop_gradient(entropy)

  return in_token_chunks(jax.checkpoint(score) if chunked else score, (hidden, targets),
                         config.head_chunk_tokens)


def unstack_layers(params, config: ModelConfig):
  """The stacked `layers` subtree split into `layers_0` ... (the `scan_layers=False` layout;
  one copy of the weights, made once outside any loop).  Returns (params, config)."""
  if not config.scan_layers:
    return params, config
  if "layers" not in params:
    raise ValueError("the parameters have no stacked `layers` subtree to split")
  stacked = params["layers"]
  params = {k: v for k, v in params.items() if k != "layers"}
  for i in range(config.num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params, config.replace(scan_layers=False)


def is_gate_param(path: tuple[str, ...]) -> bool:
  """The gate's own parameters (its LoRA on the attention projections, its relevance head),
  by a flattened path's last name: not the MLP's `gate_kernel`, which every reader uses."""
  return "_lora_" in path[-1] or path[-1] in ("gate_head", "gate_bias")


# Parameters the model reads in float32 whatever the compute dtype (the gate's relevance
# head): the inference layout keeps them as stored.
FLOAT32_READ = frozenset({"gate_head", "gate_bias"})


def inference_params(params, config: ModelConfig):
  """(params, config) for reading, not training: one subtree per layer (`unstack_layers`) and
  every weight the model casts to the compute dtype at use stored in it already.

  Training keeps float32 master weights (an update of ~lr 1e-6 is lost in a bfloat16 weight of
  ~0.02, whose spacing is ~1e-4) while computing in `dtype`; every product casts them anyway,
  so casting once here changes no output, and a decode step reads half the bytes."""
  params, config = unstack_layers(params, config)
  if config.jnp_param_dtype == config.jnp_dtype:
    return params, config
  return read_dtype(params, config), config.replace(param_dtype=config.dtype)


def read_dtype(params, config: ModelConfig):
  """params (the whole tree or a subtree, either layer layout) with every leaf the model casts
  to the compute dtype at use cast already: the same outputs from half the bytes, for copies
  that are only read (the inference layout, RL's KL reference).  Leaves already in that dtype
  are returned as they are, not copied."""
  dtype = config.jnp_dtype
  flat = flax.traverse_util.flatten_dict(params)
  cast = {k: v if k[-1] in FLOAT32_READ or not jnp.issubdtype(v.dtype, jnp.floating)
          else v.astype(dtype) for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(cast)


def stack_layers(params, config: ModelConfig):
  """Inverse of `unstack_layers`: back to the stacked layout of checkpoints and training."""
  if config.scan_layers:
    return params, config
  names = [f"layers_{i}" for i in range(config.num_layers)]
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"the parameters lack per-layer subtrees {missing}")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
  params = {k: v for k, v in params.items() if k not in names}
  params["layers"] = stacked
  return params, config.replace(scan_layers=True)


def abstract_params(config: ModelConfig) -> Any:
  """The boxed (`nn.Partitioned`) parameter tree as ShapeDtypeStructs; no compute.

  Traced once per config (0.7 s at 7B: planning every recipe asks for it ~200 times); each
  call gets its own containers around the shared, immutable leaves."""
  return jax.tree.map(lambda x: x, _traced_abstract_params(config),
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


@functools.lru_cache(maxsize=16)
def _traced_abstract_params(config: ModelConfig) -> Any:
  model = Qwen2(config)
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, jnp.zeros((1, 1), jnp.int32),
                         jnp.ones((1, 1, 1, 1), bool)))
  return variables["params"]


def place_params(params, config: ModelConfig, mesh) -> Any:
  """`params` (in `config`'s layout: stacked or per-layer) on `mesh`, each sharded by the
  logical-axis rules as training shards it; arrays already placed so are not copied."""
  return jax.device_put(params, sharding.param_shardings(abstract_params(config), mesh))


def init_params(config: ModelConfig, rng: Array, mesh=None) -> Any:
  """Randomly initialised parameters, created directly with their target shardings."""
  return _init_program(config, mesh)(rng)


@functools.lru_cache(maxsize=16)
def _init_program(config: ModelConfig, mesh) -> Callable[[Array], Any]:
  """The jitted initialiser of one config on one mesh, made once: a fresh jit per call traced,
  lowered and fetched it from the compilation cache again each time (0.48 s of the test model's
  0.53 s per call on the 2-core test machine; the suite's test processes initialise 80 times)."""
  model = Qwen2(config)

  def init(rng):  # its inputs made inside: the cached program holds no device array
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = model.init(rng, tokens, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1, 1), bool))
    return nn.unbox(variables["params"])

  if mesh is None:
    return jax.jit(init)
  return jax.jit(init, out_shardings=sharding.param_shardings(abstract_params(config), mesh))
