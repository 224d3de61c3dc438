"""A jitted KV-cache sampler: prefill once, then a `lax.while_loop` of decode steps.

Buffers have fixed sizes (the cache holds prompt + `max_new_tokens` slots), the
cache is donated between the prefill and the loop, and every row stops on its
own end-of-sequence token.  The log-probability of each sampled token under the
distribution it was drawn from (at the sampling temperature) is recorded: a
policy-gradient update's ratio starts from it.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from memrecall.models.config import ModelConfig
from memrecall.models.qwen2 import KVCache, forward, head_logits, init_cache, last_valid

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each token.

  temperature: 0 means greedy (argmax); otherwise logits are divided by it.
  top_k: keep only the k most likely tokens (0 = no limit).
  top_p: keep the smallest set of tokens whose probability reaches p (1 = off).
  eos_ids: tokens that end a row; pad_id fills a row after it ended.

  The log-probs a sample records are under `logprob_temperature`: the distribution the token
  was drawn from before top-k/top-p truncation (the model's own when greedy), the one an RL
  loss can score again teacher-forced (`qwen2.token_logprobs(..., temperature=)`).
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.temperature == 0 and (self.top_k or self.top_p < 1.0):
      raise ValueError(f"top_k={self.top_k} / top_p={self.top_p} filter what a temperature above 0 "
                       "samples; at temperature 0 decoding is greedy: set a temperature")
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))

  @property
  def logprob_temperature(self) -> float:
    """Sampling draws from softmax(logits / t) with this t (greedy: the model's own
    distribution, t = 1).  A rollout's log-probs and its policy-gradient loss are both taken
    under it, or the update's ratio compares two different distributions."""
    return self.temperature if self.temperature > 0 else 1.0


@flax.struct.dataclass
class SampleOutput:
  """tokens/logprobs: [B, N]; after a row's EOS, tokens are pad and logprobs 0.  logprobs are
  under `SamplingConfig.logprob_temperature`.

  lengths: [B] tokens generated per row, the EOS included.
  done:    [B] whether the row emitted an EOS.
  """
  tokens: Array
  logprobs: Array
  lengths: Array
  done: Array


def _tempered(logits: Array, sampling: SamplingConfig) -> Array:
  t = sampling.logprob_temperature
  return logits if t == 1.0 else logits / t


def filter_logits(logits: Array, sampling: SamplingConfig) -> Array:
  """Applies temperature, top-k and top-p to float32 logits [B, V]."""
  logits = _tempered(logits, sampling)
  neg_inf = jnp.finfo(logits.dtype).min
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if sampling.top_p < 1.0:
    # By sorted position, as Hugging Face and vLLM cut: an ascending sort drops each token whose
    # mass with all below it is at most 1 - p, never the top one.  Of tokens tied at the cutoff
    # (common in logits from bfloat16), some go: the lower ids, which a stable sort puts lower.
    order = jnp.argsort(logits, axis=-1, stable=True)  # [B, V] ascending
    below = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1),
                       axis=-1)
    drop = (below <= 1.0 - sampling.top_p).at[:, -1].set(False)
    drop = jnp.put_along_axis(jnp.zeros_like(drop), order, drop, axis=-1, inplace=False)
    logits = jnp.where(drop, neg_inf, logits)
  return logits


def row_keys(rng: Array, batch: int) -> Array:
  """One random key per row, [B]: a single key is split `batch` ways, [B] keys pass as they are.

  Every sampled token of a row is drawn from its own key alone, never from one key over the
  batch, so a row draws the same sample whatever rows share its batch: an evaluation that
  resumes, runs on more processes or batches otherwise, and the recall loop's block sources
  and gated groups, all sample a row alike.
  """
  rng = jnp.asarray(rng)
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # a raw uint32 key (jax.random.PRNGKey)
  if rng.ndim == 0:
    return jax.random.split(rng, batch)
  if rng.shape != (batch,):
    raise ValueError(f"random keys: one key, or one per row ({batch}), got shape {rng.shape}")
  return rng


