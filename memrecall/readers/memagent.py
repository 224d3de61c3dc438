"""MemAgent's reader (the baseline, docs/architecture.md#readers): raw sections through
the recall loop.

Each section is rewritten into the working memory by a prompt that carries the
section itself (`prompts.memagent`); no compressor, no gate.  It trains like the
method (SFT, RL: `trajectory_logprobs`), on the run's chunks as sections.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from memrecall.data.example import TokenizedExample
from memrecall.method.reasoner import no_prefix
from memrecall.method.recall import (RecallOutput, RecallSetup, finish_answer, initial_memory,
                                     loop_keys, scan_blocks)
from memrecall.readers.base import Reader, chunked, questions, register
from memrecall.readers.trajectory import TurnBatch, score_trajectory

Array = jax.Array


@jax.jit
def memagent(params, setup: RecallSetup, chunk_ids: Array, chunk_mask: Array, question: Array,
             question_mask: Array, rng: Array) -> RecallOutput:
  """The MemAgent loop over raw chunks [B, N, S] (empty chunks are skipped)."""
  setup = dataclasses.replace(setup, recall=dataclasses.replace(setup.recall, mode="all"))
  b, n, _ = chunk_ids.shape
  k, v, slots = no_prefix(setup.model, b)
  blocks = (jnp.broadcast_to(k, (n,) + k.shape), jnp.broadcast_to(v, (n,) + v.shape),
            jnp.broadcast_to(slots, (n,) + slots.shape), jnp.moveaxis(chunk_mask.any(-1), 1, 0),
            jnp.moveaxis(chunk_ids, 1, 0), jnp.moveaxis(chunk_mask, 1, 0))
  memory = initial_memory(setup, b)
  read = jnp.ones((b, n), bool)  # every real chunk, no gate
  rng, answer_rng = loop_keys(rng, b)
  memory, per_block = scan_blocks(params, setup, memory, rng, blocks, question,
                                  question_mask, read.T)
  return finish_answer(params, setup, question, question_mask, memory, answer_rng, per_block)


@register("memagent")
class MemAgentReader(Reader):
  """Raw sections of `baseline.memagent_chunk` tokens, every one read."""

  summary = "reads raw chunks"
  trains = True
  stages = ("sft", "rl", "eval")

  def inputs(self, examples: Sequence[TokenizedExample], *, question_tokens: int,
             max_tokens: int) -> tuple:
    """([B, N, S] section ids, mask, question, mask), S = `baseline.memagent_chunk`."""
    s = self.baseline.memagent_chunk
    ids, mask = chunked(examples, s, -(-max_tokens // s), self.setup.model.pad_token_id)
    return (ids, mask, *questions(examples, question_tokens))

  def call(self, params, inputs: tuple, rng):
    return memagent, (params, self.setup, *inputs, rng)

  def update_shape(self, question_tokens: int) -> tuple[int, int]:
    prompt = self.setup.prompts.memagent.length(question_tokens, self.setup.memory_capacity,
                                                self.baseline.memagent_chunk)
    return prompt, 0

  def trajectory_logprobs(self, params, batch: TurnBatch, with_gate: bool = False,
                          temperature: float = 1.0):
    """Each block's raw tokens inside its update prompt (the {section} slot), no KV prefix."""
    if with_gate:
      raise ValueError("a raw-chunk (memagent) reader has no gate to train")
    config, prompts = self.setup.model, self.setup.prompts
    block_turn = lambda _, ids, mask: (prompts.memagent, no_prefix(config, ids.shape[0]),
                                       (ids, mask))  # no parameters of its own
    return score_trajectory(params, config, prompts, batch, block_turn,
                            temperature=temperature)
