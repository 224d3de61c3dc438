"""Baselines on the same backbone and prompts machinery (DESIGN §6, issue: evaluation).

* `memagent`: MemAgent's loop — raw chunks, each rewritten into the working
  memory by a prompt that carries the section itself; no compressor, no gate.
* `full`: the whole context in one prompt, middle-truncated to a token budget.
* `rag`: the k chunks with the best BM25 score for the question, in document
  order, in one prompt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memrecall.method.reasoner import final_answer, no_prefix
from memrecall.method.recall import (RecallOutput, RecallSetup, finish_answer, initial_memory,
                                     scan_blocks)
from memrecall.models.sampling import SampleOutput

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
  memory, rng, per_block = scan_blocks(params, setup, memory, rng, blocks, question,
                                        question_mask, read.T)
  return finish_answer(params, setup, question, question_mask, memory, rng, per_block)


@jax.jit
def answer_from_context(params, setup: RecallSetup, context: Array, context_mask: Array,
                        question: Array, question_mask: Array, rng: Array) -> SampleOutput:
  """One answer from raw text [B, T] and the question (the `full` and `rag` baselines)."""
  memory = initial_memory(setup, question.shape[0])
  answer, _, _ = final_answer(params, setup.model, setup.prompts.context, setup.reasoner,
                              setup.sampling, question, question_mask, memory, rng, context,
                              context_mask)
  return answer


def middle_truncate(ids: Sequence[int], budget: int) -> list[int]:
  """Keeps the first and last budget/2 tokens (long-context evaluations' usual cut)."""
  ids = list(ids)
  if len(ids) <= budget:
    return ids
  head = budget // 2
  return ids[:head] + ids[len(ids) - (budget - head):]


def bm25_top_chunks(chunks: Sequence[Sequence[int]], query: Sequence[int], k: int,
                    k1: float = 1.5, b: float = 0.75) -> list[int]:
  """Indices of the k chunks (token-id bags) with the highest Okapi BM25 score, in document order."""
  n = len(chunks)
  if n == 0:
    return []
  lengths = np.asarray([len(c) for c in chunks], float)
  average = max(lengths.mean(), 1.0)
  counts = [dict(zip(*np.unique(np.asarray(c, np.int64), return_counts=True))) if len(c) else {}
            for c in chunks]
  scores = np.zeros(n)
  for term in set(int(t) for t in query):
    df = sum(term in c for c in counts)
    if df == 0:
      continue
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    tf = np.asarray([c.get(term, 0) for c in counts], float)
    scores += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths / average))
  best = np.argsort(-scores, kind="stable")[:k]
  return sorted(int(i) for i in best)
