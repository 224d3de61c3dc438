"""Reading and writing the safetensors format, tensor by tensor.

The format (github.com/huggingface/safetensors) is an 8-byte little-endian
header length, a JSON header `{name: {dtype, shape, data_offsets}}` and the raw
little-endian bytes.  Reading memory-maps the file, so a tensor is only paged
in when (and as far as) it is sliced; bfloat16 is supported through
`ml_dtypes`, which the `safetensors` package's numpy API lacks.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  """A file that is not valid safetensors."""


class SafetensorsFile:
  """A memory-mapped safetensors file: `names()`, `shape(name)`, `get(name)`."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
      (header_len,) = struct.unpack("<Q", prefix)
      if header_len > os.path.getsize(self.path) - 8:
        raise SafetensorsError(f"{self.path}: header length {header_len} exceeds the file size "
                               "(truncated or corrupted, or not a safetensors file)")
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{self.path}: unreadable JSON header ({e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._entries = header
    self._data_start = 8 + header_len
    size = os.path.getsize(self.path) - self._data_start
    ends = [(e["data_offsets"][1], name) for name, e in header.items()
            if isinstance(e, dict) and len(e.get("data_offsets", ())) == 2]
    if ends and max(ends)[0] > size:
      raise SafetensorsError(f"{self.path} is truncated or corrupted: tensor {max(ends)[1]!r} ends "
                             f"at byte {max(ends)[0]} of a {size}-byte data section")
    self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start,
                           shape=(size,)) if size else np.zeros((0,), np.uint8)

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy view of the mapped file (no copy)."""
    entry = self._entries[name]
    if entry["dtype"] not in _DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    dtype = _DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise SafetensorsError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
    return self._data[begin:end].view(dtype).reshape(shape)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` to `path` (atomically: a temporary file is renamed at the end)."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for name, array in tensors.items():
    array = np.ascontiguousarray(array)
    if array.dtype not in _NAMES:
      raise SafetensorsError(f"cannot store tensor {name!r} of dtype {array.dtype}")
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # align the data section
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in arrays:
      f.write(array.tobytes())
  os.replace(tmp, path)


def iter_checkpoint_files(directory: str | os.PathLike) -> Iterator[tuple[str, SafetensorsFile]]:
  """Yields (tensor name, file) for every tensor of a HF checkpoint directory.

  Uses `model.safetensors.index.json` when present, else every `*.safetensors`.
  """
  directory = os.fspath(directory)
  index_path = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path, encoding="utf-8") as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise SafetensorsError(f"{index_path}: no 'weight_map' object")
    files: dict[str, SafetensorsFile] = {}
    for name, filename in weight_map.items():
      if filename not in files:
        path = os.path.join(directory, filename)
        if not os.path.exists(path):
          raise FileNotFoundError(f"{index_path} names {filename}, which is not in {directory}")
        files[filename] = SafetensorsFile(path)
      if name not in files[filename]:
        raise SafetensorsError(f"{index_path} maps {name!r} to {filename}, which lacks it")
      yield name, files[filename]
    return
  paths = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
  if not paths:
    raise FileNotFoundError(f"no *.safetensors files in {directory}")
  for p in paths:
    st = SafetensorsFile(os.path.join(directory, p))
    for name in st.names():
      yield name, st
