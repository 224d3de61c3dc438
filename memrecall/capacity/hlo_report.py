"""What a compiled program does per loop iteration, read from its optimized HLO text.

`loop_report(text)` lists each `while` loop's body: the kernels one iteration launches
(top-level fusions, custom calls and collectives) and the bytes it all-gathers (collectives
inside fusions and conditional branches counted with the body that runs them; nested loops
are their own rows).  On an fsdp mesh an inference loop that all-gathers the weights shows
them here at every step; `launch/compile.py --hlo_dir` writes the text to read.
"""

from __future__ import annotations

import dataclasses
import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b([a-z0-9]+)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*)$")
_CALLED = re.compile(r"(?:calls|to_apply)=%([\w.\-]+)")
# A conditional's branches, in either of its two forms.
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}|(?:true|false)_computation=(%[\w.\-]+)")
_LOOP = re.compile(r"condition=%([\w.\-]+), body=%([\w.\-]+)")
# The TPU compiler splits one collective over several "async collective fusions", each holding
# the whole collective tagged with the same chain: it is one collective, counted once.
_CHAIN = re.compile(r'chain_id="([0-9]+)"')
_KERNELS = ("fusion", "custom-call", "all-gather", "all-gather-start", "all-reduce",
            "all-reduce-start", "reduce-scatter", "all-to-all", "collective-permute",
            "collective-permute-start", "copy", "copy-start")


def array_bytes(type_text: str) -> int:
  """Bytes of every array in an HLO type (`bf16[8,128]{1,0}`, or a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in _BYTES:
      count = 1
      for d in filter(None, dims.split(",")):
        count *= int(d)
      total += count * _BYTES[dtype]
  return total


def _split_type(rest: str) -> tuple[str, str, str]:
  """`TYPE op(operands), attributes` -> (TYPE, op, the rest)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    type_text, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    type_text, _, rest = rest.partition(" ")
  op, _, rest = rest.partition("(")
  return type_text, op, rest


def _gathered_bytes(type_text: str, op: str) -> int:
  """An all-gather's result bytes: an `all-gather-start` returns (operands, results)."""
  if op == "all-gather-start" and type_text.startswith("(("):
    depth = 0
    for i, ch in enumerate(type_text[1:], 1):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return array_bytes(type_text[i + 1:])
  return array_bytes(type_text)


@dataclasses.dataclass(frozen=True)
class Loop:
  """One while loop's body per iteration: kernels launched, bytes all-gathered and bytes
  all-reduced (or reduce-scattered: tensor-parallel layers sum their partial activations)."""
  body: str
  kernels: int
  gathered_bytes: int
  op_name: str  # the JAX op the body's instructions mostly come from (jit(sample_loop)/...)
  reduced_bytes: int = 0


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
  computations, name, entry = {}, None, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      name = header[2]
      computations[name] = []
      if header[1]:
        entry = name
    elif name is not None and line.strip() not in ("", "}"):
      computations[name].append(line)
  return computations, entry


def loop_report(text: str) -> tuple[list[Loop], int]:
  """(each while loop's body per iteration, the bytes the program all-gathers outside every
  loop), from a compiled program's HLO text (`compiled.as_text()`)."""
  computations, entry = _computations(text)
  bodies = {body for _, body in _LOOP.findall(text)}

  def walk(name: str, seen: set, chains: set) -> tuple[int, int, int]:
    """(kernels, gathered bytes, reduced bytes) of `name` and what it calls, nested loops
    left out; `chains`: the collective chains already counted in this loop's body."""
    kernels = gathered = reduced = 0
    for line in computations.get(name, []):
      found = _INSTRUCTION.match(line)
      if not found:
        continue
      type_text, op, rest = _split_type(found[1])
      if op in _KERNELS:
        kernels += 1
      chain = _CHAIN.search(rest)
      counted = chain is not None and chain[1] in chains
      if chain is not None:
        chains.add(chain[1])
      if op in ("all-gather", "all-gather-start") and not counted:
        gathered += _gathered_bytes(type_text, op)
      if op in ("all-reduce", "all-reduce-start", "reduce-scatter") and not counted:
        reduced += array_bytes(type_text)
      # A conditional runs one of its branches: it costs the most any branch does.
      branches = [c for found in _BRANCHES.findall(rest)
                  for c in re.findall(r"%([\w.\-]+)", "".join(found))]
      walked = lambda names: [walk(c, seen | {c}, chains) for c in names
                              if c not in bodies and c not in seen]
      parts = walked(_CALLED.findall(rest))
      taken = walked(branches)
      if taken:
        parts.append(tuple(map(max, zip(*taken))))
      for sub_kernels, sub_gathered, sub_reduced in parts:
        gathered += sub_gathered
        reduced += sub_reduced
        if op != "fusion":  # a fusion is one kernel: what it calls adds bytes, not kernels
          kernels += sub_kernels
    return kernels, gathered, reduced

  loops = []
  for body in sorted(bodies):
    kernels, gathered, reduced = walk(body, {body}, set())
    names = re.findall(r'op_name="([^"/]+(?:/[^"/]+){0,2})',
                       "\n".join(computations.get(body, [])))
    common = max(set(names), key=names.count) if names else ""
    loops.append(Loop(body, kernels, gathered, common, reduced))
  outside = walk(entry, {entry}, set())[1] if entry else 0
  return loops, outside
