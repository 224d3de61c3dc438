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

We keep the layout and the text format exactly; the random draws differ:
MemAgent shuffles every question with `random.Random(4)` and samples with a
process-global generator, whereas we seed each question from (seed, its row
index), so a layout does not depend on which other questions are built.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from memrecall.data.example import Example
from memrecall.documents import QUESTION_FIELDS, read_text

TASK = "ruler_hqa"
DOCUMENT_TEMPLATE = "Document {i}:\n{document}"
SEPARATOR = "\n\n"
PAPER_NUM_DOCS = (50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600)
ANSWER_FIELDS = ("answers", "answer", "outputs")
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


def _read_json(path: str | os.PathLike) -> tuple[str, list[Any]]:
  """The rows of a .json list (or single object) or .jsonl file, errors naming the file."""
  path = os.fspath(path)
  text = read_text(path, "dataset file", DatasetError)
  try:
    if path.endswith(".jsonl"):
      rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
      rows = json.loads(text)
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
  rows = rows if isinstance(rows, list) else [rows]
  if not rows:
    raise DatasetError(f"{path} holds no rows")
  return path, rows


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
  path, rows = _read_json(path)
  return [_parse_hotpot(f"{path} row {i}", item) for i, item in enumerate(rows)]


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
  """An Example whose supporting blocks and oracle memory come from `row`'s gold facts."""
  position = {d: i for i, d in reversed(list(enumerate(documents)))}
  paragraphs = {title: sentences for title, sentences in row.context}
  by_block: dict[int, list[str]] = {}
  for title in dict.fromkeys(t for t, _ in row.supporting_facts):
    block = position.get(document_text(title, paragraphs[title]))
    if block is None:
      raise DatasetError(f"{where}: gold paragraph {title!r} of HotpotQA {row.id} is missing")
    sentences = paragraphs[title]
    indices = sorted({k for t, k in row.supporting_facts if t == title})
    # A few HotpotQA facts point past their paragraph's end: the block still counts.
    by_block[block] = [f"{title}: {sentences[k].strip()}" for k in indices if k < len(sentences)]
  supporting = tuple(sorted(by_block))
  memory, lines = [], []
  for block in supporting:
    lines.extend(by_block[block])
    memory.append("\n".join(lines))
  return Example(segments=_segments(documents), supporting=supporting, question=row.question,
                 answers=(row.answer,), oracle_memory=tuple(memory), **kwargs)


def build_ruler_hqa(rows: Sequence[HotpotRow], num_docs: int, num_questions: int = 128,
                    seed: int = 0, indices: Sequence[int] | None = None) -> list[Example]:
  """RULER-HQA examples with `num_docs` documents each (see the module doc).

  rows:     the whole dev file (distractors come from all of its paragraphs).
  indices:  which rows ask the questions (default: the first `num_questions`).
  """
  if num_questions <= 0:
    raise ValueError(f"num_questions must be positive, got {num_questions}")
  chosen = list(range(len(rows))) if indices is None else [int(i) for i in indices]
  if len(set(chosen)) != len(chosen) or any(not 0 <= i < len(rows) for i in chosen):
    raise ValueError(f"indices must be distinct row numbers in [0, {len(rows)})")
  if num_questions > len(chosen):
    raise ValueError(f"num_questions={num_questions} but only {len(chosen)} questions available")
  chosen = chosen[:num_questions]
  pool = document_pool(rows)
  own_docs = {q: rows[q].documents() for q in chosen}
  need = max([MIN_DOCS] + [len(d) for d in own_docs.values()])
  if not need <= num_docs <= len(pool):
    raise ValueError(f"num_docs={num_docs} must lie in [{need}, {len(pool)}]: each question keeps "
                     f"its own paragraphs and the dev pool has {len(pool)} distinct ones")
  ids = {d: i for i, d in enumerate(pool)}
  examples = []
  for q in chosen:
    row, own = rows[q], np.array([ids[d] for d in own_docs[q]], np.int64)
    rng = np.random.default_rng([seed, q])
    others = np.setdiff1d(np.arange(len(pool)), own, assume_unique=True)
    order = rng.permutation(np.concatenate([own, rng.choice(others, num_docs - len(own), replace=False)]))
    examples.append(_labelled(
        f"HotpotQA row {q}", [pool[i] for i in order], row, id=f"{row.id}/{num_docs}", task=TASK,
        metadata={"num_docs": num_docs, "hotpot_id": row.id, "type": row.type, "level": row.level,
                  "row": q, "seed": seed}))
  return examples


