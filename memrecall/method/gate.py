"""The Gate: is this compressed chunk worth a Reasoner pass, given the question and memory?

LoRA adapters on the shared backbone plus a scalar relevance head
(docs/architecture.md#gate).  The gate prompt (question and *current* working
memory) is run once per memory state, at positions from C/r as in the
Reasoner; its last token — the scoring token — then reads that prompt and the
chunk's compressed slots (unrotated) and the head turns its hidden state into
a logit.  Since only the scoring token sees the chunk, one prompt serves every
chunk scored against the same memory: a chunk costs one token's forward, not a
whole prompt's.  No decoding: the skipped Reasoner decodes are the saving.
"""

from __future__ import annotations

import warnings

import flax.struct
import jax
import jax.numpy as jnp

from memrecall.method.prompts import PromptTemplate
from memrecall.method.reasoner import WorkingMemory
from memrecall.models.config import ConfigError, ModelConfig
from memrecall.models.qwen2 import (KVCache, Qwen2, cache_layout, concat_slots, forward, init_cache,
                                    slots_to_cache)

Array = jax.Array


@flax.struct.dataclass
class GateContext:
  """The gate prompt without its scoring token, run once per memory state.

  k, v: the prompt's rotated keys/values in `KVCache`'s layout; key_mask: [B, P];
  scoring_token: [B, 1]; scoring_position: [B], its RoPE position.
  """
  k: Array
  v: Array
  key_mask: Array
  scoring_token: Array
  scoring_position: Array


def gate_context(params, config: ModelConfig, template: PromptTemplate, question: Array,
                 question_mask: Array, memory: WorkingMemory, slots: int) -> GateContext:
  """Runs the gate prompt (with the adapters) at positions from `slots` (C/r) on.  Templates
  end with literal text (PromptTemplate.build), so the last column is the scoring token."""
  if not config.has_gate:
    raise ConfigError("this model has no gate parameters (set gate_lora_rank > 0)")
  prompt, prompt_mask = template.render(question, question_mask, memory.ids, memory.mask)
  batch, length = prompt.shape
  cache = init_cache(config, batch, length - 1)
  cache = cache.replace(next_position=jnp.full((batch,), slots, jnp.int32))
  _, cache = forward(params, config, prompt[:, :-1], prompt_mask[:, :-1], cache, use_lora=True,
                     return_hidden=True)
  return GateContext(cache.k, cache.v, cache.key_mask, prompt[:, -1:], cache.next_position)


def score_chunks(params, config: ModelConfig, context: GateContext, k: Array, v: Array,
                 slot_mask: Array) -> Array:
  """Relevance logits [R*B] (float32) of R*B chunks (k, v [L, R*B, S, K, D]), row i's against
  the context's row i // R: R chunks of a row scored at once against its one prompt, which
  is read once for all R (`forward`'s shared_prefix), not copied per chunk."""
  layers, rows, slots, heads, dim = k.shape
  per_prompt = rows // context.key_mask.shape[0]
  room = lambda: cache_layout(config, jnp.zeros((layers, rows, heads, 1, dim), config.jnp_dtype))
  cache = KVCache(  # [chunk slots (unrotated) | scoring token], after the shared prompt
      k=concat_slots([slots_to_cache(config, k), room()]),
      v=concat_slots([slots_to_cache(config, v), room()]),
      key_mask=jnp.concatenate([slot_mask.astype(bool), jnp.zeros((rows, 1), bool)], axis=1),
      index=jnp.asarray(slots, jnp.int32),
      next_position=jnp.repeat(context.scoring_position, per_prompt))
  hidden, _ = forward(params, config, jnp.repeat(context.scoring_token, per_prompt, axis=0),
                      jnp.ones((rows, 1), bool), cache, use_lora=True, return_hidden=True,
                      shared_prefix=(context.k, context.v, context.key_mask))
  return Qwen2(config).apply({"params": params}, hidden[:, 0], method=Qwen2.gate_logit)


def gate_logits(params, config: ModelConfig, template: PromptTemplate, k: Array, v: Array,
                slot_mask: Array, question: Array, question_mask: Array,
                memory: WorkingMemory) -> Array:
  """Relevance logits [B] (float32) of one chunk per row; k, v: [L, B, S, K, D]."""
  context = gate_context(params, config, template, question, question_mask, memory, k.shape[2])
  return score_chunks(params, config, context, k, v, slot_mask)


def gate_probability(*args, **kwargs) -> Array:
  """sigmoid(gate_logits): the probability that the chunk is relevant, [B]."""
  return jax.nn.sigmoid(gate_logits(*args, **kwargs))


# The modes whose reads follow the gate's scores (gate: above a threshold; topk: the k best).
GATE_SCORED_MODES = ("gate", "topk")


def warn_if_untrained(params, modes) -> bool:
  """Warns (and returns True) when a mode of `modes` reads by the gate's scores and the relevance
  head is all zeros (a HF checkpoint without `similarity_head`, a workdir no gate stage
  trained): every chunk then scores sigmoid(bias), 0.5 with the default bias, so gate mode
  reads every chunk or none and topk the first k.  Not an error: a study of the threshold may
  want it."""
  scored = [m for m in modes if m in GATE_SCORED_MODES]
  head = params.get("gate_head") if scored else None
  if head is None or bool((head != 0).any()):
    return False
  warnings.warn(f"mode(s) {','.join(scored)}: the gate's relevance head is all zeros "
                "(untrained), so every chunk scores the same: train the gate (the `gate` stage) "
                "for its decisions to mean anything", stacklevel=2)
  return True
