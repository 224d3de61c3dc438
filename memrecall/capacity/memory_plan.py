"""Per-device memory of a recipe's programs, estimated before any device is touched.

Two levels:

* `plan` (launch/plan.py --model): parameters and AdamW moments of a model on a mesh of
  the given axis sizes, exact from the shapes and the logical-axis rules, plus what a train
  step holds beside them, by the same terms as a recipe's turn (gradients, gathered weights,
  LM head and logits, remat inputs).
* `estimate_programs` (launch/plan.py --config): every program a stage runs, as
  `aot.recipe_programs` builds it for compilation (the trainer's and evaluation's own
  builders).  Each program's arguments and what the trainer holds beside them come exactly
  from those abstract arrays; its temporaries are a sum of named terms, each a formula of
  the model's shapes and the recipe, for the phase of the program that needs the most
  (the largest sum over its phases).  `Term.formula` says how each number was computed.

What the terms count (E hidden, F MLP width, V vocabulary, L layers, K key/value heads, D
head size, G = query heads / K; b rows per device; dt bytes of the compute dtype):

* KV of n positions for b rows: b x n x L x 2 (k, v) x K x D x dt.  The rollout's and
  evaluation's bank holds N chunks of S = C/r slots per row; a decode cache holds the
  chunk's slots, the prompt and the room for what it writes.
* Gathered weights: fsdp shards each weight over its embed dimension; a layer's matmuls
  all-gather it, and the LM head (V x E x dt, 1 GiB at 7B) is gathered whole.
* Logits over the vocabulary: the LM head's bf16 output and its float32 copy for the
  log-softmax, over the tokens a turn scores; a train step also holds their gradient.
* Remat: a layer scan under full remat saves each layer's input (L x b x T x E x dt) and
  recomputes the rest one layer at a time in the backward pass.
* Attention scores: float32, one block of QUERY_BLOCK query rows (x G heads) against the
  keys it may see, at a time (`attention.attend` runs the blocks in turn).
* A prefill's hidden states: the residual stream (whole on every device) beside the layer's
  queries and attention output (split over tensor), b x prompt x (E + 2E/t) x dt.
* The MLP: one chunk of `mlp_chunk_tokens` rows x positions where the MLP runs in chunks;
  the scored tokens' logits one chunk of `head_chunk_tokens` at a time, likewise.
* Gradients and optimizer temporaries: parameter-sized buffers of the trainable leaves
  (the microbatch's gradient, the accumulated one, AdamW's update).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from memrecall import readers
from memrecall.capacity import aot
from memrecall.models.config import ModelConfig
from memrecall.models.qwen2 import QUERY_BLOCK, abstract_params, token_chunks
from memrecall.runtime import sharding as sharding_lib
from memrecall.train import state as state_lib
from memrecall.train import trainer

GiB = 1024 ** 3


class _AxisSizes:
  """Stands in for a Mesh where only `.shape` is read."""

  def __init__(self, sizes: Mapping[str, int]):
    self.shape = {a: int(sizes.get(a, 1)) for a in sharding_lib.MESH_AXES}


def sharded_bytes(shape, dtype, logical_axes, mesh_sizes: Mapping[str, int]) -> int:
  """Bytes one device holds of an array sharded by the rules table."""
  mesh = _AxisSizes(mesh_sizes)
  spec = sharding_lib.logical_to_spec(logical_axes, shape, mesh)
  split = 1
  for entry in spec:
    for axis in (entry if isinstance(entry, tuple) else (entry,)):
      if axis is not None:
        split *= mesh.shape[axis]
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // split


@dataclasses.dataclass
class MemoryPlan:
  """Per-device bytes of one train step (`plan`); `terms` are what `gradients` and
  `activations` are made of, as the recipe estimator names them."""
  params: int
  optimizer: int
  gradients: int
  activations: int
  memory_bank: int
  devices: int
  terms: list = dataclasses.field(default_factory=list)

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.activations + self.memory_bank


def plan(config: ModelConfig, mesh_sizes: Mapping[str, int], *, trainable: str = "backbone",
         batch: int = 1, turn_tokens: int = 2048, bank_chunks: int = 0, slots: int = 1024,
         microbatches: int = 1) -> MemoryPlan:
  """Per-device bytes of a train step over teacher-forced turns: parameters and AdamW moments
  (exact from the shapes and the rules), and what the step holds beside them as the recipe
  estimator counts a turn's backward pass (`_gradient_terms`, `_turn_terms`): the gradient
  buffers of the trainable leaves, a layer's gathered weights, the LM head and the logits with
  their gradient, the remat layer inputs; plus a bank of `bank_chunks` chunks.

  batch: rows (questions x rollouts) per step; turn_tokens: tokens of one teacher-forced turn
  (compressed slots + prompt + memory update), every one scored; b, the rows per device of one
  microbatch: batch / (data x fsdp x microbatches).
  """
  boxed = abstract_params(config)
  flat = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  param_bytes = sum(sharded_bytes(leaf.value.shape, leaf.value.dtype, leaf.names, mesh_sizes)
                    for leaf in flat)
  paths = {tuple(p) for p in state_lib.trainable_paths(
      jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)),
      trainable)}
  trained = sum(sharded_bytes(leaf.value.shape, leaf.value.dtype, leaf.names, mesh_sizes)
                for path, leaf in flax_flatten(boxed).items() if path in paths)
  s = _ModelShapes(config, mesh_sizes)
  rows = max(1, math.ceil(batch / (s.batch_shards * microbatches)))
  # A turn's backward in the recipes' block loop (sft and rl): `_gradient_copies`.
  copies = _gradient_copies("sft", microbatches > 1, config.remat_blocks, compressing=False)
  terms = [t for t in _gradient_terms(s, trained, copies)
           + _turn_terms(s, rows, turn_tokens, turn_tokens, "the turn's tokens") if t.bytes]
  gradients = sum(t.bytes for t in terms if t.name == "gradients")
  bank_shape = (bank_chunks, config.num_layers, 2, slots, config.num_kv_heads, config.head_dim)
  bank = sharded_bytes(bank_shape, config.jnp_dtype, ("chunks", None, None, None, "act_kv_heads",
                                                      None), mesh_sizes) if bank_chunks else 0
  return MemoryPlan(params=param_bytes, optimizer=2 * trained, gradients=gradients,
                    activations=sum(t.bytes for t in terms) - gradients, memory_bank=bank,
                    devices=math.prod(s.sizes.values()), terms=terms)


def flax_flatten(tree) -> dict:
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  return flax.traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))


# --- every program of a recipe ------------------------------------------------


@dataclasses.dataclass
class Term:
  """One named part of an estimate: bytes per device and the formula that gave them."""
  name: str
  bytes: int
  formula: str


@dataclasses.dataclass
class Estimate:
  """A program's estimate: exact arguments and held arrays, temporaries by phase."""
  program: str
  arguments: int
  held: int
  phases: dict[str, list[Term]]

  @property
  def phase(self) -> str:
    """The phase that needs the most temporaries."""
    return max(self.phases, key=lambda p: sum(t.bytes for t in self.phases[p]))

  @property
  def temporaries(self) -> int:
    return sum(t.bytes for t in self.phases[self.phase]) if self.phases else 0

  @property
  def total(self) -> int:
    return self.arguments + self.held + self.temporaries

  def to_json(self) -> dict:
    return {"program": self.program, "arguments_gib": self.arguments / GiB,
            "held_gib": self.held / GiB, "temporaries_gib": self.temporaries / GiB,
            "total_gib": self.total / GiB, "phase": self.phase,
            "phases": {p: [dataclasses.asdict(t) | {"gib": t.bytes / GiB} for t in terms]
                       for p, terms in self.phases.items()}}


