"""A minimal progress line with rate and ETA on stderr (no dependency, safe in logs)."""

from __future__ import annotations

import sys
import time


class Progress:
  def __init__(self, total: int, label: str, stream=sys.stderr, min_interval: float = 0.5):
    self.total, self.label, self.stream = total, label, stream
    self.start = time.perf_counter()
    self.min_interval, self._last = min_interval, 0.0

  def __call__(self, done: int, total: int | None = None) -> None:
    total = total or self.total
    now = time.perf_counter()
    if done < total and now - self._last < self.min_interval:
      return
    self._last = now
    elapsed = now - self.start
    eta = elapsed / done * (total - done) if done else float("nan")
    bar = "#" * int(20 * done / max(total, 1))
    self.stream.write(f"\r{self.label} [{bar:<20}] {done}/{total} {elapsed:6.1f}s ETA {eta:6.1f}s")
    if done >= total:
      self.stream.write("\n")
    self.stream.flush()
