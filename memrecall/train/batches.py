"""Host-side assembly of training batches from tokenised examples (numpy, fixed shapes)."""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from memrecall.data.example import TokenizedExample, Tokens
# One chunking for training and reading (`readers.chunked`); re-exported for the stages.
from memrecall.readers import BatchError, chunked, describe  # noqa: F401
from memrecall.train.objectives import GateBatch, TurnBatch


# What each padded row is, and the setting that bounds it, for the errors of `_pad_rows`.
_MEMORY = "a memory (reasoner.memory_size's capacity)"
_UPDATE = "an oracle memory update (with EOS; reasoner.memory_size)"
_FINAL = "a final memory (reasoner.memory_size's capacity)"
_ANSWER = "an answer (with EOS; reasoner.answer_tokens)"


def _pad_rows(rows: Sequence[Sequence[int]], width: int, what: str,
              examples: Sequence[TokenizedExample] | None = None) -> tuple[np.ndarray, np.ndarray]:
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    if len(row) > width:
      where = f"{describe(examples[i])}: " if examples is not None else ""
      raise BatchError(f"{where}{what} of {len(row)} tokens exceeds its budget of {width}")
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return ids, mask


def recall_pretraining_chunks(ids: np.ndarray, mask: np.ndarray, ratio: int,
                              rngs: Sequence[np.random.Generator]
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Rows [B, H] -> [B, 2H]: the row, then its `ratio`-token units again in shuffled order.

  Predicting the repeat needs what the beacons of the first half kept, looked up by the
  unit's first tokens — the compressor's job in recall.  rngs: one generator per example,
  whose rows are consecutive (B / len(rngs) each), so an example's shuffles do not depend on
  which process builds it among which others.  Returns ids, mask and the target mask (the
  repeated half only) [B, 2H].  Each repeated unit's first token follows a unit drawn at
  random, a floor under the loss; it stays scored: unscored (tried 2026-12-07), the demo's early
  SFT never reached 20% by step 800 (at 450 scored) and the final SFT ended at 46.9%, not 100%
  (one run each).
  """
  b, h = ids.shape
  if h % ratio:
    raise BatchError(f"half-chunks of {h} tokens do not split into units of {ratio}")
  if not rngs or b % len(rngs):
    raise BatchError(f"{b} rows do not split evenly among {len(rngs)} examples")
  units = np.tile(np.arange(h // ratio), (b // len(rngs), 1))
  order = np.concatenate([rng.permuted(units, axis=1) for rng in rngs])[..., None]  # [B, U, 1]
  shuffle = lambda x: np.take_along_axis(x.reshape(b, h // ratio, ratio), order, 1).reshape(b, h)
  repeat_mask = shuffle(mask)
  return (np.concatenate([ids, shuffle(ids)], 1), np.concatenate([mask, repeat_mask], 1),
          np.concatenate([np.zeros_like(mask), repeat_mask], 1))


def sft_batch(examples: Sequence[TokenizedExample], *, chunk_size: int, num_chunks: int,
              question_tokens: int, memory_capacity: int, memory_size: int, answer_tokens: int,
              initial_memory: Tokens, eos_id: int, pad_id: int, oracle: bool = True) -> TurnBatch:
  """Teacher-forced turns from oracle traces: every block rewrites the memory (a block that
  holds no needed fact rewrites it unchanged), then the answer.

  oracle=False fills only chunks and questions (the rest stays empty): RL rollouts replace
  the turns, and rows of question-answer data have no trace and answers of any length."""
  chunk_ids, chunk_mask = chunked(examples, chunk_size, num_chunks, pad_id)
  b = len(examples)
  memory_ids = np.zeros((b, num_chunks, memory_capacity), np.int32)
  memory_mask = np.zeros((b, num_chunks, memory_capacity), bool)
  targets = np.zeros((b, num_chunks, memory_size), np.int32)
  target_mask = np.zeros((b, num_chunks, memory_size), bool)
  finals, answers = [], []
  labels = np.zeros((b, num_chunks), bool)
  for i, ex in enumerate(examples):
    example_labels = ex.chunk_labels(chunk_size)
    labels[i, :len(example_labels)] = example_labels
    if not oracle:
      finals.append(())
      answers.append(())
      continue
    trace = ex.oracle_trace(chunk_size, initial_memory)
    before = [initial_memory] + trace[:-1]
    for n in range(len(trace)):
      memory_ids[i, n], memory_mask[i, n] = _pad_rows([before[n]], memory_capacity, _MEMORY, [ex])
      targets[i, n], target_mask[i, n] = _pad_rows([tuple(trace[n]) + (eos_id,)], memory_size,
                                                   _UPDATE, [ex])
    finals.append(trace[-1])
    answers.append(tuple(ex.answers[0]) + (eos_id,))
  question, question_mask = _pad_rows([ex.question for ex in examples], question_tokens,
                                       "a question (reasoner.question_tokens)", examples)
  final_ids, final_mask = _pad_rows(finals, memory_capacity, _FINAL)
  answer, answer_mask = _pad_rows(answers, answer_tokens, _ANSWER, examples)
  return TurnBatch(chunk_ids=chunk_ids, chunk_mask=chunk_mask, question=question,
                   question_mask=question_mask, memory_ids=memory_ids, memory_mask=memory_mask,
                   targets=targets, target_mask=target_mask, final_memory_ids=final_ids,
                   final_memory_mask=final_mask, answer=answer, answer_mask=answer_mask,
                   labels=labels)


def gate_batch(examples: Sequence[TokenizedExample], *, chunk_size: int, num_chunks: int,
               question_tokens: int, memory_capacity: int, initial_memory: Tokens,
               pad_id: int) -> GateBatch:
  """Per-block relevance labels, the gate reading before each block one of the two memories a
  gate-mode reader can hold there, by the row's id's hash: half the rows that of a reader that
  follows the labels (the initial memory until the first relevant block, then the oracle memory
  of the last relevant one), half the oracle trace's, which assumes every earlier block read
  (the question's start written in at the first irrelevant block: a gate that read one).
  Trained on the trace's alone, a precise gate read irrelevant blocks at length (it had never
  seen the initial memory there); on the other alone, a less precise one lost relevant blocks
  (docs/2026-12-08-gate-and-walk-review.md)."""
  chunk_ids, chunk_mask = chunked(examples, chunk_size, num_chunks, pad_id)
  b = len(examples)
  memory_ids = np.zeros((b, num_chunks, memory_capacity), np.int32)
  memory_mask = np.zeros((b, num_chunks, memory_capacity), bool)
  labels = np.zeros((b, num_chunks), bool)
  for i, ex in enumerate(examples):
    trace = ex.oracle_trace(chunk_size, initial_memory)
    example_labels = ex.chunk_labels(chunk_size)
    skipped = zlib.crc32(ex.example.id.encode()) % 2 == 0
    memory = initial_memory
    for n in range(len(trace)):
      before = memory if skipped else ([initial_memory] + trace)[n]
      memory_ids[i, n], memory_mask[i, n] = _pad_rows([before], memory_capacity, _MEMORY, [ex])
      if example_labels[n]:
        memory = trace[n]
    labels[i, :len(example_labels)] = example_labels
  question, question_mask = _pad_rows([ex.question for ex in examples], question_tokens,
                                       "a question (reasoner.question_tokens)", examples)
  return GateBatch(chunk_ids=chunk_ids, chunk_mask=chunk_mask, question=question,
                   question_mask=question_mask, memory_ids=memory_ids, memory_mask=memory_mask,
                   labels=labels, valid=chunk_mask.any(-1))
