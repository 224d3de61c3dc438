"""Ahead-of-time compilation of a recipe's programs, and the compiler's memory plan per device.

`recipe_programs` gathers every jitted program a stage runs, each with abstract
arguments (ShapeDtypeStructs carrying NamedShardings) at the recipe's shapes: the
trainer's own (`trainer.stage_programs`: train step, RL rollout and reference pass)
and evaluation's recall loop.  `compile_rows` lowers and compiles each for the
run's mesh, whose devices may be deviceless TPUs (memrecall.capacity.tpu_slices), and
reads `memory_analysis()`: what one device holds.  Nothing is allocated, so a
7B recipe for a 32-chip slice compiles on a laptop.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from memrecall import readers
from memrecall.capacity import hlo_report
from memrecall.capacity.tpu_slices import GiB
from memrecall.method.recall import abstract_inference_layout
from memrecall.models import placement as placement_lib
from memrecall.models.qwen2 import abstract_params
from memrecall.run_builder import Run
from memrecall.runtime import sharding as sharding_lib
from memrecall.train import trainer
from memrecall.train.trainer import Program

FIT_FRACTION = 0.9  # above this share of HBM a program is reported as not fitting
# Above this share of a GPU a program that fits is marginal: the runtime's own workspaces
# (cuBLAS, cuDNN, NCCL) are outside the compiler's plan and take some of the rest.
MARGINAL_FRACTION = 0.85


def _inference_params(run: Run, params, setup, placement: placement_lib.Placement | None = None):
  """Abstract `params` in the inference layout (`recall.inference_layout`, as evaluation and
  answering run the loop), placed as `placement` says (`evaluator.on_mesh`; None: sharded by
  the rules on the run's mesh), and the setup that goes with them."""
  layout, setup = abstract_inference_layout(params, setup)
  mesh = run.mesh if placement is None else placement.mesh
  shardings = sharding_lib.param_shardings(abstract_params(setup.model), mesh)
  if placement is not None and placement.weights == "replicated":
    shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), shardings)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      layout, shardings), setup


def _replicated(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))


