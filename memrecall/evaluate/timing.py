"""Timing and planned device memory of compiled programs: one home for evaluation, the
benchmark, the launchers' measurements and the capacity compiles.

Compilation never counts as time: a jitted program is compiled ahead of time
(`compile_ahead`), and what is timed is the fastest of a few runs (`best_seconds`),
what the machine does without a stray pause.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Callable

from absl import logging
import jax


def compile_ahead(jitted, *args) -> tuple[object, Callable[[], object]]:
  """(compiled program, a call of it on args) for a `jax.jit` function, compiled without
  running it.  Every argument is bound by name: the compiled program takes only the non-static
  ones, and its `args_info` says which those are."""
  bound = inspect.signature(jitted).bind(*args).arguments
  began = time.perf_counter()
  compiled = jitted.lower(**bound).compile()
  # At 7B a compile takes minutes: a run cut at a time bound (the device check's) shows in its
  # log (--verbose) whether it was still compiling.
  logging.info("compiled %s in %.1f s", getattr(jitted, "__name__", "a program"),
               time.perf_counter() - began)
  dynamic = {name: bound[name] for name in compiled.args_info[1]}
  return compiled, lambda: compiled(**dynamic)


def planned_bytes(compiled, arguments=None, weights=None) -> int:
  """Device bytes of one call as XLA plans it: temporaries + arguments + outputs (an output
  written over a donated argument counted once).  With `weights` (a tree whose leaves are
  among `arguments`), the bytes beyond them: temporaries + outputs + the other arguments,
  counted from `arguments` (XLA's plan leaves out the weights a program never reads, so
  subtracting every weight from its total would undercount)."""
  stats = compiled.memory_analysis()
  held = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
  if weights is None:
    return int(held + stats.argument_size_in_bytes)
  skip = {id(leaf) for leaf in jax.tree.leaves(weights)}
  others = sum(math.prod(leaf.shape) * leaf.dtype.itemsize  # arrays, abstract ones, keys
               for leaf in jax.tree.leaves(arguments)
               if id(leaf) not in skip and hasattr(leaf, "shape") and hasattr(leaf, "dtype"))
  return int(held + others)


def compiled_bytes(jitted, *args) -> int:
  """`planned_bytes` of jitted(*args) (compiled, not run).  Lowered with the arguments as a
  call passes them, so that after jitted(*args) ran this is the program that call compiled
  (JAX's cache), not a second compile (binding them by name, as `compile_ahead` must, is)."""
  return planned_bytes(jitted.lower(*args).compile())


def timed(call: Callable[[], object], wait=jax.block_until_ready) -> tuple[object, float]:
  """(waited output, seconds) of one call; `wait` (default: block until ready; `jax.device_get`
  counts the copy to the host too) ends the clock."""
  began = time.perf_counter()
  out = wait(call())
  return out, time.perf_counter() - began


def best_seconds(call: Callable[[], object], repeats: int, wait=jax.block_until_ready) -> float:
  """The fastest of `repeats` timed calls (`timed`)."""
  return min(timed(call, wait)[1] for _ in range(repeats))


def time_compiled(jitted, repeats: int, *args, weights=None) -> tuple[float, int]:
  """(best seconds of `repeats` runs, planned bytes (beyond `weights`, see `planned_bytes`)) of
  a jitted function on args: one compile ahead of time gives both, and nothing runs untimed (at
  7B shapes one untimed run of a memory-update loop is minutes, and another compile for the
  bytes as long again).  So `repeats=1` times a program's first run."""
  compiled, call = compile_ahead(jitted, *args)
  return best_seconds(call, repeats), planned_bytes(compiled, args, weights)


def best_time(fn: Callable[..., object], repeats: int, *args) -> float:
  """Best seconds of `repeats` calls of fn(*args), compilation excluded.  A jitted fn is
  compiled ahead of time (`repeats=1` runs it once); any other fn (Python around jitted
  programs) runs once untimed to compile and warm up."""
  if hasattr(fn, "lower"):
    return time_compiled(fn, repeats, *args)[0]
  jax.block_until_ready(fn(*args))
  return best_seconds(lambda: fn(*args), repeats)