def _answers(where: str, item: dict) -> tuple[str, ...]:
  key = next((k for k in ANSWER_FIELDS if k in item), None)
  if key is None:
    raise DatasetError(f"{where}: missing answers (one of {', '.join(ANSWER_FIELDS)})")
  value = item[key]
  answers = [value] if isinstance(value, str) else value
  if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
    raise DatasetError(f"{where}: field '{key}' should be a string or a non-empty list of strings")
  return tuple(answers)


def _question(where: str, item: dict) -> str:
  question = next((item[k] for k in QUESTION_FIELDS if isinstance(item.get(k), str)), None)
  if question is None:
    raise DatasetError(f"{where}: missing question (a string in one of {', '.join(QUESTION_FIELDS)})")
  return question


def _row_object(where: str, item: Any) -> dict:
  if not isinstance(item, dict):
    raise DatasetError(f"{where}: expected an object, got {type(item).__name__}")
  return item


def memagent_indices(path: str | os.PathLike) -> list[int]:
  """The HotpotQA dev row numbers of a MemAgent eval file: its question set, in order."""
  path, rows = _read_json(path)
  return [_field(f"{path} row {i}", _row_object(f"{path} row {i}", item), "index", int)
          for i, item in enumerate(rows)]


def read_memagent_eval(path: str | os.PathLike,
                       hotpotqa: Sequence[HotpotRow] | None = None) -> list[Example]:
  """Reads MemAgent's published eval_{N}.json (`context`, `input`, `answers`, `num_docs`, `index`).

  The files carry no labels, so without `hotpotqa` each context is one segment
  and nothing is supporting.  Given the dev rows, `index` names each question's
  row: the context is split into its "Document i:" blocks, labelled like
  `build_ruler_hqa`'s; files above 10000 documents store pool indices and need them.
  """
  path, rows = _read_json(path)
  pool = document_pool(hotpotqa) if hotpotqa is not None else None
  examples = []
  for i, raw in enumerate(rows):
    where = f"{path} row {i}"
    item = _row_object(where, raw)
    question, answers = _question(where, item), _answers(where, item)
    num_docs, index = _field(where, item, "num_docs", int), _field(where, item, "index", int)
    context = _field(where, item, "context", (str, list))
    common = dict(id=f"{index}/{num_docs}", task=TASK,
                  metadata={"num_docs": num_docs, "index": index, "source": os.path.basename(path)})
    if isinstance(context, list):
      if pool is None:
        raise DatasetError(f"{where}: context holds pool indices (MemAgent's files over 10000 "
                           "documents); pass the HotpotQA dev rows to resolve them")
      if not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(pool) for k in context):
        raise DatasetError(f"{where}: context indices must be integers in [0, {len(pool)})")
      documents = [pool[k] for k in context]
    elif pool is None:
      if not context.strip():
        raise DatasetError(f"{where}: empty context")
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
  """Reads LycheeMemory/MemAgent-style rows: `context`, a question, gold answers; no labels."""
  path, rows = _read_json(path)
  task = task or os.path.splitext(os.path.basename(path))[0]
  examples = []
  for i, raw in enumerate(rows):
    where = f"{path} row {i}"
    item = _row_object(where, raw)
    context = _field(where, item, "context", str)
    if not context.strip():
      raise DatasetError(f"{where}: empty context")
    metadata = {"row": i, **{k: item[k] for k in ("num_docs", "index", "length")
                             if isinstance(item.get(k), (int, str))}}
    examples.append(Example(id=str(i), task=task, segments=(context,), supporting=(),
                            question=_question(where, item), answers=_answers(where, item),
                            metadata=metadata))
  return examples
