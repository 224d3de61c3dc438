"""Reading a document (and maybe its question) from a file, with errors that name the problem.

Formats: plain UTF-8 text; a JSON list of token ids (pre-tokenised); question
rows in a .json list (or one object), .jsonl or .parquet file, in either of
MemAgent's layouts (RL data: `context`, `prompt`, `reward_model.ground_truth`,
`extra_info.question`; evaluation: `context`, `input`, `answers`), picked by
`row` and read by the datasets' one row parser (`ruler_hqa.parse_row`), so a
row means the same here as in training and evaluation.
"""

from __future__ import annotations

import dataclasses
import os

from memrecall.data import ruler_hqa
from memrecall.data.files import ROW_FILES, read_text, row_file_kind


class DocumentError(ValueError):
  """A document file that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Document:
  text: str | None = None
  ids: tuple[int, ...] | None = None
  question: str | None = None
  answers: tuple[str, ...] = ()


def read_document(path: str | os.PathLike, row: int = 0) -> Document:
  """The document at `path` (row `row` of a rows file); its question and answers if it has them.

  Every error is a DocumentError (or FileNotFoundError), naming the file and the row.
  """
  path = os.fspath(path)
  if row_file_kind(path):
    return _from_rows(path, row)
  text = read_text(path, error=DocumentError, hint="; convert it or pass token ids as a JSON list")
  if not text.strip():
    raise DocumentError(f"{path} is empty")
  return Document(text=text)


def _from_rows(path: str, row: int) -> Document:
  if not os.path.exists(path):
    raise FileNotFoundError(f"document {path} does not exist")
  try:
    _, located = ruler_hqa.read_row_file(path)
    items = [item for _, item in located]
    is_id = lambda x: isinstance(x, int) and not isinstance(x, bool)
    if row_file_kind(path) == ".json" and all(map(is_id, items)):
      return Document(ids=tuple(items))
    is_number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    if row_file_kind(path) == ".json" and any(map(is_number, items)):
      bad = next(i for i, x in enumerate(items) if not is_id(x))
      raise DocumentError(f"{path} reads as a list of token ids, but entry {bad} is "
                          f"{items[bad]!r}, not an integer")
    if not 0 <= row < len(located):
      raise DocumentError(f"{path} has {len(located)} rows; row {row} does not exist")
    # Only the chosen row is parsed: a damaged row elsewhere does not block this one.  No
    # question is fine (the caller may supply one); no context is not.
    parsed = ruler_hqa.parse_row(*located[row], need_question=False, need_answers=False)
  except ruler_hqa.DatasetError as e:
    raise DocumentError(str(e)) from None
  return Document(text=parsed.context, question=parsed.question, answers=parsed.answers)
