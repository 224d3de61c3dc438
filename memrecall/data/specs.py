"""Data sources by name: a config says `KIND:PATH[,PATH...]` and gets ExampleSources back.

  rows:/d/a.json,/d/b.jsonl           question rows (MemAgent's RL-data or evaluation layout)
  hotpotqa:/d/hotpot_train_v1.1.json  RULER-HQA-style examples built from any HotpotQA file
  ruler_hqa:/d/eval_50.json           MemAgent's published evaluation files
  text:/d/corpus.txt                  plain text (or JSONL `text` lines) cut into token windows
  synthetic:multihop                  a synthetic task (DataOptions.task)
  tfds:/data/ruler_hqa/docs50/1.2.0   a dataset prepared by tfds_builders, read without TF

Each path is one `NamedSource`, named for grouping evaluation results; training reads all of
a spec's files as one `ConcatSource`.  Only the `tfds` kind imports tensorflow_datasets (the
GPU image has none) and only parquet files need pyarrow.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
from typing import Sequence

import numpy as np

from memrecall.data import ruler_hqa, synthetic
from memrecall.data.example import Example
from memrecall.data.files import read_text, row_file_kind
from memrecall.data.ruler_hqa import DatasetError
from memrecall.data.sources import (ExampleSource, IndexedSource, ListSource, SyntheticSource,
                                    split_seed)
from memrecall.data.synthetic import TaskConfig
from memrecall.runtime import fingerprint

KINDS = ("rows", "hotpotqa", "ruler_hqa", "text", "synthetic", "tfds")
_FILE_KINDS = ("rows", "hotpotqa", "ruler_hqa", "text", "tfds")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  kind: str
  paths: tuple[str, ...]

  def __str__(self) -> str:
    return f"{self.kind}:{','.join(self.paths)}"


def parse_spec(spec: str) -> DataSpec:
  """'KIND:PATH[,PATH...]'. Errors (DatasetError) name the spec: a KIND not in KINDS (list the
  kinds), no colon, no path."""
  kind, colon, rest = spec.partition(":")
  kind = kind.strip()
  if not colon:
    raise DatasetError(f"data spec {spec!r}: expected KIND:PATH[,PATH...] with KIND one of "
                       f"{', '.join(KINDS)}")
  if kind not in KINDS:
    raise DatasetError(f"data spec {spec!r}: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
  paths = tuple(p.strip() for p in rest.split(","))
  if not any(paths):
    raise DatasetError(f"data spec {spec!r}: no path after '{kind}:'")
  if not all(paths):
    raise DatasetError(f"data spec {spec!r}: an empty path between commas")
  return DataSpec(kind, paths)


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """What a spec's paths do not say; each field is read by the kinds named."""
  num_docs: int = 200        # hotpotqa: documents per example (own paragraphs + random others)
  hotpotqa_dev: str = ""     # ruler_hqa: the dev file: labels, and resolves index-only contexts
  seed: int = 0              # hotpotqa: distractor draws (example i: default_rng([seed, i]))
  text_tokens: int = 4096    # text: tokens per example
  task: TaskConfig | None = None  # synthetic: the task (its name in the spec must match task.task)
  size: int = 1024           # synthetic: examples in the source
  split: str = "train"       # synthetic (seed via sources.split_seed(seed, split)) and tfds


# The DataOptions each kind reads to decide its rows (its file's content aside): they identify
# a source's rows beside the file, so a resumed evaluation never takes rows made with others.
ROW_OPTIONS = {"rows": (), "hotpotqa": ("num_docs", "seed"), "ruler_hqa": ("hotpotqa_dev",),
               "text": ("text_tokens",), "synthetic": ("task", "size", "seed", "split"),
               "tfds": ("split",)}
FILE_OPTIONS = ("hotpotqa_dev",)  # options that name a file: what counts is its content


def row_options(kind: str, options: DataOptions) -> dict:
  """{option: value} of the options that change the rows a source of `kind` yields."""
  values = {name: getattr(options, name) for name in ROW_OPTIONS[kind]}
  if kind == "hotpotqa" or (kind == "ruler_hqa" and options.hotpotqa_dev):
    values["layout"] = ruler_hqa.LAYOUT  # how labelled rows are built, not only from what
  if values.get("task") is not None:
    values["task"] = synthetic.task_key(values["task"])
  return values


