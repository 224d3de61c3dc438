"""Saving and loading a document's compressed memory, so one compression serves many questions.

A bank directory holds `k.npy`, `v.npy` ([N, L, S, K, D], chunk-major so a
group of chunks is one contiguous slice of a memory-mapped file),
`slot_mask.npy` ([N, S]) and `metadata.json`.  The metadata names the model
(a fingerprint of its config and beacon parameters), the document (a hash of
its content and one of its token ids, which tokenization decides) and the
compression settings; loading checks them, because a bank made by another
model, from another document or with another chunk size, window, ratio or
dtype would silently give wrong answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import ml_dtypes
import numpy as np

from memrecall.runtime import fingerprint

from memrecall.method.compressor import ChunkMemory, CompressorConfig
from memrecall.method.recall import DocumentBank
from memrecall.models import qwen2
from memrecall.models.config import ModelConfig

# 2: the document's hashes; 3: the model fingerprint covers the MLPs' gate projections (until
# 3 a substring test left every layer's `gate_kernel` out, so a bank was reused by a model that
# differed there).
FORMAT_VERSION = 3
_STORED_AS = {"bfloat16": np.uint16}  # numpy's .npy cannot name bfloat16


class BankMismatchError(ValueError):
  """A memory bank made by another model, from another document or with other settings."""


@dataclasses.dataclass(frozen=True)
class BankMetadata:
  model_fingerprint: str
  chunk_size: int
  window: int
  ratio: int
  dtype: str
  num_chunks: int
  num_tokens: int
  document_hash: str = ""  # `fingerprint.value_hash` of the document's text (or given ids)
  tokens_hash: str = ""  # of its token ids: the same text tokenized otherwise differs here
  document: str = ""  # where it came from (path and row), to name it in errors
  format_version: int = FORMAT_VERSION

  # Fields that must agree for a bank to be usable; num_chunks/num_tokens describe the document.
  CHECKED = ("format_version", "model_fingerprint", "document_hash", "tokens_hash", "chunk_size",
             "window", "ratio", "dtype")


def _shapes_memory(path: tuple[str, ...]) -> bool:
  """Every parameter the compressor reads: embeddings, every layer's projections (ordinary and
  beacon), MLPs and norms; not the output head, the final norm or the gate."""
  return path[0] not in ("lm_head", "final_norm") and not qwen2.is_gate_param(path)


def model_fingerprint(params, config: ModelConfig) -> str:
  """A short hash of the model's shape and of every parameter that shapes compressed memory.

  The parameters are reduced to checksums on their devices (one pass over the weights, a few
  bytes to the host), once per bank: a model retrained in any layer makes another fingerprint.
  """
  # The gate's settings leave the memory as it is (as its parameters do, `_shapes_memory`).
  shape = config.replace(gate_lora_rank=0).to_hf_dict()
  return fingerprint.params_fingerprint(
      params, salt=json.dumps(shape, sort_keys=True), include=_shapes_memory)


def describe(params, config: ModelConfig, compressor: CompressorConfig, memory: ChunkMemory,
             num_tokens: int, document_hash: str = "", tokens_hash: str = "",
             document: str = "") -> BankMetadata:
  return BankMetadata(model_fingerprint=model_fingerprint(params, config),
                      chunk_size=compressor.chunk_size, window=compressor.window,
                      ratio=compressor.ratio, dtype=str(memory.k.dtype),
                      num_chunks=memory.num_chunks, num_tokens=int(num_tokens),
                      document_hash=document_hash, tokens_hash=tokens_hash, document=document)


def check_document(directory: str | os.PathLike, document_hash: str, document: str) -> None:
  """Refuses a bank made from another document, before any model is loaded; a BankMismatchError
  names both documents."""
  metadata = read_metadata(directory)
  if metadata.document_hash != document_hash:
    made_from = metadata.document or "an unrecorded document"
    raise BankMismatchError(
        f"memory bank {os.fspath(directory)} was made from {made_from} (content "
        f"{metadata.document_hash or '?'}), not from {document} (content {document_hash})")


BANK_FILES = frozenset({"k.npy", "v.npy", "slot_mask.npy", "metadata.json"})


def check_replaceable(directory: str | os.PathLike) -> None:
  """Refuses a `directory` a bank would replace that holds anything but a bank's own files
  (a bank is written by replacing the whole directory)."""
  directory = os.fspath(directory)
  if not os.path.exists(directory):
    return
  if not os.path.isdir(directory):
    raise FileExistsError(f"{directory} is a file, not a memory bank directory")
  others = sorted(set(os.listdir(directory)) - BANK_FILES)
  if others:
    raise FileExistsError(f"{directory} holds files that are not a memory bank's "
                          f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
                          "choose a new or empty directory for the bank")


def save_bank(directory: str | os.PathLike, memory: ChunkMemory, metadata: BankMetadata) -> None:
  """Writes a bank atomically: a complete bank appears at `directory` or nothing changes.
  An existing bank there is replaced; a directory holding anything else is refused."""
  directory = os.fspath(directory)
  check_replaceable(directory)
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".bank-", dir=parent)
  try:
    for name, value in (("k", memory.k), ("v", memory.v)):
      array = np.moveaxis(np.asarray(jax.device_get(value)), 1, 0)  # [N, L, S, K, D]
      stored = _STORED_AS.get(str(array.dtype))
      np.save(os.path.join(staging, f"{name}.npy"), array.view(stored) if stored else array)
    np.save(os.path.join(staging, "slot_mask.npy"), np.asarray(jax.device_get(memory.slot_mask)))
    with open(os.path.join(staging, "metadata.json"), "w", encoding="utf-8") as f:
      json.dump(dataclasses.asdict(metadata), f, indent=2)
    old = None
    if os.path.exists(directory):  # moved aside, not deleted, until the new bank is in place
      old = tempfile.mkdtemp(prefix=".bank-old-", dir=parent)
      os.replace(directory, os.path.join(old, "bank"))
    try:
      os.replace(staging, directory)
    except BaseException:
      if old is not None:
        os.replace(os.path.join(old, "bank"), directory)
        os.rmdir(old)
      raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def read_metadata(directory: str | os.PathLike) -> BankMetadata:
  path = os.path.join(os.fspath(directory), "metadata.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a memory bank (no metadata.json)")
  with open(path, encoding="utf-8") as f:
    values = json.load(f)
  try:
    return BankMetadata(**values)
  except TypeError as e:
    raise BankMismatchError(f"{path}: unreadable bank metadata ({e})") from None


def load_bank(directory: str | os.PathLike, expected: BankMetadata | None = None, *,
              mmap: bool = True) -> tuple[DocumentBank, BankMetadata]:
  """A host-side (numpy, memory-mapped by default) DocumentBank of one document.

  With `expected`, every field in `BankMetadata.CHECKED` must agree, else a
  BankMismatchError lists the differences.
  """
  metadata = read_metadata(directory)
  if expected is not None:
    diffs = [f"{name}: bank has {getattr(metadata, name)!r}, expected {getattr(expected, name)!r}"
             for name in BankMetadata.CHECKED if getattr(metadata, name) != getattr(expected, name)]
    if diffs:
      raise BankMismatchError(f"memory bank {directory} does not fit this model/settings: "
                              + "; ".join(diffs))
  mode = "r" if mmap else None
  arrays = {}
  for name in ("k", "v"):
    array = np.load(os.path.join(os.fspath(directory), f"{name}.npy"), mmap_mode=mode)
    if metadata.dtype in _STORED_AS:
      array = array.view(getattr(ml_dtypes, metadata.dtype))
    arrays[name] = array[:, :, None]  # [N, L, 1, S, K, D]
  slot_mask = np.load(os.path.join(os.fspath(directory), "slot_mask.npy"), mmap_mode=mode)
  if arrays["k"].shape[0] != metadata.num_chunks:
    raise BankMismatchError(f"{directory}: {arrays['k'].shape[0]} chunks stored, metadata says "
                            f"{metadata.num_chunks}")
  bank = DocumentBank(k=arrays["k"], v=arrays["v"], slot_mask=slot_mask[:, None],
                      chunk_valid=np.ones((metadata.num_chunks, 1), bool))
  return bank, metadata
