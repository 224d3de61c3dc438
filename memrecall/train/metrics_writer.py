"""Metrics to TensorBoard event files (no TensorFlow needed) and a JSON-lines log.

TensorBoard reads a TFRecord stream of `Event` protocol buffers; the few
fields scalar summaries need are encoded here by hand: Event{wall_time=1,
step=2, file_version=3, summary=5}, Summary{value=1}, Value{tag=1,
simple_value=2}; TFRecord frames each record with its length and masked
CRC-32C checksums.  Only process 0 writes.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

import jax

from memrecall.runtime import jsonl


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    out.append(bits | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  key = _varint((number << 3) | wire_type)
  if wire_type == 2:
    return key + _varint(len(payload)) + payload
  return key + payload


def encode_event(step: int, wall_time: float, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    event += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(
        _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
        for tag, v in scalars.items())
    event += _field(5, 2, values)
  return event


def frame(record: bytes) -> bytes:
  length = struct.pack("<Q", len(record))
  return length + struct.pack("<I", _masked_crc(length)) + record + struct.pack(
      "<I", _masked_crc(record))


class MetricsWriter:
  """Writes scalars to `logdir` (TensorBoard events + metrics.jsonl) from process 0 only."""

  def __init__(self, logdir: str, resumed_at: int = 0):
    """resumed_at: the step a run resumed from; rows logged after it (by a run killed before
    its next checkpoint) are dropped, as they are about to be logged again."""
    self.enabled = jax.process_index() == 0
    self._events = None
    self._jsonl = os.path.join(logdir, "metrics.jsonl")  # appended through `jsonl`: kill-safe
    if not self.enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    rows = jsonl.read(self._jsonl)
    if any(r.get("step", 0) > resumed_at for r in rows):
      jsonl.rewrite(self._jsonl, [r for r in rows if r.get("step", 0) <= resumed_at])
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._events = open(os.path.join(logdir, name), "ab")
    self._events.write(frame(encode_event(0, time.time(), file_version="brain.Event:2")))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._events.write(frame(encode_event(step, time.time(), scalars)))
    self._events.flush()
    jsonl.append(self._jsonl, [{"step": step, **scalars}])

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