class _ModelShapes:
  """The model's sizes on a mesh: what the terms that need no recipe are formulas of."""

  def __init__(self, m: ModelConfig, mesh_sizes: Mapping[str, int]):
    self.model = m
    self.sizes = _AxisSizes(mesh_sizes).shape
    self.batch_shards = self.sizes["data"] * self.sizes["fsdp"]
    self.tensor = self.sizes["tensor"]
    self.dt = np.dtype(m.jnp_dtype).itemsize
    self.E, self.F, self.V = m.hidden_size, m.intermediate_size, m.vocab_size
    self.L, self.H, self.K, self.D = m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim
    self.G = self.H // self.K
    # What the rules split the query heads' and the MLP's activations into (1 where the tensor
    # axis does not divide them: those stay whole on every device).
    mesh = _AxisSizes(self.sizes)
    self.tensor_heads = sharding_lib.logical_split("act_heads", mesh, self.H)
    self.tensor_mlp = sharding_lib.logical_split("act_mlp", mesh, self.F)
    # One layer's weights in the compute dtype as its matmuls read them: gathered over fsdp,
    # still split over tensor (the stacked `layers` subtree / L).
    gathered = {**self.sizes, "fsdp": 1}
    layers = jax.tree.leaves(abstract_params(m)["layers"],
                             is_leaf=lambda x: isinstance(x, nn.Partitioned))
    self.layer_bytes = sum(sharded_bytes(x.value.shape, m.jnp_dtype, x.names, gathered)
                           for x in layers) // self.L

  def kv(self, rows: int, positions: int) -> int:
    return rows * positions * self.L * 2 * self.K * self.D * self.dt // self.tensor_kv

  @property
  def tensor_kv(self) -> int:
    return self.tensor if self.K % self.tensor == 0 else 1

  def kv_formula(self, rows: int, positions: str, n: int) -> str:
    return (f"{rows} rows x {positions} = {n} positions x L {self.L} x 2 x K {self.K} x "
            f"D {self.D} x {self.dt} B")

  @property
  def head(self) -> int:
    return self.V * self.E * self.dt // self.tensor

  def logits(self, rows: int, tokens: int, copies_f32: int = 1) -> int:
    return rows * tokens * self.V * (self.dt + 4 * copies_f32) // self.tensor


