"""RULER-HQA: HotpotQA-dev questions buried among other dev paragraphs (MemAgent's construction).

MemAgent (github.com/BytedTsinghua-SIA/MemAgent, taskutils/memory_data/) builds it so:

* `read_hotpotqa`: every dev paragraph becomes the document `title + "\n" +
  "".join(sentences)` (HotpotQA sentences carry their own leading spaces); the
  pool is the sorted set of these texts over the whole dev file, so a paragraph
  shared by several questions appears once.
* `generate_input_output` (different_docs_eval.py): a question keeps its own
  10 paragraphs, draws `num_docs - 10` other pool documents at random, shuffles
  them, and shows them as "Document {i}:\n{document}" blocks (i from 1) joined
  by blank lines.  Above 10000 documents the published files store pool indices
  instead of text (`generate_index_only`), resolved again at evaluation time.
* Questions: the first 200 dev questions, minus those Qwen2.5-7B (base or
  instruct, two samples each) answers correctly without any context
  (filter.py, filter2.py), the first 128 kept.  That filter needs those models,
  so `build_ruler_hqa` takes the first `num_questions` rows, or exactly the
  published set through `indices=memagent_indices("eval_200.json")`.

We keep the layout and the text format exactly, the random draws of the other
documents aside.  MemAgent shuffles every question's list (its own paragraphs
first, then the others) with a fresh `random.Random(4)`, so the permutation
depends on `num_docs` alone and a question's own paragraphs land on the same
slots in every question (at 50 documents: 11, 18, 27, 29, 37, 41-44 and 48;
LycheeMemory's published rows agree): we shuffle the same way (`LAYOUT`).  The
others MemAgent samples with a process-global generator; we draw them from
(seed, the row's index), so a layout does not depend on which other questions
are built.  A paragraph a question lists twice is kept once (MemAgent keeps both).

Labels (ours; MemAgent has none): a question's gold paragraphs are cut after each
supporting sentence, so a supporting segment ends where its fact does (`_labelled`).

Question rows (MemAgent's RL data and eval files, LycheeMemory's examples) are
read by one parser, `parse_row`, for every reader: `read_rows`,
`read_memagent_eval`, specs.py's `rows` kind and `documents.read_document`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
from typing import Any, Sequence

import numpy as np

from memrecall.data.example import Example
from memrecall.data.files import ROW_FILES, read_text, row_file_kind

TASK = "ruler_hqa"
DOCUMENT_TEMPLATE = "Document {i}:\n{document}"
SEPARATOR = "\n\n"
PAPER_NUM_DOCS = (50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600)
# Where a question row keeps its question and answers, first match wins: MemAgent's RL data
# (`extra_info.question`, `reward_model.ground_truth`), its eval files (`input`, `answers`),
# then other common names; `prompt` is a chat whose last user turn is the question.
QUESTION_FIELDS = ("extra_info.question", "input", "question", "query", "prompt")
ANSWER_FIELDS = ("reward_model.ground_truth", "answers", "answer", "outputs")
MIN_DOCS = 10


class DatasetError(ValueError):
  """A dataset file (or a row in it) that cannot be used."""


@dataclasses.dataclass(frozen=True)
class HotpotRow:
  """One HotpotQA (distractor) question with its paragraphs and gold facts."""
  id: str
  question: str
  answer: str
  context: tuple[tuple[str, tuple[str, ...]], ...]  # (title, sentences)
  supporting_facts: tuple[tuple[str, int], ...]     # (title, sentence index)
  type: str
  level: str

  def documents(self) -> list[str]:
    """This question's paragraphs as MemAgent's document texts, duplicates dropped."""
    return list(dict.fromkeys(document_text(t, s) for t, s in self.context))


def document_text(title: str, sentences: Sequence[str]) -> str:
  return f"{title}\n{''.join(sentences)}"


def read_row_file(path: str | os.PathLike) -> tuple[str, list[tuple[str, Any]]]:
  """The rows of a .json list (or single object), .jsonl or .parquet file, each with where it
  came from ("FILE row i", plus "(line n)" for JSONL) so that every error names file and row."""
  path = os.fspath(path)
  kind = row_file_kind(path)
  if kind is None:
    raise DatasetError(f"{path}: a rows file is {', '.join(ROW_FILES)} (by its extension, in any "
                       "case); rename it or convert it")
  if kind == ".parquet":
    rows = _read_parquet(path)
    located = [(f"{path} row {i}", row) for i, row in enumerate(rows)]
  else:
    text = read_text(path, "dataset file", DatasetError)
    if not text.strip():
      raise DatasetError(f"{path} is empty")
    if kind == ".jsonl":
      located = []
      # Lines end at "\n" alone: str.splitlines also splits at U+2028, U+0085 and others,
      # which JSON strings may hold unescaped (MemAgent writes with ensure_ascii=False).
      for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
          located.append((f"{path} row {len(located)} (line {n})", _loads(path, line, n)))
    else:
      rows = _loads(path, text)
      if not isinstance(rows, (list, dict)):
        raise DatasetError(f"{path}: a .json rows file holds a list of rows or one row "
                           f"object, not {json.dumps(rows)[:40]}")
      located = [(f"{path} row {i}", row) for i, row in enumerate(rows if isinstance(rows, list)
                                                                 else [rows])]
  if not located:
    raise DatasetError(f"{path} holds no rows")
  return path, located


def _loads(path: str, text: str, line: int = 0) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: invalid JSON at line {line or e.lineno}: {e.msg}") from None


def _read_parquet(path: str) -> list[Any]:
  # pyarrow is optional: only parquet files need it.
  if not os.path.exists(path):
    raise FileNotFoundError(f"dataset file {path} does not exist")
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
  try:
    return pq.read_table(path).to_pylist()
  except Exception as e:  # pyarrow raises several types for a damaged file
    raise DatasetError(f"{path} is not a readable parquet file: {e}") from None


def _field(where: str, item: dict, key: str, kind: type | tuple[type, ...]) -> Any:
  if key not in item:
    raise DatasetError(f"{where}: missing field '{key}'")
  value = item[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise DatasetError(f"{where}: field '{key}' should be {names}, got {type(value).__name__}")
  return value


def _parse_hotpot(where: str, item: Any) -> HotpotRow:
  if not isinstance(item, dict):
    raise DatasetError(f"{where}: expected an object, got {type(item).__name__}")
  values = {k: _field(where, item, k, str) for k in ("_id", "question", "answer", "type", "level")}
  context = []
  for j, para in enumerate(_field(where, item, "context", list)):
    if not (isinstance(para, list) and len(para) == 2 and isinstance(para[0], str)
            and isinstance(para[1], list) and all(isinstance(s, str) for s in para[1])):
      raise DatasetError(f"{where}: context[{j}] should be [title, [sentences]]")
    context.append((para[0], tuple(para[1])))
  titles = {title for title, _ in context}
  facts = []
  for j, fact in enumerate(_field(where, item, "supporting_facts", list)):
    if not (isinstance(fact, list) and len(fact) == 2 and isinstance(fact[0], str)
            and isinstance(fact[1], int) and not isinstance(fact[1], bool) and fact[1] >= 0):
      raise DatasetError(f"{where}: supporting_facts[{j}] should be [title, sentence index]")
    if fact[0] not in titles:
      raise DatasetError(f"{where}: supporting title {fact[0]!r} is not among its paragraphs")
    facts.append((fact[0], fact[1]))
  if not facts:
    raise DatasetError(f"{where}: no supporting facts")
  return HotpotRow(id=values["_id"], question=values["question"], answer=values["answer"],
                   context=tuple(context), supporting_facts=tuple(facts), type=values["type"],
                   level=values["level"])


def load_hotpotqa(path: str | os.PathLike) -> list[HotpotRow]:
  """Reads a HotpotQA dev (distractor) JSON file, validating every row."""
  _, located = read_row_file(path)
  return [_parse_hotpot(where, item) for where, item in located]


def document_pool(rows: Sequence[HotpotRow]) -> list[str]:
  """Every distinct paragraph of `rows`, sorted (MemAgent's DOCS; eval indices point here)."""
  return sorted({d for row in rows for d in row.documents()})


def _segments(documents: Sequence[str]) -> tuple[str, ...]:
  """One "Document i:" block per document; the separator ends the block it follows."""
  last = len(documents) - 1
  return tuple(DOCUMENT_TEMPLATE.format(i=i + 1, document=d) + (SEPARATOR if i < last else "")
               for i, d in enumerate(documents))


def _split_blocks(where: str, context: str) -> list[str]:
  """Inverse of `_segments`: the document texts of a MemAgent context string."""
  head = DOCUMENT_TEMPLATE.format(i=1, document="")
  if not context.startswith(head):
    raise DatasetError(f"{where}: context does not start with {head!r}")
  documents, start, i = [], len(head), 1
  while True:
    marker = SEPARATOR + DOCUMENT_TEMPLATE.format(i=i + 1, document="")
    end = context.find(marker, start)
    if end < 0:
      documents.append(context[start:])
      return documents
    documents.append(context[start:end])
    start, i = end + len(marker), i + 1


def _labelled(where: str, documents: Sequence[str], row: HotpotRow, **kwargs) -> Example:
  """An Example whose supporting segments and oracle memory come from `row`'s gold facts.

  A gold paragraph's block is cut after each of its supporting sentences, so a supporting
  segment ends where its fact does: the oracle memory gains that fact in the chunk where the
  sentence is fully read, not where its paragraph ends (a paragraph straddling two chunks
  would otherwise write the fact one chunk late, where the reader no longer sees it), and the
  gate's labels cover the block from its head to its last supporting sentence.  Cuts fall
  between sentences, which carry their own leading spaces, and the block's separator stays
  with the text before it, so segment-by-segment tokenisation splits where a whole-text
  tokenizer's pre-tokens do for text that follows HotpotQA's spacing.
  """
  position = {d: i for i, d in reversed(list(enumerate(documents)))}
  paragraphs = {title: sentences for title, sentences in row.context}
  facts: dict[int, tuple[str, list[int]]] = {}  # block -> (title, its supporting sentences)
  for title in dict.fromkeys(t for t, _ in row.supporting_facts):
    block = position.get(document_text(title, paragraphs[title]))
    if block is None:
      raise DatasetError(f"{where}: gold paragraph {title!r} of HotpotQA {row.id} is missing")
    # A few HotpotQA facts point past their paragraph's end: they are dropped, and a block
    # left with none still counts as supporting as a whole.
    count = len(paragraphs[title])
    facts[block] = (title, sorted({k for t, k in row.supporting_facts if t == title and k < count}))
  segments, supporting, memory, lines = [], [], [], []
  for block, text in enumerate(_segments(documents)):
    if block not in facts:
      segments.append(text)
      continue
    title, indices = facts[block]
    sentences = paragraphs[title]
    head = len(DOCUMENT_TEMPLATE.format(i=block + 1, document="")) + len(title) + 1
    ends = [head + sum(len(s) for s in sentences[:k + 1]) for k in indices] or [len(text)]
    # Where only the separator (or blank sentences) follows, it stays with the fact before it.
    ends = [end if text[end:].strip() else len(text) for end in ends]
    start = 0
    for j, end in enumerate(ends):
      if indices:
        lines.append(f"{title}: {sentences[indices[j]].strip()}")
      if end > start:
        supporting.append(len(segments))
        segments.append(text[start:end])
        memory.append("\n".join(lines))
      else:  # an empty sentence ends with the one before it
        memory[-1] = "\n".join(lines)
      start = end
    if start < len(text):
      segments.append(text[start:])
  return Example(segments=tuple(segments), supporting=tuple(supporting), question=row.question,
                 answers=(row.answer,), oracle_memory=tuple(memory), **kwargs)


# How a labelled HotpotQA question is built, in the keys of what was built from it (the
# `hotpotqa` kind, and `ruler_hqa` with the dev rows): "memagent-slots" (2026-12-07), MemAgent's
# fixed permutation, where a uniform shuffle per row came before; then "memagent-slots/fact-cuts"
# (the same day), gold paragraphs cut after each supporting sentence (`_labelled`), which moves
# segment boundaries, labels and oracle memories.
LAYOUT = "memagent-slots/fact-cuts"


class HotpotPool:
  """A HotpotQA file's rows and the pool of their paragraphs, laying out one RULER-HQA
  question at a time: the one construction behind `build_ruler_hqa` and the `hotpotqa` data
  kind (specs.py), which builds a 90K-question train file's examples only when read.

  name: what errors call the rows (their file).
  """

  def __init__(self, rows: Sequence[HotpotRow], name: str = "HotpotQA"):
    self.rows, self.name = rows, name
    self.documents = document_pool(rows)
    self._ids = {d: i for i, d in enumerate(self.documents)}

  def check_num_docs(self, num_docs: int, need: int = MIN_DOCS, what: str = "") -> None:
    if not need <= num_docs <= len(self.documents):
      raise ValueError(f"num_docs={num_docs} must lie in [{need}, {len(self.documents)}]{what}: "
                       "each question keeps its own paragraphs and the pool of "
                       f"{self.name} has {len(self.documents)} distinct ones")

  def example(self, q: int, num_docs: int, seed: int = 0, task: str = TASK,
              **metadata: Any) -> Example:
    """Row q's paragraphs plus `num_docs - own` others from the pool, drawn by
    `default_rng([seed, q])` (so a layout never depends on which other questions are built),
    in MemAgent's order: own paragraphs first, then shuffled by `random.Random(4)`."""
    row = self.rows[q]
    own = np.array([self._ids[d] for d in row.documents()], np.int64)
    self.check_num_docs(num_docs, max(MIN_DOCS, len(own)), f" for {self.name} row {q}")
    rng = np.random.default_rng([seed, q])
    others = np.delete(np.arange(len(self.documents)), own)  # sorted, as setdiff1d
    order = np.concatenate([own, rng.choice(others, num_docs - len(own), replace=False)]).tolist()
    random.Random(4).shuffle(order)  # the same permutation for every row of num_docs documents
    return _labelled(
        f"{self.name} row {q}", [self.documents[i] for i in order], row,
        id=f"{row.id}/{num_docs}", task=task,
        metadata={"num_docs": num_docs, "hotpot_id": row.id, "type": row.type,
                  "level": row.level, "row": q, "seed": seed, **metadata})


def checked_indices(indices: Sequence[int], available: int, source: str = "indices") -> list[int]:
  """Question row numbers, refused unless distinct and in [0, available): a repeated row
  would count one question twice."""
  chosen = [int(i) for i in indices]
  repeated = sorted(i for i, count in collections.Counter(chosen).items() if count > 1)
  outside = [i for i in chosen if not 0 <= i < available]
  if repeated or outside:
    raise ValueError(f"{source} must be distinct row numbers in [0, {available}): "
                     + "; ".join(filter(None, [repeated and f"repeated {repeated[:5]}",
                                                outside and f"outside {outside[:5]}"])))
  return chosen


def build_ruler_hqa(rows: Sequence[HotpotRow], num_docs: int, num_questions: int = 128,
                    seed: int = 0, indices: Sequence[int] | None = None) -> list[Example]:
  """RULER-HQA examples with `num_docs` documents each (see the module doc).

  rows:     the whole dev file (distractors come from all of its paragraphs).
  indices:  which rows ask the questions (default: the first `num_questions`).
  """
  if num_questions <= 0:
    raise ValueError(f"num_questions must be positive, got {num_questions}")
  chosen = list(range(len(rows))) if indices is None else checked_indices(indices, len(rows))
  if num_questions > len(chosen):
    raise ValueError(f"num_questions={num_questions} but only {len(chosen)} questions available")
  pool = HotpotPool(rows)
  pool.check_num_docs(num_docs)  # before any work; each question checks its own count too
  return [pool.example(q, num_docs, seed) for q in chosen[:num_questions]]


# --- question rows (LycheeMemory / MemAgent data) -------------------------------


@dataclasses.dataclass(frozen=True)
class QuestionRow:
  """One question row, in MemAgent's RL-data layout (`context`, `prompt`,
  `reward_model.ground_truth`, `extra_info`) or its evaluation layout (`context`, `input`,
  `answers`, `num_docs`, `index`): what every reader of such rows gets from `parse_row`."""
  context: str | tuple[int, ...]  # text, or pool indices (MemAgent's files over 10000 docs)
  question: str | None
  answers: tuple[str, ...]
  extras: dict[str, Any]          # num_docs, index, length: where present


def _lookup(item: dict, key: str) -> Any:
  """item["a"]["b"] for key "a.b"; None where any level is missing."""
  for part in key.split("."):
    if not isinstance(item, dict) or part not in item:
      return None
    item = item[part]
  return item


def _prompt_question(prompt: Any) -> Any:
  """The last user turn of a chat prompt (a list of {"role", "content"} messages)."""
  if not isinstance(prompt, list):
    return None
  turns = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
  return turns[-1] if turns else None


def _question(where: str, item: dict, required: bool = True) -> str | None:
  for key in QUESTION_FIELDS:
    value = _prompt_question(item.get(key)) if key == "prompt" else _lookup(item, key)
    if isinstance(value, str) and value.strip():
      return value
  if required:
    raise DatasetError(f"{where}: missing question (looked for a non-empty string in "
                       f"{', '.join(QUESTION_FIELDS[:-1])} and the last user message of prompt)")
  return None


def _answers(where: str, item: dict, required: bool = True) -> tuple[str, ...]:
  key = next((k for k in ANSWER_FIELDS if _lookup(item, k) is not None), None)
  if key is None:
    if required:
      raise DatasetError(f"{where}: missing answers (one of {', '.join(ANSWER_FIELDS)})")
    return ()
  value = _lookup(item, key)
  answers = [value] if isinstance(value, str) else value
  if (not isinstance(answers, list) or not answers
      or not all(isinstance(a, str) and a.strip() for a in answers)):
    raise DatasetError(f"{where}: field '{key}' should be a non-empty string or a non-empty list "
                       f"of them, got {value!r:.80}")
  return tuple(answers)


def _row_object(where: str, item: Any) -> dict:
  if not isinstance(item, dict):
    raise DatasetError(f"{where}: expected an object, got {type(item).__name__}")
  return item


def parse_row(where: str, item: Any, *, need_question: bool = True, need_answers: bool = True,
              pool_indices: bool = False) -> QuestionRow:
  """The one parser of question rows (read_rows, read_memagent_eval, the `rows` data kind,
  documents.read_document); errors name `where` (file and row).

  need_question / need_answers: a row without one is an error (else None / ()).
  pool_indices: the context may be a list of pool indices instead of text.
  """
  item = _row_object(where, item)
  context = _field(where, item, "context", (str, list) if pool_indices else str)
  if isinstance(context, str):
    if not context.strip():
      raise DatasetError(f"{where}: empty context")
  else:
    context = tuple(context)
  extras = {}
  for key in ("num_docs", "index", "length"):
    value = _lookup(item, f"extra_info.{key}")
    value = item.get(key) if value is None else value
    if value is not None:
      extras[key] = value
  return QuestionRow(context=context, question=_question(where, item, need_question),
                     answers=_answers(where, item, need_answers), extras=extras)


def read_question_rows(path: str | os.PathLike, **kwargs: Any) -> tuple[str, list[QuestionRow]]:
  """Every row of a .json / .jsonl / .parquet file through `parse_row(..., **kwargs)`."""
  path, located = read_row_file(path)
  return path, [parse_row(where, item, **kwargs) for where, item in located]


def memagent_indices(path: str | os.PathLike) -> list[int]:
  """The HotpotQA dev row numbers of a MemAgent eval file: its question set, in order."""
  _, located = read_row_file(path)
  return [_field(where, _row_object(where, item), "index", int) for where, item in located]


def _extra(where: str, row: QuestionRow, key: str) -> int:
  value = row.extras.get(key)
  if value is None:
    raise DatasetError(f"{where}: missing field '{key}'")
  if not isinstance(value, int) or isinstance(value, bool):
    raise DatasetError(f"{where}: field '{key}' should be int, got {type(value).__name__}")
  return value


def read_memagent_eval(path: str | os.PathLike,
                       hotpotqa: Sequence[HotpotRow] | None = None) -> list[Example]:
  """Reads MemAgent's published eval_{N}.json (`context`, `input`, `answers`, `num_docs`, `index`).

  The files carry no labels, so without `hotpotqa` each context is one segment
  and nothing is supporting.  Given the dev rows, `index` names each question's
  row: the context is split into its "Document i:" blocks, labelled like
  `build_ruler_hqa`'s; files above 10000 documents store pool indices and need them.
  """
  path, located = read_row_file(path)
  pool = document_pool(hotpotqa) if hotpotqa is not None else None
  examples = []
  for where, item in located:
    parsed = parse_row(where, item, pool_indices=True)
    question, answers, context = parsed.question, parsed.answers, parsed.context
    num_docs, index = _extra(where, parsed, "num_docs"), _extra(where, parsed, "index")
    common = dict(id=f"{index}/{num_docs}", task=TASK,
                  metadata={"num_docs": num_docs, "index": index, "source": os.path.basename(path)})
    if not isinstance(context, str):
      if pool is None:
        raise DatasetError(f"{where}: context holds pool indices (MemAgent's files over 10000 "
                           "documents); pass the HotpotQA dev rows to resolve them")
      if not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(pool) for k in context):
        raise DatasetError(f"{where}: context indices must be integers in [0, {len(pool)})")
      documents = [pool[k] for k in context]
    elif pool is None:
      examples.append(Example(segments=(context,), supporting=(), question=question,
                              answers=answers, **common))
      continue
    else:
      documents = _split_blocks(where, context)
    if not 0 <= index < len(hotpotqa):
      raise DatasetError(f"{where}: index {index} is outside the {len(hotpotqa)} HotpotQA rows")
    row = hotpotqa[index]
    if row.question.strip() != question.strip() or (row.answer,) != answers:
      raise DatasetError(f"{where}: question or answer differs from HotpotQA row {index} "
                         f"({row.id}); is it the same dev file?")
    common["metadata"]["hotpot_id"] = row.id
    examples.append(_labelled(where, documents, row, **common))
  return examples


def read_rows(path: str | os.PathLike, task: str | None = None) -> list[Example]:
  """Reads LycheeMemory/MemAgent-style rows: `context`, a question, gold answers; no labels.

  Ids are row numbers and the task defaults to the file's stem; the `rows` data kind
  (specs.py) names them by file instead.
  """
  path, rows = read_question_rows(path)
  task = task or os.path.splitext(os.path.basename(path))[0]
  return [Example(id=str(i), task=task, segments=(row.context,), supporting=(),
                  question=row.question, answers=row.answers, metadata={"row": i, **row.extras})
          for i, row in enumerate(rows)]
