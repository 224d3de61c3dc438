"""The Compressor: every chunk of a document becomes C/r beacon key/value slots per layer.

Layout (docs/architecture.md#compressor-layout, reproducing the released
LycheeMemory model): a chunk of C tokens is split into C/W windows; after
every r raw tokens of a window sits a beacon token (own embedding, own q/k/v
projections).  Window w attends causally to [beacons of windows < w of the
same chunk] ++ [its own W + W/r tokens]; raw keys of earlier windows are
dropped.  Positions are `max(cumsum(mask) - 1, 0)` over that concatenation.
What is kept per layer is each beacon's key and value *before* RoPE, window
1's beacons first.

Inside a window the rows are ordered [W raw tokens, W/r beacons] rather than
interleaved: attention only sees order through the mask and the positions,
which are both computed for the interleaved layout, and the split lets each
group use its own projections without gathers.  Chunks are independent, so
they are compressed in batched groups of `group_size` chunks.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from memrecall.models.config import ConfigError, ModelConfig
from memrecall.models.qwen2 import (DecoderLayer, Qwen2, REMAT_POLICIES, RMSNorm,
                                    head_projection, rope_tables)
from memrecall.runtime.sharding import logical_shards, with_logical_constraint

Array = jax.Array


# The released LycheeMemory config keys whose other values would compute something else.
SUPPORTED_HF_VALUES = {
    "lychee_memory_attn": ("full-coverage",),
    "lychee_memory_pos": ("interleave",),
    "lychee_memory_attend_prev": (True,),
    "lychee_memory_sink_size": (0,),
    "lychee_memory_parallel_window": (1,),
    "lychee_memory_param": (("k", "q", "v"),),
}


def _normalised(value):
  """Lists compare as sorted tuples (the order of `lychee_memory_param` does not matter)."""
  return tuple(sorted(value)) if isinstance(value, (list, tuple)) else value


# Tokens compressed per call by default.  Measured with `launch/bench.py --model=demo
# --scaling_chunks=512,2048` on the development CPU: 2048 chunks of 16 tokens cost 3.8x
# 512 chunks in groups of 256 (4.0x the work), 4.9x in one call (6.8x before attention was
# laid out as one matmul per key/value head).
GROUP_TOKENS = 4096


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
  """chunk_size C (tokens per chunk), window W (= stride), ratio r (tokens per beacon).

  group_size: chunks each device compresses together; more are compressed group after group
  (a `lax.map`), so a call's activations, and its cost per chunk, stay those of one group
  however long the document.  None: `GROUP_TOKENS` tokens' worth; 0: all at once.  A run
  setting, not a model property; training compresses in one call (`compress`).
  """
  chunk_size: int = 4096
  window: int = 2048
  ratio: int = 4
  group_size: int | None = None

  def __post_init__(self):
    for name in ("chunk_size", "window", "ratio"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"compressor {name} must be positive, got {getattr(self, name)}")
    if self.group_size is not None and self.group_size < 0:
      raise ConfigError(f"compressor group_size must be >= 0 (0: all chunks at once), got "
                        f"{self.group_size}")
    if self.chunk_size % self.window:
      raise ConfigError(f"chunk_size ({self.chunk_size}) must be a multiple of the window "
                        f"({self.window})")
    if self.window % self.ratio:
      raise ConfigError(f"window ({self.window}) must be a multiple of the ratio ({self.ratio})")

  @classmethod
  def from_hf_dict(cls, hf, chunk_size: int | None = None, group_size: int | None = None
                   ) -> "CompressorConfig":
    """Reads `lychee_memory_{window,stride,ratio}` of a LycheeMemory config.json.

    The chunk size is a run setting, not a model property; it defaults to two
    windows (4096 for the released model's 2048-token window).  A plain Qwen2
    config has no window: 2048, or the chunk size if that is smaller.
    """
    for key, supported in SUPPORTED_HF_VALUES.items():
      if key in hf and _normalised(hf[key]) not in supported:
        raise ConfigError(f"config.json sets {key}={hf[key]!r}, which memrecall does not implement; "
                          f"supported: {' or '.join(repr(v) for v in supported)}")
    window = int(hf.get("lychee_memory_window") or min(2048, chunk_size or 2048))
    stride = int(hf.get("lychee_memory_stride", window))
    if stride != window:
      raise ConfigError(f"lychee_memory_stride ({stride}) must equal lychee_memory_window "
                        f"({window}) for interleaved beacons")
    ratio = hf.get("lychee_memory_ratio", 4)
    ratios = ratio if isinstance(ratio, (list, tuple)) else [ratio]
    if len(ratios) != 1:
      raise ConfigError(f"only a single compression ratio is supported, got {ratios}")
    return cls(chunk_size=chunk_size or 2 * window, window=window, ratio=int(ratios[0]),
               group_size=group_size)

  def to_hf_dict(self) -> dict:
    """config.json's `lychee_memory_*` keys: the window and ratio, and every setting memrecall
    implements written out (`SUPPORTED_HF_VALUES`), so that code with other defaults for a
    missing key reads the same model."""
    return {"lychee_memory_window": self.window, "lychee_memory_stride": self.window,
            "lychee_memory_ratio": [self.ratio], "lychee_memory_pos": "interleave",
            "lychee_memory_attn": "full-coverage", "lychee_memory_attend_prev": True,
            "lychee_memory_sink_size": 0, "lychee_memory_parallel_window": 1,
            "lychee_memory_param": ["q", "k", "v"]}

  @property
  def chunks_per_group(self) -> int:
    """Chunks per compression call (0: all of them)."""
    if self.group_size is None:
      return max(1, GROUP_TOKENS // self.chunk_size)
    return self.group_size

  @property
  def slots(self) -> int:
    """Compressed slots per chunk, C / r."""
    return self.chunk_size // self.ratio

  @property
  def beacons_per_window(self) -> int:
    return self.window // self.ratio


@flax.struct.dataclass
class ChunkMemory:
  """Compressed memory of N chunks.

  k, v:      [L, N, S, K, D] beacon keys/values before RoPE (S = C / r).
  slot_mask: [N, S] bool; slot j is valid if any of its r raw tokens is.
  """
  k: Array
  v: Array
  slot_mask: Array

  @property
  def num_chunks(self) -> int:
    return self.k.shape[1]


def chunk_document(tokens, chunk_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts token ids [T] into right-padded chunks: ids and mask, both [ceil(T/C), C]."""
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  if tokens.size == 0:
    raise ValueError("the document is empty: there is nothing to compress")
  n = -(-tokens.size // chunk_size)
  ids = np.full((n * chunk_size,), pad_id, np.int32)
  ids[:tokens.size] = tokens
  mask = np.zeros((n * chunk_size,), bool)
  mask[:tokens.size] = True
  return ids.reshape(n, chunk_size), mask.reshape(n, chunk_size)


def chunk_documents(documents, chunk_size: int, num_chunks: int, pad_id: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Several documents' ids as [B, N, C] ids and mask; shorter ones get empty trailing chunks.

  A document over N chunks raises IndexError with its position in the list."""
  ids = np.full((len(documents), num_chunks, chunk_size), pad_id, np.int32)
  mask = np.zeros((len(documents), num_chunks, chunk_size), bool)
  for b, tokens in enumerate(documents):
    doc_ids, doc_mask = chunk_document(tokens, chunk_size, pad_id)
    if doc_ids.shape[0] > num_chunks:
      raise IndexError(b, doc_ids.shape[0])
    ids[b, :doc_ids.shape[0]] = doc_ids
    mask[b, :doc_ids.shape[0]] = doc_mask
  return ids, mask


def _interleaved_order(window: int, ratio: int) -> np.ndarray:
  """Index in the interleaved layout (t t t t B t ...) of each row in [raw..., beacons...] order."""
  raw = np.arange(window)
  beacon = np.arange(window // ratio)
  return np.concatenate([raw + raw // ratio, beacon * (ratio + 1) + ratio])


def window_inputs(raw_mask: Array, prefix: int, ratio: int) -> tuple[Array, Array]:
  """Positions [N, P + T] (prefix then own rows) and attention mask [N, 1, T, P + T] of a window.

  raw_mask: [N, W] validity of the window's raw tokens; beacons are always valid.  The
  mask's own key columns are in the interleaved order (`qwen2.interleave_beacons`), so that
  each block of raw query rows sees a prefix of the keys (`qwen2.compression_key_limits`).
  """
  n, window = raw_mask.shape
  order = jnp.asarray(_interleaved_order(window, ratio))  # [T]
  own_valid = jnp.concatenate([raw_mask, jnp.ones((n, window // ratio), bool)], axis=1)  # [N, T]
  # cumsum in interleaved order, read back per row.
  inverse = jnp.argsort(order)
  valid_interleaved = own_valid[:, inverse]
  running = jnp.cumsum(valid_interleaved.astype(jnp.int32), axis=1)[:, order]
  own_pos = jnp.maximum(prefix + running - 1, 0)
  positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(prefix), (n, prefix)), own_pos], axis=1)
  causal = jnp.arange(order.size)[None, :] <= order[:, None]  # [T(query row), T(interleaved key)]
  own_keys = causal[None] & valid_interleaved[:, None, :]  # [N, T, T]
  prefix_keys = jnp.ones((n, order.size, prefix), bool)
  mask = jnp.concatenate([prefix_keys, own_keys], axis=2)[:, None]
  return positions, mask


def _run_windows(params, config: ModelConfig, compressor: CompressorConfig, tokens: Array,
                 token_mask: Array, raw_hidden: bool, skip_last: bool = True):
  """The windows of every chunk through every layer, shared by `compress` and
  `compressor_hidden`: (ChunkMemory, raw tokens' final hidden states [N, C, E] or None)."""
  if not config.compressor:
    raise ConfigError("this model has no compressor parameters (ModelConfig.compressor=False)")
  n, c = tokens.shape
  if c != compressor.chunk_size:
    raise ValueError(f"chunks have {c} tokens, the compressor expects {compressor.chunk_size}")
  w, g = compressor.window, compressor.beacons_per_window
  model = Qwen2(config, beacon_rows=g)
  variables = {"params": params}
  tokens = with_logical_constraint(tokens, ("chunks", None))
  beacons = model.apply(variables, n, g, method=Qwen2.beacons)  # [N, G, E]
  starts = range(0, c, w)
  windows = [window_inputs(token_mask[:, start:start + w].astype(bool), i * g, compressor.ratio)
             for i, start in enumerate(starts)]  # (positions [N, P + T], mask [N, 1, T, P + T])
  xs = [jnp.concatenate([model.apply(variables, tokens[:, start:start + w], method=Qwen2.embed),
                         beacons], axis=1) for start in starts]  # C/W x [N, W + G, E]
  # Without raw hidden states, the last layer contributes only its beacons' keys/values, which
  # depend on its input alone: that layer's attention and MLP are skipped.
  hidden, kv = _window_layers(params, config, g, xs, windows,
                              beacon_kv_only=not raw_hidden and skip_last)
  slot_mask = token_mask.reshape(n, compressor.slots, compressor.ratio).any(axis=-1)
  memory = ChunkMemory(k=kv["k"], v=kv["v"], slot_mask=slot_mask)
  if not raw_hidden:
    return memory, None
  final_norm = lambda module, x: module.final_norm(x)
  raw = jnp.concatenate([x[:, :w] for x in hidden], axis=1)  # [N, C, E]
  return memory, model.apply(variables, raw, method=final_norm)


def _window_layers(params, config: ModelConfig, beacon_rows: int, xs: list[Array],
                   windows: list[tuple[Array, Array]], beacon_kv_only: bool):
  """Every window of a chunk through every layer: (last layer's outputs, one [N, W + G, E] per
  window; beacon keys/values {"k", "v"} [L, N, S, K, D], window 1's first).

  One pass over the layers, each running the windows in order: window w's attention at a layer
  reads the beacon keys/values windows < w made at that layer, so the layer loop can be the
  outer one.  Each layer's weights are then read once per chunk, not once per window, and a
  loss's backward pass produces one weight gradient for the whole compression (the layer
  scan's) rather than one per window, each alive until the block's backward ended
  (docs/2026-12-06-compression-layer-loop.md).

  beacon_kv_only: the last layer only projects its beacons' keys/values (its attention and MLP
  are skipped): a static skip with per-layer subtrees, a `lax.cond` in the layer scan (slicing
  the stack to its first L-1 layers instead would make XLA copy those layers' weights).
  A loss does not skip (`compress`'s for_gradients: a cond's residuals outlive remat).
  """
  layer = DecoderLayer(config, beacon_rows=beacon_rows)
  norm = RMSNorm(config.rms_norm_eps, config.jnp_dtype, config.jnp_param_dtype)
  tables = [rope_tables(positions, config.head_dim, config.rope_theta) for positions, _ in windows]
  masks = [mask for _, mask in windows]
  xs = [with_logical_constraint(x, ("batch", "length", "act_embed")) for x in xs]
  n = xs[0].shape[0]
  empty = jnp.zeros((n, 0, config.num_kv_heads, config.head_dim), config.jnp_dtype)

  def whole_layer(xs, layer_params):
    out, ks, vs = [], [], []
    for x, (cos, sin), mask in zip(xs, tables, masks):
      prefix = {"k": jnp.concatenate(ks, axis=1) if ks else empty,
                "v": jnp.concatenate(vs, axis=1) if vs else empty}  # [N, P, K, D]
      x, own = layer.apply({"params": layer_params}, x, prefix, cos, sin, mask, None)
      out.append(x)
      ks.append(own["k"])  # [N, G, K, D]
      vs.append(own["v"])
    return out, {"k": jnp.concatenate(ks, axis=1), "v": jnp.concatenate(vs, axis=1)}

  def beacon_projections(xs, layer_params):
    attention = layer_params["attention"]
    normed = [norm.apply({"params": layer_params["input_norm"]}, x[:, -beacon_rows:])
              for x in xs]  # [N, G, E] each
    def project(name):  # the beacon rows' own projection (no adapters in compression)
      return jnp.concatenate([head_projection(x, attention[f"beacon_{name}_kernel"],
                                              attention[f"beacon_{name}_bias"], config)
                              for x in normed], axis=1)  # [N, S, K, D]
    return xs, {"k": project("k"), "v": project("v")}

  def layer_step(i):
    return beacon_projections if beacon_kv_only and i == config.num_layers - 1 else whole_layer

  remat = (lambda f: jax.checkpoint(f, policy=REMAT_POLICIES[config.remat], prevent_cse=False)
           ) if config.remat != "none" else (lambda f: f)
  if not config.scan_layers:  # per-layer subtrees (inference): an unrolled loop, a static skip
    own = []
    for i in range(config.num_layers):
      xs, layer_kv = remat(layer_step(i))(xs, params[f"layers_{i}"])
      own.append(layer_kv)
    return xs, {name: jnp.stack([kv[name] for kv in own]) for name in own[0]}
  if beacon_kv_only:
    body = lambda xs, scanned: jax.lax.cond(scanned[0] == config.num_layers - 1,
                                            beacon_projections, whole_layer, xs, scanned[1])
  else:
    body = lambda xs, scanned: whole_layer(xs, scanned[1])
  return jax.lax.scan(remat(body), xs, (jnp.arange(config.num_layers), params["layers"]))


@functools.partial(jax.jit, static_argnames=("config", "compressor", "for_gradients"))
def compress(params, config: ModelConfig, compressor: CompressorConfig, tokens: Array,
             token_mask: Array, *, for_gradients: bool = False) -> ChunkMemory:
  """Compresses chunks tokens/token_mask [N, C] into a ChunkMemory.

  Chunks are independent, so when a device holds more than `chunks_per_group` of them they
  are compressed that many per device at a time under a `lax.map` (each device's last group
  padded with empty chunks, dropped from the result): one compiled group whose working set
  does not grow with N, where a single batched call over thousands of chunks spills out of
  the caches and costs more per chunk.  Under a mesh (`jax.set_mesh`) that splits the
  chunks over devices, a group takes `chunks_per_group` chunks from every device, so each
  device compresses its own chunks, in place; groups of the whole batch would make every
  device compress every chunk of a group, one group after another.

  for_gradients: a loss differentiates through the compression (the training objectives).
  Every layer then runs whole, under the model's remat: the last layer's skip
  (`_window_layers`) is a `lax.cond` in the layer scan, and JAX keeps the residuals of a
  cond's branches for the backward pass even under remat: every layer's float32 attention
  scores, 27 GiB per chip for configs/lychee.py:rl,7b,v5p-64 (docs/2026-12-04-tpu-compile.md).
  The chunks are then compressed in one call, never in groups: a training batch is its
  microbatch's rows (`train.microbatches` bounds it), and a loop level over the weights would
  add a float32 gradient accumulator of the parameters' size to the step.
  """
  n, c = tokens.shape
  g = compressor.chunks_per_group
  skip = not for_gradients
  shards = logical_shards("chunks", n)
  per_device = n // shards
  if for_gradients or not g or per_device <= g:
    return _run_windows(params, config, compressor, tokens, token_mask, raw_hidden=False,
                        skip_last=skip)[0]
  groups = -(-per_device // g)

  def grouped(x):  # [N, C] -> [groups, shards * g, C]: each device's chunks stay on it
    x = jnp.pad(x.reshape(shards, per_device, c), ((0, 0), (0, groups * g - per_device), (0, 0)))
    return jnp.moveaxis(x.reshape(shards, groups, g, c), 1, 0).reshape(groups, shards * g, c)
  per_group = jax.lax.map(
      lambda xs: _run_windows(params, config, compressor, *xs, raw_hidden=False,
                              skip_last=skip)[0],
      (grouped(tokens), grouped(token_mask.astype(bool))))
  # k, v: [groups, L, shards * g, S, K, D]; slot_mask: [groups, shards * g, S]

  def merge(x, chunk_axis):  # [groups, ..., shards * g, ...] -> [..., N, ...]
    rest = x.shape[chunk_axis + 2:]
    x = x.reshape(x.shape[:chunk_axis + 1] + (shards, g) + rest)
    x = jnp.moveaxis(x, 0, chunk_axis + 1)  # [..., shards, groups, g, ...]
    x = x.reshape(x.shape[:chunk_axis] + (shards, groups * g) + rest)
    x = jax.lax.slice_in_dim(x, 0, per_device, axis=chunk_axis + 1)
    return x.reshape(x.shape[:chunk_axis] + (n,) + rest)
  return ChunkMemory(k=merge(per_group.k, 1), v=merge(per_group.v, 1),
                     slot_mask=merge(per_group.slot_mask, 0))


def compressor_hidden(params, config: ModelConfig, compressor: CompressorConfig, tokens: Array,
                      token_mask: Array) -> Array:
  """Final hidden states [N, C, E] of the raw tokens as the compressor sees them, for the LM
  head (`qwen2.token_logprobs` scores them a chunk of tokens at a time).

  A raw token attends to its own window and only the *beacons* of earlier
  windows, so predicting the tokens after a window boundary trains the
  beacons to carry what came before (the pre-training objective, see
  docs/architecture.md#compressor-pre-training).
  """
  return _run_windows(params, config, compressor, tokens, token_mask, raw_hidden=True)[1]


