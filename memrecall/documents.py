"""Reading a document (and maybe its question) from a file, with errors that name the problem.

Formats: plain UTF-8 text; a JSON list of token ids (pre-tokenised); a JSON
list of rows (or one row) in the LycheeMemory/MemAgent format, with `context`
and a question field (`question`, `input` or `query`), picked by `row`.
"""

from __future__ import annotations

import dataclasses
import json
import os

QUESTION_FIELDS = ("question", "input", "query")


class DocumentError(ValueError):
  """A document file that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Document:
  text: str | None = None
  ids: tuple[int, ...] | None = None
  question: str | None = None
  answers: tuple[str, ...] = ()


def read_text(path: str | os.PathLike, what: str = "document", error=None, hint: str = "") -> str:
  """A UTF-8 file's text (a byte-order mark dropped), with errors that name the file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} {path} does not exist")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise (error or DocumentError)(
        f"{path} is not UTF-8 text (invalid byte at offset {e.start}){hint}") from None


def read_document(path: str | os.PathLike, row: int = 0) -> Document:
  path = os.fspath(path)
  text = read_text(path, hint="; convert it or pass token ids as a JSON list")
  if path.endswith(".json"):
    return _from_json(path, text, row)
  if not text.strip():
    raise DocumentError(f"{path} is empty")
  return Document(text=text)


def _from_json(path: str, text: str, row: int) -> Document:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DocumentError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
  if isinstance(data, list) and data and all(isinstance(x, int) for x in data):
    return Document(ids=tuple(data))
  rows = data if isinstance(data, list) else [data]
  if not rows:
    raise DocumentError(f"{path} holds an empty list")
  if not 0 <= row < len(rows):
    raise DocumentError(f"{path} has {len(rows)} rows; row {row} does not exist")
  item = rows[row]
  if not isinstance(item, dict):
    raise DocumentError(f"{path} row {row}: expected an object with 'context', got "
                        f"{type(item).__name__}")
  context = item.get("context")
  if not isinstance(context, str) or not context.strip():
    raise DocumentError(f"{path} row {row}: missing or empty 'context' field")
  question = next((item[k] for k in QUESTION_FIELDS if isinstance(item.get(k), str)), None)
  answers = item.get("answers", item.get("answer", ()))
  answers = (answers,) if isinstance(answers, str) else tuple(str(a) for a in answers)
  return Document(text=context, question=question, answers=answers)