class _Shapes(_ModelShapes):
  """The model's and recipe's sizes that the terms are formulas of."""

  def __init__(self, run, mesh_sizes: Mapping[str, int]):
    super().__init__(run.model, mesh_sizes)
    self.run = run
    c = run.compressor
    self.C, self.W, self.r, self.S = c.chunk_size, c.window, c.ratio, c.chunk_size // c.ratio
    self.N = run.num_chunks
    self.Q, self.M, self.A = run.question_tokens, run.reasoner.memory_size, \
        run.reasoner.answer_tokens
    self.Mc = run.memory_capacity
    p = run.prompts
    self.raw = not readers.reader_class(run.reader_name()).compressed  # raw sections (MemAgent)
    # Rendered prompt lengths (the recipe's templates and tokenizer).
    self.P_update = (p.memagent.length(self.Q, self.Mc, self.C) if self.raw
                     else p.update.length(self.Q, self.Mc))
    self.P_final = p.final.length(self.Q, self.Mc)
    self.P_gate = p.gate.length(self.Q, self.Mc) if run.model.has_gate else 0

  def rows(self, n: int) -> int:
    """Rows per device of an n-row batch under the rules table: split over the batch axes
    that divide it (16 questions on data 4 x fsdp 8: 4 per device)."""
    return n // sharding_lib.logical_split("batch", _AxisSizes(self.sizes), n)

  def chunks(self, n: int) -> int:
    """Chunks per device that compression writes for n rows: the chunk axis (n x N) split as
    the rules split `chunks` (`compress` groups each device's own chunks)."""
    total = n * self.N
    return total // sharding_lib.logical_split("chunks", _AxisSizes(self.sizes), total)


def _head_term(s: _ModelShapes, copies: int, why: str) -> Term:
  return Term("LM head gathered", copies * s.head,
              f"{copies} x V {s.V} x E {s.E} x {s.dt} B ({why})")


