"""The Reasoner: rewrite a text working memory from one compressed chunk, then answer.

Memory update (docs/architecture.md#memory-update): the KV cache starts with
the chunk's C/r compressed slots, stored as they come from the compressor —
*unrotated*, i.e. at RoPE position 0 — with invalid slots masked; the chat
prompt follows at positions C/r, C/r + 1, ...; at most M tokens are generated
and, without pad and EOS, become the new memory (overwritten, never appended).
The final answer is an ordinary generation from a prompt with the question and
the memory only.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from memrecall.method.prompts import PromptTemplate
from memrecall.models.config import ModelConfig
from memrecall.models.qwen2 import KVCache, cache_layout, concat_slots, slots_to_cache
from memrecall.models.sampling import SampleOutput, SamplingConfig, prefill, sample_loop

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ReasonerConfig:
  """memory_size: M, the most tokens one update writes (and keeps).
  answer_tokens: the most tokens of the final answer.
  """
  memory_size: int = 1024
  answer_tokens: int = 256

  def __post_init__(self):
    if self.memory_size <= 0 or self.answer_tokens <= 0:
      raise ValueError(f"memory_size and answer_tokens must be positive, got {self}")


@flax.struct.dataclass
class WorkingMemory:
  """ids/mask [B, capacity]: real tokens where mask is set (holes allowed)."""
  ids: Array
  mask: Array

  @classmethod
  def initial(cls, initial_ids: tuple[int, ...], batch: int, capacity: int) -> "WorkingMemory":
    if len(initial_ids) > capacity:
      raise ValueError(f"the initial memory ({len(initial_ids)} ids) exceeds its capacity {capacity}")
    pad = capacity - len(initial_ids)
    ids = jnp.asarray(list(initial_ids) + [0] * pad, jnp.int32)
    mask = jnp.asarray([True] * len(initial_ids) + [False] * pad)
    return cls(jnp.broadcast_to(ids, (batch, capacity)), jnp.broadcast_to(mask, (batch, capacity)))


def memory_capacity(initial_ids: tuple[int, ...], reasoner: ReasonerConfig) -> int:
  return max(reasoner.memory_size, len(initial_ids))


def prefix_cache(config: ModelConfig, k: Array, v: Array, slot_mask: Array, room: int) -> KVCache:
  """A KV cache holding compressed slots k/v [L, B, S, K, D] unrotated, plus `room` free slots."""
  layers, batch, slots, heads, dim = k.shape
  free = lambda: cache_layout(config, jnp.zeros((layers, batch, heads, room, dim), config.jnp_dtype))
  return KVCache(
      k=concat_slots([slots_to_cache(config, k), free()]),
      v=concat_slots([slots_to_cache(config, v), free()]),
      key_mask=jnp.concatenate([slot_mask.astype(bool), jnp.zeros((batch, room), bool)], axis=1),
      index=jnp.asarray(slots, jnp.int32),
      next_position=jnp.full((batch,), slots, jnp.int32))


def _strip(tokens: Array, sampling: SamplingConfig) -> Array:
  """Mask of generated tokens that are neither pad nor EOS."""
  eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)
  return (tokens != sampling.pad_id) & ~jnp.isin(tokens, eos)


def update_memory(params, config: ModelConfig, template: PromptTemplate, reasoner: ReasonerConfig,
                  sampling: SamplingConfig, k: Array, v: Array, slot_mask: Array,
                  question: Array, question_mask: Array, memory: WorkingMemory, rng: Array,
                  section: Array | None = None, section_mask: Array | None = None
                  ) -> tuple[WorkingMemory, SampleOutput, Array, Array]:
  """One memory-update step; returns the new memory, the sample and the prompt ids/mask.

  k, v: [L, B, S, K, D] compressed slots of the chunk each row reads (S = 0 for
  the MemAgent baseline, whose template carries the raw `section` [B, T] instead);
  slot_mask: [B, S]; question/question_mask: [B, Q].
  """
  prompt, prompt_mask = template.render(question, question_mask, memory.ids, memory.mask,
                                        section, section_mask)
  cache = prefix_cache(config, k, v, slot_mask, prompt.shape[1] + reasoner.memory_size)
  next_logits, cache = prefill(params, config, cache, prompt, prompt_mask)
  sample, _ = sample_loop(params, config, cache, next_logits, rng,
                          max_new_tokens=reasoner.memory_size, sampling=sampling)
  keep = _strip(sample.tokens, sampling)
  capacity = memory.ids.shape[1]
  ids = jnp.pad(sample.tokens, ((0, 0), (0, capacity - reasoner.memory_size)))
  mask = jnp.pad(keep, ((0, 0), (0, capacity - reasoner.memory_size)))
  return WorkingMemory(ids, mask), sample, prompt, prompt_mask


def no_prefix(config: ModelConfig, batch: int) -> tuple[Array, Array, Array]:
  """Empty compressed slots: k, v [L, B, 0, K, D] and slot_mask [B, 0]."""
  empty = jnp.zeros((config.num_layers, batch, 0, config.num_kv_heads, config.head_dim),
                    config.jnp_dtype)
  return empty, empty, jnp.zeros((batch, 0), bool)


def final_answer(params, config: ModelConfig, template: PromptTemplate, reasoner: ReasonerConfig,
                 sampling: SamplingConfig, question: Array, question_mask: Array,
                 memory: WorkingMemory, rng: Array, section: Array | None = None,
                 section_mask: Array | None = None) -> tuple[SampleOutput, Array, Array]:
  """The answer from the question and the memory alone (no KV prefix, positions from 0);
  templates with a `{section}` slot (the full-context and RAG baselines) also get raw text."""
  prompt, prompt_mask = template.render(question, question_mask, memory.ids, memory.mask,
                                        section, section_mask)
  cache = prefix_cache(config, *no_prefix(config, prompt.shape[0]),
                       prompt.shape[1] + reasoner.answer_tokens)
  next_logits, cache = prefill(params, config, cache, prompt, prompt_mask)
  sample, _ = sample_loop(params, config, cache, next_logits, rng,
                          max_new_tokens=reasoner.answer_tokens, sampling=sampling)
  return sample, prompt, prompt_mask