@dataclasses.dataclass(frozen=True)
class NamedSource:
  name: str            # the file's basename (synthetic: the task); groups evaluation results
  path: str
  source: ExampleSource   # len() and [i] -> Example
  options: dict = dataclasses.field(default_factory=dict)  # its `row_options`

  def key(self) -> dict:
    """What identifies its rows, for reuse checks (evaluation rows, a training resume): the
    file's content and the options that change which rows it yields, a file option by its
    content."""
    options = {f"data.{name}": _content_hash(value) if name in FILE_OPTIONS and value else value
               for name, value in self.options.items()}
    return {"data": _content_hash(self.path), **options}


def _content_hash(path: str) -> str:
  """A data file's (or directory's) content hash; a synthetic or TFDS source's path is a name."""
  return fingerprint.file_hash(path) if os.path.exists(path) else fingerprint.value_hash(path)


def check_names(sources: Sequence[NamedSource]) -> None:
  """Evaluation groups rows by source name: two sources of one name (data files of one basename
  in different directories) would share rows, the second finding the first's done."""
  first: dict[str, str] = {}
  for named in sources:
    if named.name in first:
      what = ("is given twice" if first[named.name] == named.path else
              f"and {named.path} are both named {named.name}")
      raise DatasetError(f"data {first[named.name]} {what}: evaluation groups rows by file "
                         "name; give each file once, under a name of its own (copy or rename one)")
    first[named.name] = named.path


class ConcatSource(IndexedSource):
  """Several sources as one, in order (training reads all files of a spec)."""

  def __init__(self, sources: Sequence[ExampleSource]):
    self.sources = tuple(sources)
    self.starts = list(itertools.accumulate((len(s) for s in self.sources), initial=0))

  def __len__(self) -> int:
    return self.starts[-1]

  def _get(self, position: int) -> Example:
    k = bisect.bisect_right(self.starts, position) - 1  # past empty sources to the holder
    return self.sources[k][position - self.starts[k]]

  def __repr__(self) -> str:
    return f"ConcatSource({len(self.sources)} sources, {len(self)} examples)"


# --- the kinds ------------------------------------------------------------------


def _rows(path: str) -> ExampleSource:
  path, rows = ruler_hqa.read_question_rows(path)
  name = os.path.basename(path)
  return ListSource([
      Example(id=f"{name}/{i}", task="rows", segments=(row.context,), supporting=(),
              question=row.question, answers=row.answers,
              metadata={"row": i, **{k: row.extras[k] for k in ("num_docs", "index")
                                     if k in row.extras}, "source": name})
      for i, row in enumerate(rows)])


class HotpotQASource(IndexedSource):
  """RULER-HQA-style examples over a HotpotQA file, each built when read (the train file has
  90K questions): question i's own paragraphs plus random others from the file's pool, seeded
  by (seed, i) as `build_ruler_hqa`, whose construction (`HotpotPool.example`) it shares."""

  TASK = "hotpotqa"

  def __init__(self, path: str, num_docs: int, seed: int = 0):
    self.path, self.num_docs, self.seed = path, num_docs, seed
    self.pool = ruler_hqa.HotpotPool(ruler_hqa.load_hotpotqa(path), name=path)
    try:
      self.pool.check_num_docs(num_docs)
    except ValueError as e:
      raise DatasetError(f"{e} (data.num_docs, or eval.py's --num_docs)") from None

  def __len__(self) -> int:
    return len(self.pool.rows)

  def _get(self, position: int) -> Example:
    return self.pool.example(position, self.num_docs, self.seed, task=self.TASK,
                             source=os.path.basename(self.path))

  def __repr__(self) -> str:
    return f"HotpotQASource({self.path}, num_docs={self.num_docs}, seed={self.seed})"


def _text_documents(path: str) -> list[str]:
  """A .jsonl file's `text` fields, one document a line; any other file but rows is one
  document (a .json or .parquet file would train on its raw JSON or bytes)."""
  kind = row_file_kind(path)
  if kind in (".json", ".parquet"):
    raise DatasetError(f"{path}: text: data is plain text, or .jsonl with a 'text' field a line; "
                       f"a {kind} file holds rows (rows:, for question rows)")
  if kind != ".jsonl":
    return [read_text(path, "text file", DatasetError)]
  _, located = ruler_hqa.read_row_file(path)
  documents = []
  for where, item in located:
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
      raise DatasetError(f"{where}: expected an object with a string field 'text'")
    documents.append(item["text"])
  return documents


