"""The Reader interface and its registry: every way a question reads a document, by name.

A reader is one answer to "how does a question read its document": the method
(compressed chunks, gated or not), MemAgent (raw sections through the same
loop), or a context baseline (one prompt).  Whoever runs questions — evaluation,
the RL rollout, the benchmark, the demo, launch/answer.py — resolves a name
with `get` and calls the same methods, so adding a way to read is one
registered class, and no caller branches on names:

    @readers.register("first_chunk")
    class FirstChunk(readers.Reader):
      ...
    reader = readers.get("first_chunk", setup, compressor)
    fn, args = reader.call(params, reader.inputs(examples, question_tokens=q, max_tokens=t), rng)

A reader prepares host inputs from tokenized examples (`inputs`: its own
chunking), gives the program that reads them and its arguments (`call`, so
timers and compilers see the jitted function itself; `read` runs it), and
reads the answer and the per-block trace off its output.  Readers that train
(`trains`) also score a trajectory's tokens (`trajectory_logprobs`): the RL
loss calls it, as a rollout calls `read`.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from typing import Any, Callable, ClassVar, Sequence

import jax
import numpy as np

from memrecall.data.example import TokenizedExample
from memrecall.method.compressor import CompressorConfig, chunk_documents
from memrecall.method.prompts import pad_ids
from memrecall.method.recall import RecallSetup, RecallTrace
from memrecall.models.sampling import SampleOutput
from memrecall.readers.trajectory import TurnBatch
from memrecall.runtime import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  """memagent_chunk: raw tokens per MemAgent section; full_budget: tokens the `full` baseline
  keeps (middle-truncated); rag_topk / rag_chunk: retrieved chunks and their size."""
  memagent_chunk: int = 32
  full_budget: int = 512
  rag_topk: int = 4
  rag_chunk: int = 32


class BatchError(ValueError):
  """Examples that do not fit the configured shapes."""


def describe(ex: TokenizedExample) -> str:
  """Where an example comes from, for errors: its file and row when it has them."""
  meta = ex.example.metadata
  if "source" in meta and "row" in meta:
    return f"{meta['source']} row {meta['row']} (example {ex.example.id})"
  return f"example {ex.example.id}"


def chunked(examples: Sequence[TokenizedExample], chunk_size: int, num_chunks: int,
            pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Examples' documents as [B, N, C] ids and mask; shorter documents get empty trailing chunks
  (`compressor.chunk_documents`).  A document over N chunks is a BatchError naming it."""
  try:
    return chunk_documents([ex.context for ex in examples], chunk_size, num_chunks, pad_id)
  except IndexError as e:
    ex, n = examples[e.args[0]], e.args[1]
    raise BatchError(f"{describe(ex)}: its {len(ex.context)} tokens make {n} chunks of "
                     f"{chunk_size}, over the budget of {num_chunks} (data.max_chunks; "
                     "--config.data.overlong=skip leaves such rows out, also on a resume)"
                     ) from None
  except ValueError as e:  # an empty document
    raise BatchError(str(e)) from None


def questions(examples: Sequence[TokenizedExample], question_tokens: int):
  """The examples' questions as [B, Q] ids and mask."""
  return pad_ids([ex.question for ex in examples], question_tokens)


def rows_on(mesh, *arrays) -> tuple:
  """Batch arrays ([B, ...]) with their rows split over the mesh's batch axes (`data`, `fsdp`),
  so each device runs its share of the questions; as they are without a mesh."""
  if mesh is None:
    return arrays
  return tuple(jax.device_put(x, sharding_lib.rows_sharding(np.shape(x), mesh)) for x in arrays)


