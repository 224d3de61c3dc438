"""Random-access example sources: the plain-Python data path.

Training and evaluation read examples through `ExampleSource` (`len` and
`source[i] -> Example`), whoever made them: the synthetic generator directly,
a list, or a TFDS array_record dataset (`tfds_builders.tfds_source`).  This
module imports nothing beyond memrecall and numpy, because the target GPU
image has no tensorflow_datasets (docs/architecture.md#data-without-tensorflow).

Split seeds: a synthetic split is `make_example(task, split_seed(base, split), i)`
for i in [0, size).  `split_seed` maps (base seed, split) one-to-one onto
seeds, `len(SPLITS) * base + SPLITS[split]`, so no two splits of any base seeds
share a (seed, index) pair, hence an RNG stream: train, validation and test
never hold the same generated example (barring a chance collision of content,
negligible beyond toy lengths), and growing a split never changes another.

Host shards are strided: host p of P gets indices p, p + P, p + 2P, ...  Every
host's k-th example is global example k * P + p, so the first steps of all
hosts together read the start of the split, as one host would, and shard sizes
differ by at most one.
"""

from __future__ import annotations

import abc
import operator
from typing import Iterator, Mapping, Protocol, Sequence, runtime_checkable

from memrecall.data.example import Example
from memrecall.data.synthetic import TaskConfig, make_example

SPLITS: Mapping[str, int] = {"train": 0, "validation": 1, "test": 2}


@runtime_checkable
class ExampleSource(Protocol):
  """A finite, random-access sequence of examples (index i is always the same example)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Example:
    ...


class IndexedSource(abc.ABC):
  """Checked indexing (negatives from the end) and iteration for a source that defines
  `__len__` and `_get(position)`."""

  @staticmethod
  def position(index: int, length: int, what: str) -> int:
    """`index` as a position in [0, length), negatives counting from the end."""
    try:
      index = operator.index(index)
    except TypeError:
      raise TypeError(f"{what} indices must be integers, got {type(index).__name__}") from None
    position = index + length if index < 0 else index
    if not 0 <= position < length:
      raise IndexError(f"index {index} out of range for {what} of {length} examples")
    return position

  def __getitem__(self, index: int) -> Example:
    return self._get(self.position(index, len(self), type(self).__name__))

  def __iter__(self) -> Iterator[Example]:
    for i in range(len(self)):
      yield self._get(i)

  @abc.abstractmethod
  def _get(self, position: int) -> Example:
    """The example at a valid, non-negative position."""


class SyntheticSource(IndexedSource):
  """Examples 0..size-1 of a synthetic task, generated on access (no storage needed).

  tokenizer: measures the text form's length, as in `make_example` (default: bytes).
  """

  def __init__(self, task: TaskConfig, seed: int, size: int, tokenizer=None):
    if size < 0:
      raise ValueError(f"size must be >= 0, got {size}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0 (numpy seeds are unsigned), got {seed}")
    self.task, self.seed, self.size, self.tokenizer = task, seed, size, tokenizer

  def __len__(self) -> int:
    return self.size

  def _get(self, position: int) -> Example:
    return make_example(self.task, self.seed, position, tokenizer=self.tokenizer)

  def __repr__(self) -> str:
    return f"SyntheticSource({self.task}, seed={self.seed}, size={self.size})"


def split_seed(base_seed: int, split: str) -> int:
  """The generator seed of `split` (see the module doc: distinct for every (base, split))."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose from {tuple(SPLITS)}")
  if base_seed < 0:
    raise ValueError(f"base_seed must be >= 0, got {base_seed}")
  return len(SPLITS) * base_seed + SPLITS[split]


def synthetic_splits(task: TaskConfig, sizes: Mapping[str, int], base_seed: int = 0,
                     tokenizer=None) -> dict[str, SyntheticSource]:
  """One SyntheticSource per split in `sizes`, seeded by `split_seed`."""
  return {split: SyntheticSource(task, split_seed(base_seed, split), size, tokenizer)
          for split, size in sizes.items()}


class ListSource(IndexedSource):
  """Examples held in memory (a benchmark file read once, a test's hand-made list)."""

  def __init__(self, examples: Sequence[Example]):
    self.examples = tuple(examples)
    bad = next((i for i, e in enumerate(self.examples) if not isinstance(e, Example)), None)
    if bad is not None:
      raise TypeError(f"ListSource item {bad} is a {type(self.examples[bad]).__name__}, "
                      "not an Example")

  def __len__(self) -> int:
    return len(self.examples)

  def _get(self, position: int) -> Example:
    return self.examples[position]

  def __repr__(self) -> str:
    return f"ListSource({len(self)} examples)"


class StridedView(IndexedSource):
  """Indices start, start + step, ... of a source (below `stop`); reads go straight through."""

  def __init__(self, source: ExampleSource, start: int, step: int, stop: int | None = None):
    stop = len(source) if stop is None else min(stop, len(source))
    if step < 1 or start < 0:
      raise ValueError(f"need start >= 0 and step >= 1, got start={start}, step={step}")
    self.source, self.start, self.step = source, start, step
    self.length = max(0, -(-(stop - start) // step))

  def __len__(self) -> int:
    return self.length

  def _get(self, position: int) -> Example:
    return self.source[self.start + position * self.step]

  def global_index(self, index: int) -> int:
    """The index in the underlying source of this view's example `index`."""
    return self.start + self.position(index, len(self), "StridedView") * self.step

  def __repr__(self) -> str:
    return f"StridedView({self.source!r}, start={self.start}, step={self.step}, len={len(self)})"


def shard_for_host(source: ExampleSource, process_index: int, process_count: int,
                   drop_remainder: bool = False) -> StridedView:
  """Host `process_index`'s strided share of `source` (module doc); shards are disjoint and
  cover the source.

  drop_remainder: give every host exactly len // process_count examples (the last
  len % process_count are read by none), for SPMD loops that need equal step counts.
  """
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
  stop = len(source) // process_count * process_count if drop_remainder else None
  return StridedView(source, process_index, process_count, stop)
