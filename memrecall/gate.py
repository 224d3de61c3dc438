"""The Gate: is this compressed chunk worth a Reasoner pass, given the question and memory?

DESIGN §5: LoRA adapters on the shared backbone plus a scalar relevance head
on the last prompt token.  It reads the chunk's compressed slots exactly as
the Reasoner does (unrotated prefix, prompt positions from C/r), then a gate
prompt with the question and the *current* working memory.  One forward per
chunk, no decoding: the skipped Reasoner decodes are the saving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memrecall.config import ConfigError, ModelConfig
from memrecall.model import Qwen2, forward, last_valid
from memrecall.prompts import PromptTemplate
from memrecall.reasoner import WorkingMemory, prefix_cache

Array = jax.Array


def gate_logits(params, config: ModelConfig, template: PromptTemplate, k: Array, v: Array,
                slot_mask: Array, question: Array, question_mask: Array,
                memory: WorkingMemory) -> Array:
  """Relevance logits [B] (float32) of one chunk per row; k, v: [L, B, S, K, D]."""
  if not config.has_gate:
    raise ConfigError("this model has no gate parameters (set gate_lora_rank > 0)")
  prompt, prompt_mask = template.render(question, question_mask, memory.ids, memory.mask)
  cache = prefix_cache(config, k, v, slot_mask, prompt.shape[1])
  hidden, _ = forward(params, config, prompt, prompt_mask, cache, use_lora=True, return_hidden=True)
  return Qwen2(config).apply({"params": params}, last_valid(hidden, prompt_mask),
                             method=Qwen2.gate_logit)


def gate_probability(*args, **kwargs) -> Array:
  """sigmoid(gate_logits): the probability that the chunk is relevant, [B]."""
  return jax.nn.sigmoid(gate_logits(*args, **kwargs))
