"""Tokenizers: a byte-level default that needs no files, and HF `tokenizer.json`.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
the special ids and a `fingerprint` of what defines them (evaluation keys its rows by it), so
the rest of memrecall never asks which one it has.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol, Sequence


class Tokenizer(Protocol):
  vocab_size: int
  eos_ids: tuple[int, ...]
  pad_id: int
  fingerprint: str  # 16 hex digits of what defines it (an HF tokenizer's files)
  special_tokens: dict[str, str]  # `bos_token` etc. as text, for chat templates

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted by `offset`; ids below the offset are special tokens.

  The default layout is 0 = pad, 1 = bos, 2 = eos, then the 256 byte values.
  Ids outside the byte range are skipped when decoding, so a model with a
  larger vocabulary (task tokens, beacons) still decodes cleanly.
  """

  def __init__(self, offset: int = 3, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
    self.offset = offset
    self.pad_id, self.bos_id = pad_id, bos_id
    self.eos_ids = (eos_id,)
    self.vocab_size = offset + 256
    self.special_tokens = {}  # its specials have ids but no text
    self.fingerprint = hashlib.sha256(
        f"bytes {offset} {pad_id} {bos_id} {eos_id}".encode()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.offset + 256)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizer.json` (Hugging Face `tokenizers`) with the special ids of its checkpoint."""

  def __init__(self, directory: str | os.PathLike, eos_ids: Sequence[int] = (), pad_id: int | None = None):
    try:
      from tokenizers import Tokenizer as _Tokenizer
    except ImportError as e:
      raise ImportError("reading tokenizer.json needs the `tokenizers` package: "
                        "pip install 'memrecall[hf]'") from e
    self.directory = os.fspath(directory)
    path = os.path.join(self.directory, "tokenizer.json")
    with open(path, "rb") as f:
      data = f.read()
    try:
      self._tokenizer = _Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception ("EOF while parsing a value")
      raise ValueError(f"{path} cannot be read as a tokenizer ({e}); it may be truncated: copy "
                        "it again from the checkpoint") from None
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_ids = tuple(eos_ids)
    self.pad_id = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
    config_path = os.path.join(self.directory, "tokenizer_config.json")
    self.config = _read_json(config_path) if os.path.exists(config_path) else {}
    self.chat_template = _chat_template(self.directory, self.config)
    self.special_tokens = _special_tokens(self.config)
    # tokenizer.json's bytes, tokenizer_config.json's content (special tokens) and the chat
    # template.
    digest = hashlib.sha256(data)
    digest.update(json.dumps(self.config, sort_keys=True).encode())
    digest.update((self.chat_template or "").encode())
    self.fingerprint = digest.hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_id(self, token: str) -> int | None:
    """The id of a (special) token's text, None if the vocabulary lacks it."""
    return self._tokenizer.token_to_id(token)


CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _special_tokens(config: dict) -> dict[str, str]:
  """tokenizer_config.json's special tokens as text (a string, or an AddedToken's `content`):
  chat templates render them, as transformers' `apply_chat_template` passes them (Llama-3's
  starts with `{{ bos_token }}`; Qwen's uses none)."""
  tokens = {}
  for name in SPECIAL_TOKENS:
    value = config.get(name)
    value = value.get("content") if isinstance(value, dict) else value
    if isinstance(value, str):
      tokens[name] = value
  return tokens


def _chat_template(directory: str, config: dict) -> str | None:
  """The checkpoint's chat template: `chat_template.jinja` (where transformers >= 4.50 saves
  it), else tokenizer_config.json's `chat_template` (a string, or a list of named templates of
  which `default` is the one), else None."""
  path = os.path.join(directory, CHAT_TEMPLATE_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if "default" not in named:
      raise ValueError(f"{directory}/tokenizer_config.json lists chat templates "
                       f"{sorted(map(str, named))} and none named 'default': set "
                       "prompts.chat_template to the one to use")
    return named["default"]
  return template or None


def _read_json(path: str) -> dict:
  """A JSON file named in its own error: json's message ("Invalid control character") names none."""
  with open(path, encoding="utf-8") as f:  # JSON is UTF-8 whatever the locale
    try:
      return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not valid JSON ({e}); it may be truncated: copy it again "
                        "from the checkpoint") from None


def load_tokenizer(directory: str | os.PathLike | None, eos_ids: Sequence[int] = (),
                   pad_id: int | None = None) -> Tokenizer:
  """`tokenizer.json` from `directory` when present, else the byte-level default."""
  if directory is not None and os.path.exists(os.path.join(os.fspath(directory), "tokenizer.json")):
    return HFTokenizer(directory, eos_ids, pad_id)
  return ByteTokenizer()
