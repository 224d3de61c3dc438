"""Short content hashes of what produced a result: loaded parameters, data files, documents.

Names say nothing about content (two checkpoints can both live in a directory
called `hf`), so outputs that are reused later (evaluation rows, memory banks)
record these hashes and are refused when they differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np


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


def params_fingerprint(params, salt: str = "",
                       include: Callable[[tuple[str, ...]], bool] = lambda path: True) -> str:
  """16 hex digits over every included parameter's name, shape, dtype and values (and `salt`).

  The values are reduced to checksums on their devices (one pass over the weights, a few bytes
  to the host): a model retrained in any layer gets another fingerprint.
  """
  digest = hashlib.sha256(salt.encode())
  flat = sorted(((p, x) for p, x in flax.traverse_util.flatten_dict(params).items() if include(p)),
                key=lambda item: item[0])
  sums = jax.device_get(_checksums([x for _, x in flat]))
  for (path, x), pair in zip(flat, sums):
    digest.update(f"{'/'.join(path)}:{tuple(x.shape)}:{x.dtype}:".encode())
    digest.update(np.asarray(pair, np.uint32).tobytes())
  return digest.hexdigest()[:16]


def file_hash(path: str | os.PathLike) -> str:
  """16 hex digits of a file's bytes, or of every file under a directory (names and bytes)."""
  path = os.fspath(path)
  digest = hashlib.sha256()
  files = [path] if not os.path.isdir(path) else sorted(
      os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
  for name in files:
    if files != [path]:
      digest.update(os.path.relpath(name, path).encode() + b"\0")
    with open(name, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()[:16]


def value_hash(value) -> str:
  """16 hex digits of a JSON-able value (settings, token ids, templates)."""
  text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
