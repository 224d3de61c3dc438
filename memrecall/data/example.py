"""The one example format every task and benchmark produces.

A context is a sequence of *segments* (a fact, a paragraph, a "Document i:"
block): text for real tokenizers, token ids for the small-vocabulary tasks.
Segments are tokenised one by one and concatenated, so which tokens — and
therefore which chunks — hold a supporting fact is known exactly for any
tokenizer and chunk size.  That gives the gate its labels and SFT its oracle
memory traces without re-deriving anything from text.  A cut between segments
is a cut for the tokenizer too, so the builders (ruler_hqa.py, synthetic.py)
cut where a byte-level BPE's pre-tokens break anyway.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence, Union

import numpy as np

Tokens = tuple[int, ...]
Piece = Union[str, Tokens]


@dataclasses.dataclass(frozen=True)
class Example:
  """One long-context question.

  id:             unique within its task and split.
  task:           the task's name.
  segments:       the context, in order (all str, or all token-id tuples).
  supporting:     indices of the segments holding the facts needed, in the order
                  a left-to-right reader meets them.
  question:       str or token ids.
  answers:        accepted answers (str or token ids); the first is canonical.
  oracle_memory:  the ideal working memory after each supporting segment
                  (same length as `supporting`); empty when a task has none.
  oracle_start:   the ideal memory after a chunk read before any supporting
                  segment (e.g. the question's starting point); empty = keep the
                  reader's initial memory.
  metadata:       JSON-able extras (hops, seed, lengths, ...).
  """
  id: str
  task: str
  segments: tuple[Piece, ...]
  supporting: tuple[int, ...]
  question: Piece
  answers: tuple[Piece, ...]
  oracle_memory: tuple[Piece, ...] = ()
  oracle_start: Piece = ()
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    if not self.segments:
      raise ValueError(f"example {self.id}: no segments")
    if any(not 0 <= i < len(self.segments) for i in self.supporting):
      raise ValueError(f"example {self.id}: supporting index out of range")
    if self.oracle_memory and len(self.oracle_memory) != len(self.supporting):
      raise ValueError(f"example {self.id}: {len(self.oracle_memory)} oracle memories for "
                       f"{len(self.supporting)} supporting segments")
    if not self.answers:
      raise ValueError(f"example {self.id}: no answers")

  @property
  def is_tokenized(self) -> bool:
    return not isinstance(self.segments[0], str)

  @property
  def context(self) -> str:
    if self.is_tokenized:
      raise TypeError("a pre-tokenised example has no text context")
    return "".join(self.segments)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":"))

  @classmethod
  def from_json(cls, text: str | bytes) -> "Example":
    values = json.loads(text)
    def piece(p):
      return p if isinstance(p, str) else tuple(p)
    return cls(id=values["id"], task=values["task"],
               segments=tuple(piece(s) for s in values["segments"]),
               supporting=tuple(values["supporting"]), question=piece(values["question"]),
               answers=tuple(piece(a) for a in values["answers"]),
               oracle_memory=tuple(piece(m) for m in values["oracle_memory"]),
               oracle_start=piece(values.get("oracle_start", ())),
               metadata=values.get("metadata", {}))


def encode(piece: Piece, tokenizer) -> Tokens:
  return tuple(piece) if not isinstance(piece, str) else tuple(tokenizer.encode(piece))


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
  """An Example in token ids, with the token span of every segment."""
  example: Example
  context: np.ndarray  # [T] int32
  spans: tuple[tuple[int, int], ...]  # [start, end) per segment
  question: Tokens
  answers: tuple[Tokens, ...]
  oracle_memory: tuple[Tokens, ...]
  oracle_start: Tokens = ()

  def chunk_labels(self, chunk_size: int) -> np.ndarray:
    """[ceil(T / C)] bool: chunk c holds (part of) a supporting segment."""
    n = -(-len(self.context) // chunk_size)
    labels = np.zeros((n,), bool)
    for index in self.example.supporting:
      start, end = self.spans[index]
      if end > start:
        labels[start // chunk_size:(end - 1) // chunk_size + 1] = True
    return labels

  def oracle_trace(self, chunk_size: int, initial_memory: Tokens) -> list[Tokens]:
    """The ideal memory after every chunk: it changes in the chunk where a supporting
    segment ends (a fact is usable once fully read)."""
    n = -(-len(self.context) // chunk_size)
    memory, trace = (self.oracle_start or initial_memory), []
    changes: dict[int, int] = {}
    for k, i in enumerate(self.example.supporting):  # a chunk may end several facts: keep the last
      changes[(self.spans[i][1] - 1) // chunk_size] = k
    for c in range(n):
      if c in changes and self.oracle_memory:
        memory = self.oracle_memory[changes[c]]
      trace.append(memory)
    return trace


def tokenize(example: Example, tokenizer=None) -> TokenizedExample:
  """Tokenises segment by segment (a tokenizer is needed only for text examples)."""
  if not example.is_tokenized and tokenizer is None:
    raise ValueError(f"example {example.id} is text: a tokenizer is needed")
  pieces = [encode(s, tokenizer) for s in example.segments]
  spans, start = [], 0
  for p in pieces:
    spans.append((start, start + len(p)))
    start += len(p)
  context = np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=start)
  return TokenizedExample(example=example, context=context, spans=tuple(spans),
                          question=encode(example.question, tokenizer),
                          answers=tuple(encode(a, tokenizer) for a in example.answers),
                          oracle_memory=tuple(encode(m, tokenizer) for m in example.oracle_memory),
                          oracle_start=encode(example.oracle_start, tokenizer))


def total_tokens(segments: Sequence[Piece], tokenizer=None) -> int:
  return sum(len(encode(s, tokenizer)) for s in segments)