def _chunk(rows: int, tokens: int, chunk_tokens: int) -> tuple[int, str]:
  """The positions live at once where a computation runs in chunks of `chunk_tokens`
  (`qwen2.in_token_chunks`), and how the formula names them."""
  chunks = token_chunks(rows, tokens, chunk_tokens)
  if chunks is None:
    return tokens, f"{tokens} tokens"
  return chunks[1], f"{chunks[1]} of {tokens} tokens (a chunk)"


def _logits_term(s: _ModelShapes, rows: int, tokens: int, what: str, gradient: bool = False
                 ) -> Term:
  """The LM head's output and its float32 log-softmax over the scored tokens, one chunk of
  `model.head_chunk_tokens` at a time (`qwen2.token_logprobs`); with a gradient, in one
  piece the log-softmax is kept for the backward beside the logits' float32 gradient, in
  chunks each chunk's is recomputed there and fused into that gradient (one float32 copy:
  the compressor's 7B step, 10.26 GiB estimated so and 11.42 with two copies, allocates 9.94
  on an H100 and 9.68 on a v5p chip)."""
  width, count = _chunk(rows, tokens, s.model.head_chunk_tokens)
  f32_copies = 2 if gradient and width == tokens else 1
  return Term(f"logits: {what}", s.logits(rows, width, f32_copies),
              f"{rows} rows x {count} x V {s.V} x ({s.dt} B + {f32_copies} x 4 B float32)")


def _mlp_term(s: _ModelShapes, rows: int, tokens: int) -> Term:
  """One layer's MLP activation (the compiled programs fuse silu(gate) x up into one), over
  one chunk of `model.mlp_chunk_tokens` where the MLP runs in chunks."""
  width, count = _chunk(rows, tokens, s.model.mlp_chunk_tokens)
  return Term("one layer's MLP", rows * width * s.F * s.dt // s.tensor_mlp,
              f"{rows} rows x {count} x F {s.F} x {s.dt} B{_split(s.tensor_mlp)}")


def _split(parts: int) -> str:
  """How a formula says that its term is split over tensor (nothing where it is not)."""
  return f" / tensor {parts}" if parts > 1 else ""


def _scores_term(s: _ModelShapes, rows: int, keys: int, what: str) -> Term:
  """Float32 scores of one query block; split over tensor only where it divides the heads."""
  return Term(f"attention scores: {what}",
              rows * s.H * QUERY_BLOCK * keys * 4 // s.tensor_heads,
              f"{rows} rows x H {s.H} x {QUERY_BLOCK} query rows x {keys} keys x 4 B"
              f"{_split(s.tensor_heads)}")


def _decode_phase(s: _Shapes, rows: int, slots: int, prompt: int, room: int, what: str,
                  whole_weights: bool = False) -> list[Term]:
  """A prompt prefilled into a cache of slots + prompt + room, then decoded: the cache (k and
  v) as built by concatenating the chunk's slots and as the prefill writes it (with no slots
  the prefill writes the empty cache in place: one copy), the LM head gathered for the
  logits (not with whole weights on every device), one layer's MLP and one block of attention
  scores over the prompt."""
  n = slots + prompt + room
  copies, why = (2, "built, prefilled") if slots else (1, "prefilled in place")
  # Gathered over fsdp; nothing to gather with whole weights or without an fsdp axis.
  gathered = not whole_weights and s.sizes["fsdp"] > 1
  head = [_head_term(s, 1, "the next-token logits")] if gathered else []
  return [Term(f"decode cache: {what}", copies * s.kv(rows, n),
               f"{copies} ({why}) x " + s.kv_formula(rows, f"{slots} + {prompt} + {room}", n)),
          *head, *_prefill_terms(s, rows, prompt, n, "the prefill")]