def fold_rows(keys: Array, data) -> Array:
  """`jax.random.fold_in` of each row's key [B] with `data` (one value, or one per row [B])."""
  data = jnp.broadcast_to(jnp.asarray(data, jnp.uint32), keys.shape)
  return jax.vmap(jax.random.fold_in)(keys, data)


def sample_token(logits: Array, keys: Array, sampling: SamplingConfig) -> Array:
  """One token per row from float32 logits [B, V] and the rows' keys [B] -> [B] int32."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(keys, filter_logits(logits, sampling)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def prefill(params, config: ModelConfig, cache: KVCache, tokens: Array,
            token_mask: Array) -> tuple[Array, KVCache]:
  """Writes a (padded) prompt [B, T] into the cache; returns each row's next-token logits [B, V]
  (the LM head on each row's last real token only: on a 512-token prompt of the mid shape the
  head over every row is 8% of the prefill's FLOPs)."""
  hidden, cache = forward(params, config, tokens, token_mask, cache, return_hidden=True)
  last = last_valid(hidden, token_mask)[:, None]  # [B, 1, E]
  return head_logits(params, config, last)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling"),
                   donate_argnames=("cache",))
def sample_loop(params, config: ModelConfig, cache: KVCache, next_logits: Array, rng: Array, *,
                max_new_tokens: int, sampling: SamplingConfig) -> tuple[SampleOutput, KVCache]:
  """Samples up to `max_new_tokens` per row, continuing from `next_logits` [B, V]; rng: one
  key, or one per row [B] (`row_keys`): step t draws from `fold_in(row key, t)`."""
  batch = next_logits.shape[0]
  keys = row_keys(rng, batch)
  eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, tokens, logprobs, done, cache, logits = state
    token = sample_token(logits, fold_rows(keys, step), sampling)
    token = jnp.where(done, sampling.pad_id, token)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(_tempered(logits, sampling)),
                                  token[:, None], axis=-1)[:, 0]
    tokens = tokens.at[:, step].set(token)
    logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
    # Rows that already ended write an invalid (masked) slot.
    logits, cache = forward(params, config, token[:, None], (~done)[:, None], cache)
    done = done | jnp.isin(token, eos)
    return step + 1, tokens, logprobs, done, cache, logits[:, 0]

  state = (jnp.zeros((), jnp.int32), jnp.full((batch, max_new_tokens), sampling.pad_id, jnp.int32),
           jnp.zeros((batch, max_new_tokens), jnp.float32), jnp.zeros((batch,), bool),
           cache, next_logits)
  _, tokens, logprobs, done, cache, _ = jax.lax.while_loop(cond, body, state)
  # A row's length counts every step before (and including) its EOS.
  step_of_eos = jnp.where(done, jnp.argmax(jnp.isin(tokens, eos), axis=-1) + 1, max_new_tokens)
  return SampleOutput(tokens=tokens, logprobs=logprobs, lengths=step_of_eos.astype(jnp.int32),
                      done=done), cache


def generate(params, config: ModelConfig, prompt: Array, prompt_mask: Array | None, rng: Array, *,
             max_new_tokens: int, sampling: SamplingConfig, cache_sharding=None) -> SampleOutput:
  """Prefill + sampling loop for a batch of prompts [B, T] (padding on either side)."""
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be a non-empty [batch, length] array, got shape {prompt.shape}")
  prompt_mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
  if not bool(jnp.all(prompt_mask.any(axis=-1))):
    raise ValueError("every prompt row needs at least one real token (its mask is all zero)")
  if not bool(jnp.all((prompt >= 0) & (prompt < config.vocab_size))):
    # An id past the table embeds as NaN (JAX's lookup), which a masked slot still spreads.
    raise ValueError(f"prompt ids must lie in [0, {config.vocab_size}) (the vocabulary), padding "
                     "included")
  cache = init_cache(config, prompt.shape[0], prompt.shape[1] + max_new_tokens)
  if cache_sharding is not None:
    cache = jax.device_put(cache, cache_sharding)
  next_logits, cache = prefill(params, config, cache, prompt, prompt_mask)
  output, _ = sample_loop(params, config, cache, next_logits, rng,
                          max_new_tokens=max_new_tokens, sampling=sampling)
  return output