def _key(mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return _replicated(mesh, key.shape, key.dtype)


def host_mesh(run: Run):
  """The mesh launch/eval.py and launch/answer.py form in one process of `run`'s target: each
  process evaluates on its own devices, with the run's mesh where they can form it, else all
  of them on fsdp (`run_builder.workdir_run`).  One host of a v5p-64: 4 of its 32 chips."""
  devices = list(run.mesh.devices.flat)
  own = [d for d in devices if d.process_index == devices[0].process_index]
  if len(own) == len(devices):
    return run.mesh
  try:
    return sharding_lib.make_mesh(dict(run.mesh.shape), own)
  except sharding_lib.MeshError:
    return sharding_lib.make_mesh({"fsdp": -1}, own)


def eval_weights(run: Run, setting: str, memory_bytes: int | None) -> placement_lib.Placement:
  """Evaluation's weight placement (`placement_lib.placement`) for `run`'s inference copy on one
  process's devices (`host_mesh`), whose allocators hold `memory_bytes` each: what
  launch/eval.py --weights=`setting` picks on them, with the mesh its loop runs on."""
  setup = run.recall_setup("gate")
  layout, setup = _inference_params(run, nn.unbox(abstract_params(run.model)), setup)
  return placement_lib.placement(layout, setup.model, host_mesh(run), setting, memory_bytes)


def eval_programs(run: Run, params, *, batch: int, tokens: int, mode: str = "gate",
                  placement: placement_lib.Placement | None = None) -> list[Program]:
  """Evaluation's program for the method's reader `mode` (`evaluator.evaluate_mode`: each
  question's document compressed into a device bank, then read) for `batch` questions of
  `tokens` tokens, rows spread over the mesh's batch axes.  mode `stream`: launch/answer.py
  --stream's loop instead (one question; its document compressed and read a group of chunks
  at a time: the reader's streaming placement).  placement: the weights' (`eval_weights`;
  None: sharded on the run's mesh), the program run on its mesh."""
  mesh = run.mesh if placement is None else placement.mesh
  if mode == "stream":
    return [_stream_program(run, params, tokens, placement, mesh)]
  layout, setup = _inference_params(run, params, run.recall_setup(mode), placement)
  c = run.compressor.chunk_size
  n = -(-tokens // c)
  q = run.question_tokens
  rows = trainer.abstract_batch(
      (jax.ShapeDtypeStruct((batch, n, c), np.int32), jax.ShapeDtypeStruct((batch, n, c), bool),
       jax.ShapeDtypeStruct((batch, q), np.int32), jax.ShapeDtypeStruct((batch, q), bool)),
      mesh)
  reader = readers.get(mode, setup, run.compressor)
  return [Program(f"eval_recall_{mode}", *reader.call(layout, rows, _key(mesh)), mesh=mesh)]


def _stream_program(run: Run, params, tokens: int, placement, mesh) -> Program:
  layout, setup = _inference_params(run, params, run.recall_setup("gate"), placement)
  c, g = run.compressor.chunk_size, setup.recall.group_size
  n = -(-tokens // c)
  n += -n % g  # padded to whole groups, as launch/answer.py does
  q = run.question_tokens
  reader = readers.get("gate", setup, run.compressor, placement="stream")
  inputs = (_replicated(mesh, (n, 1, c), np.int32), _replicated(mesh, (n, 1, c), bool),
            _replicated(mesh, (1, q), np.int32), _replicated(mesh, (1, q), bool))
  return Program("answer_stream", *reader.call(layout, inputs, _key(mesh)), mesh=mesh)


def rollout_fields(programs: Sequence[Program]) -> dict:
  """Where the RL rollout among `programs` placed its inference copy, as records and
  launch/plan.py's rows carry it ({} without a rollout)."""
  placed = next((p.inference for p in programs if p.name == "rollout" and p.inference), None)
  return {} if placed is None else {"rollout_weights": placed.weights,
                                    "rollout_mesh": dict(placed.mesh.shape)}


def is_eval(program: str) -> bool:
  """Whether `program` is one of evaluation's (`eval_programs`), not training's."""
  return program.startswith("eval_recall_") or program == "answer_stream"


def recipe_programs(run: Run, *, eval_batch: int, eval_tokens: int,
                    eval_modes: Sequence[str] = ("gate",),
                    eval_placement: placement_lib.Placement | None = None,
                    device_memory: int | None = None) -> list[Program]:
  """The stage's training programs, then evaluation's recall loop for each mode (a raw reader,
  MemAgent's, has no compressor to build a bank with: its rollout is its loop), its weights
  placed as `eval_placement` (`eval_weights`; None: sharded on the run's mesh) says.
  device_memory: a device's bytes, for the placements decided inside (RL's rollout)."""
  programs = trainer.stage_programs(run, device_memory)
  if run.reader().compressed and run.model.compressor:
    params = programs[0].args[0].params
    for mode in eval_modes:
      programs += eval_programs(run, params, batch=eval_batch, tokens=eval_tokens, mode=mode,
                                placement=eval_placement)
  return programs


@dataclasses.dataclass
class Row:
  """One compiled program's per-device memory (GiB) and compile time.

  argument/temp/output/alias: the compiler's memory plan; held: what the process keeps on
  device besides the arguments meanwhile (`Program.held`); total: all of it, donated
  arguments counted once."""
  program: str
  argument_gib: float
  temp_gib: float
  output_gib: float
  alias_gib: float
  total_gib: float
  hbm_gib: float
  compile_s: float
  advice: str = ""
  held_gib: float = 0.0
  compiled: bool = True  # False: the compiler refused it for lack of HBM (outputs unknown)
  # The compiler's heap simulation: bytes live at once at the program's worst moment,
  # arguments included (`peak_memory_in_bytes`); and what its buffers take once laid out
  # (`total_allocation_bytes`).  Both at most args + temp + out: `temp` adds up temporaries
  # that a loop's iterations or disjoint live ranges may share.
  peak_gib: float = 0.0
  allocation_gib: float = 0.0
  # The most any loop of the program all-gathers per iteration (hlo_report.loop_report): on
  # an fsdp mesh an inference loop that gathers the weights at every step shows them here.
  loop_gather_gib: float = 0.0
  # The most any loop all-reduces per iteration: weights split over a tensor axis sum each
  # layer's partial activations instead of gathering the layer.
  loop_reduce_gib: float = 0.0

  @property
  def share(self) -> float:
    return self.total_gib / self.hbm_gib if self.hbm_gib else float("nan")

  @property
  def fits(self) -> bool:
    return self.compiled and self.share <= FIT_FRACTION

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "share_of_hbm": self.share, "fits": self.fits}


def _advice(program: str, total: float, hbm: float, temp: float, argument: float,
            inference=None) -> str:
  """What to change where a program does not fit; inference: its copy's placement (RL's
  rollout: `Program.inference`)."""
  over = total - FIT_FRACTION * hbm
  if over <= 0:
    return ""
  if temp >= argument:
    fix = ("more microbatches (train.microbatches), a stronger remat policy (model.remat) or "
           "more fsdp/tensor devices") if program == "train_step" else (
               "fewer rows per batch or a smaller memory / answer budget")
    if inference is not None and inference.weights == "tensor":
      fix += (f", or rl.rollout_weights=sharded (on data x tensor "
              f"{inference.mesh.shape['tensor']} the rows split over data alone)")
  else:
    fix = "more fsdp or tensor devices (parameters and optimizer state shard over them)"
  return f"does not fit by {over:.2f} GiB (over {FIT_FRACTION:.0%} of {hbm:.0f} GiB): {fix}"


def fit_advice(program: str, total: float, hbm: float, temp: float, argument: float,
               inference=None, pool_fraction: float | None = None) -> str:
  """What a program of `total` GiB (`temp` of them temporaries, `argument` its arguments and
  what is held beside it) on a device of `hbm` GiB needs, as launch/compile.py and
  launch/plan.py judge it: "" where it fits.  Over FIT_FRACTION, by how much it does not fit
  (`_advice`).  On a GPU (`pool_fraction`: JAX's default pool) above that pool, the fraction
  to run with: XLA_PYTHON_CLIENT_MEM_FRACTION, which jax 0.11 and 0.12 both read (0.12 as the
  deprecated name of XLA_CLIENT_MEM_FRACTION; it refuses the two set together); above
  MARGINAL_FRACTION of the card, that it is marginal and what would make room."""
  advice = _advice(program, total, hbm, temp, argument, inference)
  if advice or not pool_fraction or total <= pool_fraction * hbm:
    return advice
  fraction = f"XLA_PYTHON_CLIENT_MEM_FRACTION={min(total / hbm + 0.05, FIT_FRACTION):.2f}"
  pool = f"above JAX's default pool ({pool_fraction:.0%} of {hbm:.0f} GiB)"
  if total <= MARGINAL_FRACTION * hbm:
    return f"{pool}: run with {fraction}"
  how = "more train.microbatches" if program == "train_step" else "a smaller batch"
  return (f"{pool} and marginal at {total / hbm:.1%} of the card (cuBLAS and NCCL workspaces are "
          f"outside the plan): give each device fewer rows ({how}), or run with {fraction}")


def device_bytes(tree) -> int:
  """Bytes one device holds of abstract arrays (ShapeDtypeStructs with shardings)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if not hasattr(leaf, "sharding"):  # a Python scalar (e.g. the gate's threshold)
      total += np.asarray(leaf).nbytes
      continue
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    dtype = leaf.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # a typed key: its raw data's bytes
      dtype, shape = np.uint32, tuple(shape) + jax.eval_shape(
          lambda: jax.random.key_data(jax.random.key(0))).shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  return total


_SIZE = r"([0-9.]+)([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _hbm_oom_gib(message: str) -> float | None:
  """GiB the TPU compiler's out-of-memory refusal says a program needs ("the total memory
  required for HLO temporaries (26.83G) exceeds available HBM (15.75G)", or "Used 17.5G of
  15.48G hbm"), None for any other error.  The figure includes the program's arguments
  despite its wording: 2.5 GiB more arguments to the same program raised it by 2.5 GiB
  (a deviceless v5e, 2026-12-07)."""
  for pattern in (r"required for HLO temporaries \(" + _SIZE + r"\)",
                  r"Used " + _SIZE + r" of " + _SIZE + r" hbm"):
    found = re.search(pattern, message)
    if found:
      return float(found[1]) * _UNITS[found[2]] / GiB
  return None


def compile_program(program: Program, mesh, hbm_bytes: float,
                    pool_fraction: float | None = None, hlo_dir: str | None = None) -> Row:
  """Lowers and compiles one program for its own mesh (else `mesh`) and reads the compiler's
  memory plan.  A program the TPU compiler refuses for lack of HBM is a row too: its
  temporaries as the refusal gives them, and by how much it does not fit.  pool_fraction: the
  share of a device's memory its runtime allocates by default (JAX's GPU pool: 0.75); a
  program that fits the device but not that share says what to set.  hlo_dir: write the
  compiled program's HLO text there, as PROGRAM.hlo."""
  start = time.perf_counter()
  try:
    with jax.set_mesh(program.mesh or mesh):
      compiled = program.jitted.lower(*program.args, **program.kwargs).compile()
  except jax.errors.JaxRuntimeError as e:
    needed = _hbm_oom_gib(str(e))
    if needed is None:
      raise
    argument, held = device_bytes((program.args, program.kwargs)) / GiB, device_bytes(
        program.held) / GiB
    temp = max(needed - argument, 0.0)
    total, hbm = needed + held, hbm_bytes / GiB
    advice = _advice(program.name, total, hbm, temp, argument + held, program.inference) or (
        f"does not fit: the compiler ran out of HBM ({temp:.2f} GiB of temporaries)")
    return Row(program.name, argument, temp, 0.0, 0.0, total, hbm,
               time.perf_counter() - start, advice, held, compiled=False)
  seconds = time.perf_counter() - start
  text = compiled.as_text()
  if hlo_dir:
    with open(os.path.join(hlo_dir, f"{program.name}.hlo"), "w", encoding="utf-8") as f:
      f.write(text)
  loops, _ = hlo_report.loop_report(text)
  loop_gather = max((loop.gathered_bytes for loop in loops), default=0) / GiB
  loop_reduce = max((loop.reduced_bytes for loop in loops), default=0) / GiB
  memory = compiled.memory_analysis()
  gib = lambda name: float(getattr(memory, name, 0) or 0) / GiB
  argument, temp = gib("argument_size_in_bytes"), gib("temp_size_in_bytes")
  output, alias = gib("output_size_in_bytes"), gib("alias_size_in_bytes")
  held = device_bytes(program.held) / GiB
  # Donated arguments alias outputs: those bytes are counted once.
  total = argument + temp + output - alias + held
  hbm = hbm_bytes / GiB
  advice = fit_advice(program.name, total, hbm, temp, argument + held, program.inference,
                      pool_fraction)
  return Row(program.name, argument, temp, output, alias, total, hbm, seconds, advice, held,
             peak_gib=gib("peak_memory_in_bytes"), allocation_gib=gib("total_allocation_bytes"),
             loop_gather_gib=loop_gather, loop_reduce_gib=loop_reduce)


def compile_rows(programs: Sequence[Program], mesh, hbm_bytes: float, log=None,
                 pool_fraction: float | None = None, hlo_dir: str | None = None) -> list[Row]:
  rows = []
  for program in programs:
    rows.append(compile_program(program, mesh, hbm_bytes, pool_fraction, hlo_dir))
    if log is not None:
      log(format_row(rows[-1]))
  return rows


HEADER = (f"{'program':<24} {'args GiB':>9} {'temp GiB':>9} {'out GiB':>8} {'held GiB':>9} "
          f"{'total GiB':>10} {'of HBM':>7} {'compile s':>9} {'gathered/step GiB':>17} "
          f"{'reduced/step GiB':>16}")


def format_row(row: Row) -> str:
  """gathered/step, reduced/step: the most a loop of the program all-gathers, all-reduces
  per iteration."""
  line = (f"{row.program:<24} {row.argument_gib:>9.3f} {row.temp_gib:>9.3f} "
          f"{row.output_gib:>8.3f} {row.held_gib:>9.3f} {row.total_gib:>10.3f} {row.share:>7.1%} "
          f"{row.compile_s:>9.1f} {row.loop_gather_gib:>17.3f} {row.loop_reduce_gib:>16.3f}")
  return line + (f"  {row.advice}" if row.advice else "")
