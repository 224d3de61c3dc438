"""What made the rows of a resumable output directory, so a rerun never mixes in other rows.

A resumable evaluation skips the rows it finds.  That is only right when they
came from the same weights, data and settings, so each group of rows (a model
name and a data file or task) has a key in OUTPUT_DIR/keys.json: a dict of
everything that changes a row (a fingerprint of the parameters, the data's
content hash, every setting).  `claim` records a new group's key and refuses a
different one naming what differs; a matching rerun goes on skipping rows.
"""

from __future__ import annotations

import json
import os

from memrecall.runtime.distributed import is_primary

KEYS_FILE = "keys.json"


class OutputKeyError(ValueError):
  """An output directory that holds rows made from other weights, data or settings."""


def _normal(key: dict) -> dict:
  """As the key reads back from JSON (tuples as lists), so that equal keys compare equal."""
  return json.loads(json.dumps(key, sort_keys=True, default=str))


def read_keys(directory: str) -> dict[str, dict]:
  path = os.path.join(directory, KEYS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      keys = json.load(f)
    except json.JSONDecodeError:
      raise OutputKeyError(f"{path} is not valid JSON; move the directory away to start "
                           "over") from None
  if not isinstance(keys, dict):
    raise OutputKeyError(f"{path} does not map row groups to keys; move the directory away")
  return keys


def differences(old: dict, new: dict) -> list[str]:
  """`name: A there, B now` for every entry that differs."""
  return [f"{name} {old.get(name)!r} there, {new.get(name)!r} now"
          for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]


def claim(directory: str, keys: dict[str, dict], existing_groups: set[str]) -> None:
  """Checks every group's key against DIRECTORY/keys.json, then records the new ones.

  All groups are checked before anything is written, so a refused run changes nothing.
  existing_groups: groups that already have rows.  A group with rows and another key is
  refused; rows without a recorded key (written before keys existed) are refused too, as
  nothing says what made them.  A recorded key whose group has no rows (a run that failed
  before its first row) is replaced: nothing was made under it.
  """
  recorded = read_keys(directory)
  for group, key in keys.items():
    key = _normal(key)
    if group in existing_groups and group in recorded and recorded[group] != key:
      raise OutputKeyError(
          f"{directory} holds rows of {group} made otherwise ({'; '.join(differences(recorded[group], key))}):"
          " write into another output directory (or under another model name)")
    if group not in recorded and group in existing_groups:
      raise OutputKeyError(f"{directory} holds rows of {group} with no record of what made them "
                           f"({KEYS_FILE} lacks them): move them away or write elsewhere")
  new = {group: _normal(key) for group, key in keys.items() if recorded.get(group) != _normal(key)}
  if new and is_primary():
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, KEYS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({**recorded, **new}, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
