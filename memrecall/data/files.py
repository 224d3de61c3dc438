"""Reading a text file, with errors that name the file (documents and datasets alike)."""

from __future__ import annotations

import os


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
