"""Reading a text file, with errors that name the file (documents and datasets alike)."""

from __future__ import annotations

import os

ROW_FILES = (".json", ".jsonl", ".parquet")


def row_file_kind(path: str | os.PathLike) -> str | None:
  """A rows file's format by its extension in any case (`.JSONL` is JSON lines): one of
  ROW_FILES, or None for any other file."""
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  return suffix if suffix in ROW_FILES else None


def read_text(path: str | os.PathLike, what: str = "document", error=ValueError,
              hint: str = "") -> str:
  """A UTF-8 file's text (a byte-order mark dropped), with errors that name the file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} {path} does not exist")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise error(
        f"{path} is not UTF-8 text (invalid byte at offset {e.start}){hint}") from None