def _prefill_terms(s: _Shapes, rows: int, tokens: int, keys: int, what: str) -> list[Term]:
  """One layer of a many-token forward pass: the residual stream (whole on every device)
  beside the layer's queries and attention output (split over tensor), its MLP and one block
  of attention scores over `keys`."""
  return [Term(f"{what}'s residual stream, queries and attention output",
               rows * tokens * (s.E + 2 * s.E // s.tensor_heads) * s.dt,
               f"{rows} rows x {tokens} tokens x (E {s.E} + 2 x E / tensor {s.tensor_heads}) x "
               f"{s.dt} B"),
          _mlp_term(s, rows, tokens),
          _scores_term(s, rows, keys, f"one query block of {what}")]


def _bank_term(s: _Shapes, rows: int, copies: int, what: str) -> Term:
  n = s.N * s.S
  return Term(what, copies * s.kv(rows, n),
              f"{copies} x " + s.kv_formula(rows, f"N {s.N} x S {s.S}", n))


def _rollout(s: _Shapes, n: int, what: str, whole_weights: bool = False
             ) -> dict[str, list[Term]]:
  """The recall loop over each of n rows' own document (rollout, evaluation): its chunks
  compressed (each device its own) into a bank (the chunk-major copy the loop reads), then
  each memory update decoded from one chunk's slots; MemAgent reads raw sections instead.
  whole_weights: every device holds the whole model (evaluation's replicated weights)."""
  phases = {}
  # The bank is placed with its rows (`recall.recall_documents`).  Where the rows split over
  # fewer devices than the batch axes (16 questions on 32 chips) the compiler may spread a row
  # group's prefill over the devices that share it: the estimate is then an upper bound.
  rows = bank = s.rows(n)
  if not s.raw:
    chunks = s.chunks(n)
    phases["compression"] = [
        Term(f"{what}: compressed chunks", s.kv(1, chunks * s.S),
             s.kv_formula(1, f"{chunks} chunks x S {s.S}", chunks * s.S)),
        _bank_term(s, bank, 1, f"{what}: the bank")]
    read = [_bank_term(s, bank, 1, f"{what}: the bank")]
    slots = s.S
  else:
    read, slots = [], 0
  phases["memory updates"] = read + _decode_phase(s, rows, slots, s.P_update, s.M, "update",
                                                  whole_weights)
  phases["answer"] = read + _decode_phase(s, rows, 0, s.P_final, s.A, "answer", whole_weights)
  return phases


def _train_turns(s: _Shapes, rows: int) -> list[Term]:
  """One teacher-forced memory update (the largest turn) in the backward pass of its block;
  the LM head runs on its M written tokens only."""
  return _turn_terms(s, rows, s.P_update + s.M, s.M, "the written tokens", 0 if s.raw else s.S)


def _turn_terms(s: _ModelShapes, rows: int, t: int, scored: int, what: str, slots: int = 0
                ) -> list[Term]:
  """A turn of `t` tokens after `slots` compressed slots in the backward pass: its saved layer
  inputs, its prefix cache, one layer recomputed, the LM head and the logits of its `scored`
  tokens with their gradient."""
  terms = [Term("remat: the turn's layer inputs", s.L * rows * t * s.E * s.dt,
                f"L {s.L} x {rows} rows x {t} tokens x E {s.E} x {s.dt} B"),
           _mlp_term(s, rows, t), _scores_term(s, rows, slots + t, "one query block")]
  if slots:  # the chunk's slots and room for the turn (MemAgent's raw turns have none)
    terms.append(Term("prefix cache of the turn", s.kv(rows, slots + t),
                      s.kv_formula(rows, f"{slots} + {t}", slots + t)))
  return terms + [_head_term(s, 3, "forward, backward, and its gradient"),
                  _logits_term(s, rows, scored, f"{what}, and their gradient", True)]


def _compression_backward(s: _Shapes, rows: int) -> list[Term]:
  """A chunk's compression in the backward pass of its block (remat), for the device's `rows`:
  the windows' saved layer inputs, the first windows' beacon K/V (the later windows' prefix)
  and the windows' masks (docs/2026-12-05-compression-per-device.md)."""
  windows, g = s.C // s.W, s.W // s.r
  w = s.W + g
  inputs = windows * rows * s.L * w * s.E * s.dt
  prefix = s.kv(rows, (windows - 1) * g)
  masks = sum(rows * w * (i * g + w) for i in range(windows))
  return [Term("remat: the compression windows' layer inputs", inputs,
               f"{windows} windows x {rows} rows x L {s.L} x {w} positions x E {s.E} x {s.dt} B"),
          Term("the windows' beacon K/V prefix", prefix,
               s.kv_formula(rows, f"{windows - 1} x {g}", (windows - 1) * g)),
          Term("the windows' masks", masks,
               f"{rows} rows x {w} queries x (prefix + {w}) keys x 1 B, summed over {windows} "
               "windows")]


def _gradient_copies(stage: str, microbatched: bool, remat_blocks: bool, compressing: bool
                     ) -> tuple[int, str]:
  """Float32 buffers of the trainable leaves' size a train step holds at once: the sum over
  microbatches, the block loop's gradient carry (which starts from the answer turn's,
  `trajectory.blocks_then_answer`; with `model.remat_blocks=False` the answer's are a buffer
  of their own), and the weight gradients of each layer scan of the block
  whose backward has run (its turn or gate prompt first, then, `compressing`, the
  compression's: one scan for all the chunk's windows, `compressor._window_layers`), which JAX
  adds into the carry only at the end of the block's backward (the TPU compile's buffers,
  docs/2026-12-06-compression-layer-loop.md).  The compressor stage has no block loop;
  microbatched: the step runs in more than one microbatch."""
  parts = ["the microbatches' sum"] if microbatched else []
  if stage == "compressor":
    parts.append("the compression's layer scan")
  else:
    parts += ["the block loop's carry", "the turn's layer scan"]
    if not remat_blocks and stage != "gate":  # plain autodiff's block loop
      parts.append("the answer turn's, added after the block loop's backward")
    if compressing:
      parts.append("the compression's layer scan")
  return len(parts), ", ".join(parts)


def _recipe_gradient_copies(s: _Shapes, compressing: bool) -> tuple[int, str]:
  config = s.run.config
  return _gradient_copies(config.stage, trainer.microbatches_of(config, s.batch_shards) > 1,
                          s.model.remat_blocks, compressing)


def _gradient_terms(s: _ModelShapes, trainable: int, copies: tuple[int, str]) -> list[Term]:
  """What every train step's backward pass holds besides activations: the gradients
  (`copies`, from `_gradient_copies`), one layer's weights gathered over fsdp (for the layer's
  recompute and for its backward; still split over tensor; without fsdp only a cast from the
  master weights' dtype copies them), and the stacked MLP kernels copied into the layout the
  backward's matmuls read them in."""
  fsdp = s.sizes["fsdp"]
  count, why = copies
  terms = [Term("gradients", count * trainable,
                f"{count} x the trainable leaves' {trainable / GiB:.3f} GiB per device ({why})")]
  if fsdp > 1 or s.model.jnp_param_dtype != s.model.jnp_dtype:
    what = "gathered" if fsdp > 1 else f"cast to {s.model.dtype}"
    terms.append(Term(f"one layer's weights {what}", 2 * s.layer_bytes,
                      f"2 (its recompute, its backward) x one layer's {s.layer_bytes / GiB:.3f} "
                      f"GiB of weights, {what}{_split(s.tensor)}"))
  return terms + [Term("MLP kernels in the backward's layout",
                       2 * s.L * s.E * s.F * s.dt // (fsdp * s.tensor),
                       f"2 kernels x L {s.L} x E {s.E} x F {s.F} x {s.dt} B / fsdp {fsdp}"
                       f"{_split(s.tensor)}")]


def _block_residuals(s: _Shapes, rows: int, turn_tokens: int, logits: bool) -> list[Term]:
  """With `model.remat_blocks=False`, what the forward keeps of every one of the N blocks for
  the backward (else it recomputes one block at a time): the turn's layer inputs, the written
  tokens' float32 log-probabilities (logits) and one copy of what the chunk's compression
  keeps for its backward (`_compression_backward`).  Checked against the TPU compile of
  `lychee.py:sft,7b,v5p-64` (docs/2026-12-05-memory-and-traffic.md)."""
  if s.model.remat_blocks:
    return []
  per_block = s.L * rows * turn_tokens * s.E * s.dt
  formula = f"L {s.L} x {rows} rows x {turn_tokens} tokens x E {s.E} x {s.dt} B"
  if logits and token_chunks(rows, s.M, s.model.head_chunk_tokens) is None:
    # (scored in chunks, each chunk's logits are recomputed in the backward pass instead)
    per_block += rows * s.M * s.V * 4 // s.tensor
    formula += f" + {rows} rows x M {s.M} x V {s.V} x 4 B"
  if not s.raw:
    compression = sum(t.bytes for t in _compression_backward(s, rows))
    per_block += compression
    formula += f" + one copy of the compression's backward terms, {compression / GiB:.2f} GiB"
  return [Term("every block's residuals (model.remat_blocks=False)", s.N * per_block,
               f"N {s.N} blocks x ({formula})")]


def _train_step(s: _Shapes, trainable: int) -> dict[str, list[Term]]:
  config = s.run.config
  k = trainer.microbatches_of(config, s.batch_shards)
  stage = config.stage
  rows_mb = config.train.batch_size // k  # the microbatch's rows, all batch shards
  rows = max(1, math.ceil(rows_mb / s.batch_shards))
  grads = _gradient_terms(s, trainable, _recipe_gradient_copies(s, compressing=not s.raw))
  if stage == "compressor":
    w = s.W + s.W // s.r
    windows = s.C // s.W
    return {"backward": grads + [
        Term("remat: the windows' layer inputs", windows * s.L * rows * w * s.E * s.dt,
             f"{windows} windows x L {s.L} x {rows} rows x {w} positions x E {s.E} x {s.dt} B"),
        _head_term(s, 1, "gathered for the windows' logits"),
        _logits_term(s, rows, s.C, "every raw token, and their gradient", True),
        _mlp_term(s, rows, w)]}
  if stage == "gate":
    # The gate's adapters only: compression and the gate prompt need no backward through
    # the backbone beyond the adapters'; no logits.
    t = s.P_gate
    return {"backward": grads + [
        Term("remat: the gate prompt's layer inputs", s.L * rows * t * s.E * s.dt,
             f"L {s.L} x {rows} rows x {t} tokens x E {s.E} x {s.dt} B"),
        Term("compressed chunk and the gate's cache", s.kv(rows, 2 * s.S + t),
             s.kv_formula(rows, f"2 x {s.S} + {t}", 2 * s.S + t)),
        _mlp_term(s, rows, s.W + s.W // s.r)] + _block_residuals(s, rows, t, False)}
  answer = s.P_final + s.A
  answer_inputs = Term("remat: the answer turn's layer inputs", s.L * rows * answer * s.E * s.dt,
                       f"L {s.L} x {rows} rows x {answer} tokens x E {s.E} x {s.dt} B")
  residuals = _block_residuals(s, rows, s.P_update + s.M, True)
  phases = {"a turn's backward": (_gradient_terms(s, trainable,
                                                  _recipe_gradient_copies(s, False)) + residuals
                                  + _train_turns(s, rows) + [answer_inputs])}
  if not s.raw:
    phases["compression's backward"] = (grads + residuals
                                        + [_head_term(s, 1, "gathered for the turns")]
                                        + _compression_backward(s, rows) + [answer_inputs])
  return phases


def _reference(s: _Shapes, rows: int) -> dict[str, list[Term]]:
  """The teacher-forced log-probs of every turn of every rollout (no gradient): per block,
  the chunk compressed, the turn's prefix cache, one layer of the turn's forward pass, and the
  written tokens' logits."""
  t = s.P_update + s.M
  slots = 0 if s.raw else s.S
  terms = [_head_term(s, 1, "the turn's logits"),
           _logits_term(s, rows, s.M, "the written tokens"),
           *_prefill_terms(s, rows, t, slots + t, "the turn")]
  if slots:  # the chunk's slots and room for the turn, every layer (MemAgent reads no slots)
    terms.append(Term("prefix cache of the turn", s.kv(rows, slots + t),
                      s.kv_formula(rows, f"{slots} + {t}", slots + t)))
  return {"memory updates": terms}


def estimate_programs(run, programs: Sequence, mesh_sizes: Mapping[str, int] | None = None,
                      eval_batch: int = 16) -> list[Estimate]:
  """Estimates for `programs` (`aot.recipe_programs(run, ...)`, whose abstract arguments
  carry the recipe's shardings) on `run.mesh`."""
  sizes = dict(run.mesh.shape) if mesh_sizes is None else mesh_sizes
  s = _Shapes(run, sizes)
  out = []
  for program in programs:
    arguments = aot.device_bytes((program.args, program.kwargs))
    held = aot.device_bytes(program.held)
    name = program.name
    if name == "train_step":
      state = program.args[0]
      paths = state_lib.trainable_paths(state.params, run.config.train.trainable)
      trainable = aot.device_bytes(state_lib.split(state.params, paths)[0])
      phases = _train_step(s, trainable)
    elif name == "rollout":
      phases = _placed_rollout(run, s, program.inference)
    elif name in ("reference_logprobs", "policy_logprobs"):  # one scoring pass each
      phases = _reference(s, s.rows(run.config.train.batch_size))
    elif name.startswith("eval_recall_"):
      phases = _rollout(_on(run, program, s), eval_batch, "evaluation", _whole(program.args[0]))
    elif name == "answer_stream":
      phases = _stream(_on(run, program, s), _whole(program.args[0]))
    else:
      raise ValueError(f"no estimate for program {name!r}")
    out.append(Estimate(name, arguments, held,
                        {p: [t for t in terms if t.bytes] for p, terms in phases.items()}))
  return out


def _placed_rollout(run, shapes: _Shapes, placed) -> dict[str, list[Term]]:
  """The RL rollout where `rl.rollout_weights` placed its inference copy (`placed`, the
  program's `inference`): sharded, the loops gather it layer by layer (within the terms);
  whole or split over tensor, it is made once before the loops, lives through all of them,
  and the loops run on its mesh."""
  rows = run.config.train.batch_size
  if placed.weights == "sharded":
    return _rollout(shapes, rows, "rollout")
  on = _Shapes(run, dict(placed.mesh.shape))
  copy = Term(f"the rollout's inference copy ({placed.weights})", placed.device_bytes,
              "the weights in the compute dtype, per layer, "
              + ("whole" if placed.weights == "replicated"
                 else f"split over tensor {placed.mesh.shape['tensor']}"))
  return {phase: [copy] + terms for phase, terms in
          _rollout(on, rows, "rollout", placed.weights == "replicated").items()}


def _on(run, program, shapes: _Shapes) -> _Shapes:
  """The sizes of the mesh `program` runs on (evaluation's tensor placement has its own)."""
  return shapes if program.mesh is None else _Shapes(run, dict(program.mesh.shape))


def _whole(params) -> bool:
  """Whether every device holds all of `params` (abstract arrays with shardings)."""
  return all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params))


def _stream(s: _Shapes, whole_weights: bool = False) -> dict[str, list[Term]]:
  """answer.py --stream: one question, its document compressed and read a group of chunks at
  a time; the group's compressed chunks, then each update's decode."""
  g = 8  # RecallConfig.group_size, the streaming group
  n = g * s.S
  group = Term("a group's compressed chunks (and their chunk-major copy)", 2 * s.kv(1, n),
               "2 x " + s.kv_formula(1, f"{g} chunks x S {s.S}", n))
  return {"memory updates": [group] + _decode_phase(s, 1, s.S, s.P_update, s.M, "update",
                                                   whole_weights),
          "answer": _decode_phase(s, 1, 0, s.P_final, s.A, "answer", whole_weights)}
