"""Context baselines on the same backbone and prompts (issue: evaluation): one prompt each.

* `full`: the whole context in one prompt, middle-truncated to a token budget.
* `rag`: the k chunks with the best BM25 score for the question, in document
  order, in one prompt.
"""

from __future__ import annotations

import abc
import collections
import math
from typing import Sequence

import jax
import numpy as np

from memrecall.data.example import TokenizedExample
from memrecall.method.prompts import pad_ids
from memrecall.method.reasoner import final_answer
from memrecall.method.recall import RecallSetup, RecallTrace, initial_memory
from memrecall.models.sampling import SampleOutput
from memrecall.readers.base import Reader, questions, register

Array = jax.Array


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
  """Indices of the k chunks (token-id bags) with the highest Okapi BM25 score, in document
  order.  Idf as Lucene's (never negative); a query term counts as often as it occurs, as in
  rank_bm25 and Lucene."""
  n = len(chunks)
  if n == 0:
    return []
  lengths = np.asarray([len(c) for c in chunks], float)
  average = max(lengths.mean(), 1.0)
  counts = [dict(zip(*np.unique(np.asarray(c, np.int64), return_counts=True))) if len(c) else {}
            for c in chunks]
  scores = np.zeros(n)
  for term, occurrences in collections.Counter(int(t) for t in query).items():
    df = sum(term in c for c in counts)
    if df == 0:
      continue
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    tf = np.asarray([c.get(term, 0) for c in counts], float)
    scores += occurrences * idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths / average))
  best = np.argsort(-scores, kind="stable")[:k]
  return sorted(int(i) for i in best)


class ContextReader(Reader):
  """The question answered from one prompt holding (part of) the raw context."""

  summary = "reads the context in one prompt"
  width: int  # context tokens of the prompt

  @abc.abstractmethod
  def context_of(self, example: TokenizedExample) -> list[int]:
    """The context tokens this baseline puts in the prompt."""

  def inputs(self, examples: Sequence[TokenizedExample], *, question_tokens: int,
             max_tokens: int) -> tuple:
    """([B, width] context ids, mask, question, mask); max_tokens is not needed."""
    del max_tokens
    context, context_mask = pad_ids([self.context_of(ex) for ex in examples], self.width)
    return (context, context_mask, *questions(examples, question_tokens))

  def call(self, params, inputs: tuple, rng):
    return answer_from_context, (params, self.setup, *inputs, rng)

  def answer(self, output) -> SampleOutput:
    return output

  def trace(self, output) -> RecallTrace | None:
    return None


@register("full")
class FullContext(ContextReader):
  """The whole context, middle-truncated to `baseline.full_budget` tokens."""

  @property
  def width(self) -> int:
    return self.baseline.full_budget

  def context_of(self, example):
    return middle_truncate(list(map(int, example.context)), self.baseline.full_budget)


@register("rag")
class RetrievedContext(ContextReader):
  """The `baseline.rag_topk` best BM25 chunks of `baseline.rag_chunk` tokens, in order."""

  @property
  def width(self) -> int:
    return self.baseline.rag_topk * self.baseline.rag_chunk

  def context_of(self, example):
    ids, size = list(map(int, example.context)), self.baseline.rag_chunk
    pieces = [ids[i:i + size] for i in range(0, len(ids), size)]
    best = bm25_top_chunks(pieces, example.question, self.baseline.rag_topk)
    return [t for i in best for t in pieces[i]]
