"""JSON-lines files that survive a kill: every appended-to file of a run goes through here.

A process killed in the middle of a write leaves a torn last line (no newline
at its end).  `read` ignores it and `append` cuts it off before writing, so
the rerun that redoes that row ends with every row exactly once and a file
that parses; a damaged line anywhere else is an error naming file and line.
"""

from __future__ import annotations

import json
import os
from typing import Iterable


class JsonlError(ValueError):
  """A line before the last that is not JSON: not a kill, so nothing is guessed."""


def read(path: str | os.PathLike) -> list:
  """The complete records of `path` ([] when it does not exist); a torn last line is left out."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  records = []
  for number, line in enumerate(complete.split(b"\n")[:-1], 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise JsonlError(f"{path} line {number} is not JSON (not a torn last line); move the file "
                       "away to start over") from None
  return records


def drop_torn_tail(path: str | os.PathLike) -> int:
  """Truncates `path` after its last newline; returns the bytes dropped (0: nothing torn)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return 0
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    end, block = size, 1 << 16
    while end > 0:  # the last newline, reading backwards
      start = max(0, end - block)
      f.seek(start)
      newline = f.read(end - start).rfind(b"\n")
      if newline >= 0:
        keep = start + newline + 1
        break
      end = start
    else:
      keep = 0
    if keep < size:
      f.truncate(keep)
  return size - keep


def append(path: str | os.PathLike, records: Iterable) -> None:
  """Appends one line per record after dropping a torn tail, and flushes them to disk."""
  path = os.fspath(path)
  drop_torn_tail(path)
  lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  with open(path, "a", encoding="utf-8") as f:
    f.write(lines)
    f.flush()
    os.fsync(f.fileno())


def rewrite(path: str | os.PathLike, records: Iterable) -> None:
  """Replaces `path` by these records atomically (a kill leaves the old file or the new one)."""
  path = os.fspath(path)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)
