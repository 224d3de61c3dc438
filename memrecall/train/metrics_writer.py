"""Training metrics to TensorBoard (through tensorboardX) and to a JSON-lines log.

The JSON lines are the record a run resumes from and the demo reads; TensorBoard's event
files are for watching.  Only process 0 writes.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import jax
import tensorboardX

from memrecall.runtime import jsonl


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
    # A new events file per (re)start, as TensorBoard expects (it merges them by step); the
    # suffix keeps two starts within one second (the file name's clock) apart.  Every start
    # begins its file with a purge at the step after its checkpoint (step 1 for a run killed
    # before its first): TensorBoard then drops the earlier files' points from there on, as
    # metrics.jsonl drops its rows.
    self._events = tensorboardX.SummaryWriter(
        logdir, filename_suffix=f".{time.time_ns()}", purge_step=resumed_at + 1)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for tag, value in scalars.items():
      self._events.add_scalar(tag, value, step)
    self._events.flush()
    jsonl.append(self._jsonl, [{"step": step, **scalars}])

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
