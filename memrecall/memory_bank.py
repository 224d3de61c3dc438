"""Saving and loading a document's compressed memory, so one compression serves many questions.

A bank directory holds `k.npy`, `v.npy` ([N, L, S, K, D], chunk-major so a
group of chunks is one contiguous slice of a memory-mapped file),
`slot_mask.npy` ([N, S]) and `metadata.json`.  The metadata names the model
(a fingerprint of its config and beacon parameters) and the compression
settings; loading checks them, because a bank made by another model or with
another chunk size, window, ratio or dtype would silently give wrong answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from memrecall.compressor import ChunkMemory, CompressorConfig
from memrecall.config import ModelConfig
from memrecall.recall import DocumentBank

FORMAT_VERSION = 1
_STORED_AS = {"bfloat16": np.uint16}  # numpy's .npy cannot name bfloat16


class BankMismatchError(ValueError):
  """A memory bank made by another model or with other settings."""


@dataclasses.dataclass(frozen=True)
class BankMetadata:
  model_fingerprint: str
  chunk_size: int
  window: int
  ratio: int
  dtype: str
  num_chunks: int
  num_tokens: int
  format_version: int = FORMAT_VERSION

  # Fields that must agree for a bank to be usable; num_chunks/num_tokens describe the document.
  CHECKED = ("format_version", "model_fingerprint", "chunk_size", "window", "ratio", "dtype")


def _shapes_memory(path: tuple[str, ...]) -> bool:
  """Every parameter the compressor reads: embeddings, every layer's projections (ordinary and
  beacon), MLPs and norms; not the output head, the final norm or the gate."""
  name = "/".join(path)
  return not ("lm_head" in name or "final_norm" in name or "gate_" in name or "lora" in name)


@jax.jit
def _checksums(leaves):
  """Two wrapping uint32 sums per leaf of its bits times odd position weights: any one changed
  element changes them (an odd weight is invertible mod 2^32); computed where the leaves are."""
  out = []
  for x in leaves:
    bits = jax.lax.bitcast_convert_type(x, {4: jnp.uint32, 2: jnp.uint16}[x.dtype.itemsize])
    bits = bits.astype(jnp.uint32).reshape(-1)
    position = jnp.arange(bits.size, dtype=jnp.uint32)
    odd = position * jnp.uint32(2) + jnp.uint32(1)
    mixed = (bits ^ (bits >> 16)) * jnp.uint32(0x85EBCA6B)
    out.append(jnp.stack([jnp.sum(bits * odd * jnp.uint32(0x9E3779B1)), jnp.sum(mixed * odd)]))
  return out


def model_fingerprint(params, config: ModelConfig) -> str:
  """A short hash of the model's shape and of every parameter that shapes compressed memory.

  The parameters are reduced to checksums on their devices (one pass over the weights, a few
  bytes to the host), once per bank: a model retrained in any layer makes another fingerprint.
  """
  digest = hashlib.sha256(json.dumps(config.to_hf_dict(), sort_keys=True).encode())
  flat = sorted(((p, x) for p, x in flax.traverse_util.flatten_dict(params).items()
                 if _shapes_memory(p)), key=lambda item: item[0])
  sums = jax.device_get(_checksums([x for _, x in flat]))
  for (path, x), pair in zip(flat, sums):
    digest.update(f"{'/'.join(path)}:{tuple(x.shape)}:{x.dtype}:".encode())
    digest.update(np.asarray(pair, np.uint32).tobytes())
  return digest.hexdigest()[:16]


def describe(params, config: ModelConfig, compressor: CompressorConfig, memory: ChunkMemory,
             num_tokens: int) -> BankMetadata:
  return BankMetadata(model_fingerprint=model_fingerprint(params, config),
                      chunk_size=compressor.chunk_size, window=compressor.window,
                      ratio=compressor.ratio, dtype=str(memory.k.dtype),
                      num_chunks=memory.num_chunks, num_tokens=int(num_tokens))


def save_bank(directory: str | os.PathLike, memory: ChunkMemory, metadata: BankMetadata) -> None:
  """Writes a bank atomically: a complete bank appears at `directory` or nothing changes."""
  directory = os.fspath(directory)
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".bank-", dir=parent)
  try:
    for name, value in (("k", memory.k), ("v", memory.v)):
      array = np.moveaxis(np.asarray(jax.device_get(value)), 1, 0)  # [N, L, S, K, D]
      stored = _STORED_AS.get(str(array.dtype))
      np.save(os.path.join(staging, f"{name}.npy"), array.view(stored) if stored else array)
    np.save(os.path.join(staging, "slot_mask.npy"), np.asarray(jax.device_get(memory.slot_mask)))
    with open(os.path.join(staging, "metadata.json"), "w") as f:
      json.dump(dataclasses.asdict(metadata), f, indent=2)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def read_metadata(directory: str | os.PathLike) -> BankMetadata:
  path = os.path.join(os.fspath(directory), "metadata.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a memory bank (no metadata.json)")
  with open(path) as f:
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