class TextSource(IndexedSource):
  """A corpus as pre-tokenised windows of `tokens` ids (the last may be shorter): documents
  are tokenised one by one and joined by the tokenizer's EOS, as language-model data."""

  def __init__(self, path: str, tokenizer, tokens: int):
    if tokens < 1:
      raise ValueError(f"text_tokens must be >= 1, got {tokens}")
    self.path, self.tokens, self.name = path, tokens, os.path.basename(path)
    eos = list(getattr(tokenizer, "eos_ids", ())[:1])
    pieces = []
    for document in _text_documents(path):
      ids = tokenizer.encode(document)
      if ids:  # an empty document adds no tokens and no second EOS
        pieces.extend(([np.asarray(eos, np.int32)] if pieces else []) + [np.asarray(ids, np.int32)])
    if not pieces:
      raise DatasetError(f"{path}: the corpus has no tokens")
    self.ids = np.concatenate(pieces)

  def __len__(self) -> int:
    return -(-len(self.ids) // self.tokens)

  def _get(self, position: int) -> Example:
    start = position * self.tokens
    window = tuple(int(t) for t in self.ids[start:start + self.tokens])
    return Example(id=f"{self.name}/{position}", task="text", segments=(window,), supporting=(),
                   question=(), answers=((),), metadata={"source": self.name, "offset": start})

  def __repr__(self) -> str:
    return f"TextSource({self.path}, {len(self.ids)} tokens, {len(self)} examples)"


def _tfds(path: str, split: str) -> tuple[str, ExampleSource]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from memrecall.data import tfds_builders  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading the TFDS dataset {path} needs tensorflow_datasets: "
                      "pip install 'memrecall[data]'") from None
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise DatasetError(f"{path} is not a prepared TFDS dataset: no dataset_info.json there (give "
                       "the version directory, e.g. <data_dir>/ruler_hqa/docs50/1.2.0)")
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise DatasetError(f"{path}: no split {split!r}; the dataset has "
                       f"{', '.join(sorted(builder.info.splits))}")
  config = builder.builder_config.name if builder.builder_config else ""
  name = "/".join(p for p in (builder.name, config, str(builder.version)) if p)
  return name, tfds_builders.tfds_source(builder, split)


def open_sources(spec: str | DataSpec, options: DataOptions = DataOptions(),
                 tokenizer=None) -> list[NamedSource]:
  """One NamedSource per path (synthetic: one). Missing files -> FileNotFoundError naming the
  file (all are checked before any is read)."""
  spec = parse_spec(spec) if isinstance(spec, str) else spec
  if spec.kind not in KINDS:
    raise DatasetError(f"data spec {spec}: unknown kind {spec.kind!r}; choose from "
                       f"{', '.join(KINDS)}")
  if spec.kind in _FILE_KINDS:
    for path in spec.paths:
      if not os.path.exists(path):
        raise FileNotFoundError(f"data spec {spec}: {path} does not exist")
  if spec.kind == "synthetic":
    return [_synthetic(spec, options, tokenizer)]
  if spec.kind == "text" and tokenizer is None:
    raise DatasetError(f"data spec {spec}: the text kind needs a tokenizer")
  dev = None
  if spec.kind == "ruler_hqa" and options.hotpotqa_dev:
    dev = ruler_hqa.load_hotpotqa(options.hotpotqa_dev)  # once for all eval files
  named = []
  for path in spec.paths:
    name = os.path.basename(path)
    if spec.kind == "rows":
      source = _rows(path)
    elif spec.kind == "hotpotqa":
      source = HotpotQASource(path, options.num_docs, options.seed)
    elif spec.kind == "ruler_hqa":
      source = ListSource(ruler_hqa.read_memagent_eval(path, dev))
    elif spec.kind == "text":
      source = TextSource(path, tokenizer, options.text_tokens)
    else:
      name, source = _tfds(path, options.split)
    named.append(NamedSource(name=name, path=path, source=source,
                             options=row_options(spec.kind, options)))
  return named


def _synthetic(spec: DataSpec, options: DataOptions, tokenizer) -> NamedSource:
  if options.task is None:
    raise DatasetError(
        f"data spec {spec}: synthetic rows are made by a run's synthetic task (its config's "
        "`task`), and this run has none (a HF checkpoint, or a run trained on data files): "
        "evaluate a workdir trained on the task (launch/eval.py --checkpoint), or name data "
        "files (rows:, hotpotqa:, ...)")
  if spec.paths != (options.task.task,):
    raise DatasetError(f"data spec {spec}: names task {','.join(spec.paths)!r} but the run's "
                       f"synthetic task is {options.task.task!r}")
  source = SyntheticSource(options.task, split_seed(options.seed, options.split), options.size,
                           tokenizer)
  return NamedSource(name=options.task.task, path=options.task.task, source=source,
                     options=row_options("synthetic", options))