class Reader(abc.ABC):
  """How a question reads its document; built by `get` from a run's static settings.

  setup: the model, prompts, budgets and sampling (and, for the method, the recall
  settings); compressor: the chunking and compression; baseline: the baselines' own cuts.
  """

  name: str = ""  # the name `get` built it under
  # What the class offers, read by callers instead of its name:
  summary: ClassVar[str] = ""  # what it reads, for errors and listings
  compressed: ClassVar[bool] = False  # reads the compressor's chunks (a compression phase)
  trains: ClassVar[bool] = False  # `trajectory_logprobs`: RL and SFT can train it
  has_gate: ClassVar[bool] = False  # its blocks have a gate to train and read through
  stages: ClassVar[tuple[str, ...]] = ("eval",)  # the run stages a run of this reader has
  gated: bool = False  # this reader's selection runs the gate on every block

  def __init__(self, setup: RecallSetup, compressor: CompressorConfig,
               baseline: BaselineConfig = BaselineConfig()):
    self.setup, self.compressor, self.baseline = setup, compressor, baseline

  @abc.abstractmethod
  def inputs(self, examples: Sequence[TokenizedExample], *, question_tokens: int,
             max_tokens: int) -> tuple:
    """Host arrays of a batch of examples, rows first (questions padded to `question_tokens`,
    documents cut for up to `max_tokens` tokens: one compiled shape across batches)."""

  @abc.abstractmethod
  def call(self, params, inputs: tuple, rng) -> tuple[Callable, tuple]:
    """(program, arguments): what `read` runs, `program(*arguments)`; timers and compiled-
    memory plans take them as they are."""

  def place(self, mesh, inputs: tuple) -> tuple:
    """`inputs` on `mesh` (rows over its batch axes); as they are without one."""
    return rows_on(mesh, *inputs)

  def read(self, params, inputs: tuple, rng):
    """The reader's output on `inputs` (see `answer`, `trace`)."""
    program, args = self.call(params, inputs, rng)
    return program(*args)

  def with_setup(self, setup: RecallSetup) -> "Reader":
    """This reader on another setup (e.g. the inference layout's model config)."""
    other = copy.copy(self)
    other.setup = setup
    return other

  def answer(self, output) -> SampleOutput:
    """The answer sampled in an output of `read`."""
    return output.answer

  def trace(self, output) -> RecallTrace | None:
    """The per-block trace of an output of `read` (None: a reader with no blocks)."""
    return output.trace

  def block_labels(self, example: TokenizedExample) -> np.ndarray | None:
    """Relevance of each block the trace covers ([N] bool), when the blocks are the chunks
    the example's labels describe (gate recall, skip rate, detailed traces); else None."""
    del example
    return None

  def update_shape(self, question_tokens: int) -> tuple[int, int]:
    """(prompt tokens, KV prefix slots) of one block's memory update: what a cost model
    (`benchmark.mode_floor`) charges per block read."""
    raise NotImplementedError(f"the {self.name} reader has no per-block memory updates")

  def trajectory_logprobs(self, params, batch: TurnBatch, with_gate: bool = False,
                          temperature: float = 1.0):
    """Teacher-forced per-token log-probs and entropies of every turn of `batch`: blocks
    [B, N, M] and answer [B, A] (with_gate: and the gate's logit per block [B, N]), under
    `temperature` (`sampling.logprob_temperature` of the rollout that wrote the turns)."""
    raise NotImplementedError(f"the {self.name} reader does not train")


# --- the registry ------------------------------------------------------------------

_REGISTRY: dict[str, tuple[type[Reader], dict[str, Any]]] = {}


class UnknownReaderError(ValueError):
  """A reader name nobody registered."""


def register(name: str, **preset) -> Callable[[type[Reader]], type[Reader]]:
  """Class decorator: `cls` is the reader called `name`, built with `preset` options (one class
  may be registered under several names, e.g. each mode of the method)."""
  def add(cls: type[Reader]) -> type[Reader]:
    if name in _REGISTRY and _REGISTRY[name][0].__qualname__ != cls.__qualname__:
      raise ValueError(f"a reader named {name!r} is already registered "
                       f"({_REGISTRY[name][0].__qualname__})")
    _REGISTRY[name] = (cls, dict(preset))
    return cls
  return add


def unregister(name: str) -> None:
  """Forgets a name (tests that register their own readers clean up with it)."""
  _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
  """Every registered name, in registration order."""
  return tuple(_REGISTRY)


def check(names_: Sequence[str], what: str = "reader") -> None:
  """Raises UnknownReaderError naming every unknown name and the registered ones."""
  unknown = [n for n in names_ if n not in _REGISTRY]
  if unknown:
    raise UnknownReaderError(f"unknown {what}{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; registered: {', '.join(names())}")


def reader_class(name: str) -> type[Reader]:
  """The class registered as `name` (its capabilities, without building it)."""
  check([name])
  return _REGISTRY[name][0]


def get(name: str, setup: RecallSetup, compressor: CompressorConfig,
        baseline: BaselineConfig = BaselineConfig(), **options) -> Reader:
  """The reader registered as `name`, built on these settings; options override its preset."""
  check([name])
  cls, preset = _REGISTRY[name]
  reader = cls(setup, compressor, baseline, **{**preset, **options})
  reader.name = name
  return reader
