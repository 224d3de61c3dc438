"""The recall loop: gate, read and rewrite the working memory block by block, then answer.

One `lax.scan` walks the memory blocks (compressed chunks) of a batch of
questions.  Per block the gate scores it; a block no row reads costs only the
gate's forward, because the Reasoner's prefill and decode sit behind a
`lax.cond`.  Rows that do not read a block keep their memory.

Where the blocks come from:
* `recall`: a `DocumentBank` on device; the whole loop is one jitted call.
* `recall_streaming`: raw chunk ids; an outer scan compresses `group_size`
  chunks at a time and drops them once read, so device memory does not grow
  with the document.
* `recall_from_host`: a bank in host memory (e.g. memory-mapped from disk),
  fed to the device one group at a time.

Modes: `gate` (read where the probability reaches the threshold), `all` (read
every block, as the public reference does) and `topk` (read each row's k
highest-scoring blocks, scored against the initial memory in a first pass).

In `gate` mode with `gate_group` G > 1 the gate scores G blocks at once
against the current memory, reads the first that passes and goes on after it
(`_gate_in_groups`): the same decisions as one block at a time, since a score
is kept only while the memory it was computed with is still current, in about
N/G + reads sequential steps instead of N.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from memrecall.method.compressor import ChunkMemory, CompressorConfig, compress
from memrecall.method.gate import gate_context, gate_probability, score_chunks
from memrecall.method.prompts import Prompts
from memrecall.method.reasoner import (ReasonerConfig, WorkingMemory, final_answer, memory_capacity,
                                       update_memory)
from memrecall.models.config import ModelConfig
from memrecall.models.qwen2 import inference_params
from memrecall.models import sampling
from memrecall.models.sampling import SampleOutput, SamplingConfig
from memrecall.runtime.sharding import with_logical_constraint

Array = jax.Array
MODES = ("gate", "all", "topk")


_static = functools.partial(flax.struct.field, pytree_node=False)


@flax.struct.dataclass
class RecallConfig:
  """mode: gate | all | topk; threshold: the gate's cut-off; topk: blocks per row in topk mode;
  group_size: chunks compressed (streaming) or transferred (host bank) at a time;
  gate_group: blocks the gate scores in parallel per step in gate mode (1: one at a time, a
  prompt per block; more: one prompt per step, `_gate_in_groups`).

  A pytree whose only leaf is the threshold: under jit it is traced, so a threshold sweep
  reuses one compiled loop; everything else shapes the program and is static."""
  mode: str = _static(default="gate")
  threshold: float = 0.5
  topk: int = _static(default=4)
  group_size: int = _static(default=8)
  gate_group: int = _static(default=16)

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.topk <= 0 or self.group_size <= 0 or self.gate_group <= 0:
      raise ValueError(f"topk, group_size and gate_group must be positive, got {self}")


@flax.struct.dataclass
class RecallSetup:
  """Everything about a recall run but its arrays: passed to jit as a pytree whose static
  parts (model, prompts, budgets, sampling, mode) key the compiled program and whose one leaf,
  `recall.threshold`, is traced."""
  model: ModelConfig = _static()
  prompts: Prompts = _static()
  reasoner: ReasonerConfig = _static()
  recall: RecallConfig = RecallConfig()
  sampling: SamplingConfig = _static(default=SamplingConfig())

  @property
  def memory_capacity(self) -> int:
    return memory_capacity(self.prompts.initial_memory, self.reasoner)


def inference_layout(params, setup: RecallSetup) -> tuple[dict, RecallSetup]:
  """(params, setup) with one parameter subtree per layer (`ModelConfig.scan_layers=False`)
  in the compute dtype (`qwen2.inference_params`): the recall loop's decode steps then read
  each layer's weights in place instead of copying a slice of the stack at every step, and
  float32 master weights as the bfloat16 they are computed in.  One copy of the weights; a
  no-op if already so."""
  params, model_config = inference_params(params, setup.model)
  return params, setup.replace(model=model_config)


def abstract_inference_layout(params, setup: RecallSetup) -> tuple[Any, RecallSetup]:
  """`inference_layout` of `params` (arrays or abstract arrays) as abstract arrays, with its
  setup: what the inference copy will be, for deciding where it goes; nothing computed."""
  split = {}

  def layout_of(p):
    out, split["setup"] = inference_layout(p, setup)  # the setup closed over: nothing traced
    return out

  layout = jax.eval_shape(layout_of, params)
  return layout, split["setup"]


@flax.struct.dataclass
class DocumentBank:
  """Compressed blocks of Bd documents, chunk-major so that scans and host groups slice axis 0.

  k, v: [N, L, Bd, S, K, D]; slot_mask: [N, Bd, S]; chunk_valid: [N, Bd]
  (False for the padding chunks of a document shorter than the longest).
  Bd is 1 (one document shared by every question) or the question batch.
  """
  k: Array
  v: Array
  slot_mask: Array
  chunk_valid: Array

  @property
  def num_blocks(self) -> int:
    return self.k.shape[0]

  @classmethod
  def from_chunks(cls, memories: Sequence[ChunkMemory]) -> "DocumentBank":
    """Stacks the ChunkMemory of each document ([L, N_i, S, K, D]), padding to the longest."""
    if not memories:
      raise ValueError("no documents given")
    n = max(m.num_chunks for m in memories)
    def pad(x, axis):
      widths = [(0, 0)] * x.ndim
      widths[axis] = (0, n - x.shape[axis])
      return jnp.pad(x, widths)
    k = jnp.stack([pad(m.k, 1) for m in memories], axis=2)  # [L, N, Bd, S, K, D]
    v = jnp.stack([pad(m.v, 1) for m in memories], axis=2)
    slot_mask = jnp.stack([pad(m.slot_mask, 0) for m in memories], axis=1)  # [N, Bd, S]
    valid = jnp.stack([jnp.arange(n) < m.num_chunks for m in memories], axis=1)  # [N, Bd]
    return cls(k=jnp.moveaxis(k, 1, 0), v=jnp.moveaxis(v, 1, 0), slot_mask=slot_mask,
               chunk_valid=valid)


@flax.struct.dataclass
class RecallTrace:
  """Per question and block: gate score (NaN where no gate ran), whether it was read,
  the working memory after it ([B, N, Mc]), and what the update sampled: tokens and their
  log-probs [B, N, M] and how many it wrote [B, N] (0 where the block was skipped)."""
  gate_scores: Array
  read: Array
  memory_ids: Array
  memory_mask: Array
  update_tokens: Array
  update_logprobs: Array
  update_lengths: Array


@flax.struct.dataclass
class RecallOutput:
  answer: SampleOutput
  memory: WorkingMemory
  trace: RecallTrace


def _rows(x: Array, batch: int, axis: int) -> Array:
  """Broadcasts a document axis of size 1 to the question batch."""
  shape = list(x.shape)
  shape[axis] = batch
  return jnp.broadcast_to(x, shape)


def _block_inputs(block, batch):
  """(k, v, slot_mask, valid[, section, section_mask]) of one block, broadcast to the batch."""
  k, v, slot_mask, valid = block[:4]
  section = tuple(_rows(x, batch, 0) for x in block[4:]) or (None, None)
  return (_rows(k, batch, 1), _rows(v, batch, 1), _rows(slot_mask, batch, 0),
          _rows(valid, batch, 0)) + section


def loop_keys(rng: Array, batch: int) -> tuple[Array, Array]:
  """(the blocks' keys, the answer's keys) of a recall loop, one per row [B] (rng: one key, or
  one per row: `sampling.row_keys`).  The answer's are split off first, so a sampled answer
  does not depend on how many steps the loop took (a host bank's padded groups, another chunk
  budget)."""
  pairs = jax.vmap(jax.random.split)(sampling.row_keys(rng, batch))  # [B, 2]
  return pairs[:, 0], pairs[:, 1]


def scan_blocks(params, setup: RecallSetup, memory: WorkingMemory, rng: Array, blocks,
                question: Array, question_mask: Array, forced_read: Array | None,
                first_block: Array | int = 0):
  """Reads blocks (tuple of k, v, slot_mask, valid; chunk-major) in order.

  Blocks may carry raw `section, section_mask` too (the MemAgent baseline,
  with empty k/v): the update then uses the MemAgent prompt with the section.

  forced_read: [N, B] decisions replacing the threshold (topk mode, benchmarks); in `gate`
  mode the gate still runs on every block, so its cost is measured.
  rng, first_block: the rows' keys [B] (`loop_keys`); block i samples a row's update with
  `fold_in(its key, first_block + i)`, so a document read in groups (a host bank, streaming, or
  gated groups) samples as one read whole.
  Returns the final memory and the per-block (score, read, memory, ...) stacked on axis 0
  (the keys are only folded, so a later group takes the same `rng`).
  """
  batch = question.shape[0]
  gate_needed = setup.recall.mode == "gate"
  if gate_needed and setup.recall.gate_group > 1:
    return _gate_in_groups(params, setup, memory, rng, blocks, question, question_mask,
                           forced_read, first_block)

  def step(memory, xs):
    block, forced, index = xs
    k, v, slot_mask, valid, section, section_mask = _block_inputs(block, batch)
    template = setup.prompts.update if section is None else setup.prompts.memagent
    if gate_needed:
      score = gate_probability(params, setup.model, setup.prompts.gate, k, v, slot_mask, question,
                               question_mask, memory)
      read = score >= setup.recall.threshold
      score = jnp.where(valid, score, jnp.nan)  # a padding block's is no score (as topk's)
    else:
      score = jnp.full((batch,), jnp.nan, jnp.float32)
      read = jnp.ones((batch,), bool)
    read = (read if forced is None else forced) & valid
    step_rng = sampling.fold_rows(rng, index)

    def reason(memory):
      new, sample, _, _ = update_memory(params, setup.model, template, setup.reasoner,
                                        setup.sampling, k, v, slot_mask, question, question_mask,
                                        memory, step_rng, section, section_mask)
      keep = read[:, None]
      memory = WorkingMemory(jnp.where(keep, new.ids, memory.ids),
                             jnp.where(keep, new.mask, memory.mask))
      return memory, (jnp.where(keep, sample.tokens, 0), jnp.where(keep, sample.logprobs, 0.0),
                      jnp.where(read, sample.lengths, 0))

    def skip(memory):
      m = setup.reasoner.memory_size
      return memory, (jnp.zeros((batch, m), jnp.int32), jnp.zeros((batch, m), jnp.float32),
                      jnp.zeros((batch,), jnp.int32))

    memory, sampled = jax.lax.cond(read.any(), reason, skip, memory)
    return memory, (score, read, memory.ids, memory.mask) + sampled

  n = jax.tree.leaves(blocks)[0].shape[0]
  indices = jnp.arange(n, dtype=jnp.uint32) + jnp.asarray(first_block, jnp.uint32)
  memory, per_block = jax.lax.scan(step, memory, (blocks, forced_read, indices))
  return memory, per_block


def _gate_in_groups(params, setup: RecallSetup, memory: WorkingMemory, rng: Array, blocks,
                    question: Array, question_mask: Array, forced_read: Array | None = None,
                    first_block: Array | int = 0):
  """Gate mode in about N/G + reads sequential steps; the same outputs as `scan_blocks`.

  Each step scores the next G blocks of every row against the row's current
  memory and reads the first that passes (if any).  Scores up to and including
  that block are final; the rest were computed with a memory that has just
  changed, so the row's next step starts right after the block it read.
  Decisions therefore equal the one-block-at-a-time loop's; what is wasted is
  at most G - 1 scores per read.  A row samples the update of the block it reads
  with that block's key, as the scan does.  forced_read [N, B] replaces the threshold
  (benchmarks), the gate still scoring every block as it would.
  """
  k, v, slot_mask, valid = blocks[:4]  # [N, L, Bd, S, K, D], [N, Bd, S], [N, Bd]
  n, batch = k.shape[0], question.shape[0]
  g = min(setup.recall.gate_group, n)
  rows = jnp.arange(batch)

  def gather(index):  # index [B, G'] -> k, v [L, B*G', S, K, D], slot_mask [B*G', S], valid [B, G']
    # Each row takes blocks of its own document, its row of the bank a batch dimension of the
    # gather (vmap), so a mesh that splits the rows gathers on each device from its own rows;
    # indexing the row axis with `rows` instead made XLA all-gather the whole bank to every
    # device at every step.  One document shared by every row (Bd = 1) is not split.
    if k.shape[2] > 1:
      take = lambda x, axis: jax.vmap(lambda xb, i: xb[i], in_axes=(axis, 0))(x, index)
    else:
      take = lambda x, axis: jnp.take(x, index, axis=0).squeeze(axis + 1)
    # [B, G', L, S, K, D] -> [L, B*G', S, K, D]
    flat = lambda x: jnp.moveaxis(x, 2, 0).reshape((x.shape[2], -1) + x.shape[3:])
    return (flat(take(k, 2)), flat(take(v, 2)),
            take(slot_mask, 1).reshape((-1, slot_mask.shape[-1])), take(valid, 1))

  capacity, m = memory.ids.shape[1], setup.reasoner.memory_size
  per_block = (jnp.full((n, batch), jnp.nan, jnp.float32), jnp.zeros((n, batch), bool),
               jnp.zeros((n, batch, capacity), memory.ids.dtype), jnp.zeros((n, batch, capacity), bool),
               jnp.zeros((n, batch, m), jnp.int32), jnp.zeros((n, batch, m), jnp.float32),
               jnp.zeros((n, batch), jnp.int32))

  # One gate prompt per row, its scoring token run against each of the row's G blocks; the
  # prompt holds the memory, so it runs again only after a step that changed the memory.
  context_of = lambda memory: gate_context(params, setup.model, setup.prompts.gate, question,
                                           question_mask, memory, slots=k.shape[3])

  def step(carry):
    # position [B]: the row's next unscored block; context: the gate prompt of `memory`.
    memory, context, position, per_block = carry
    index = position[:, None] + jnp.arange(g)  # [B, G]
    in_document = index < n
    safe = jnp.minimum(index, n - 1)
    gk, gv, gmask, gvalid = gather(safe)
    score = jax.nn.sigmoid(score_chunks(params, setup.model, context, gk, gv,
                                        gmask)).reshape(batch, g)
    passed = ((score >= setup.recall.threshold) if forced_read is None
              else forced_read[safe, rows[:, None]]) & gvalid & in_document
    reads = passed.any(axis=1)  # [B]
    first = jnp.where(reads, jnp.argmax(passed, axis=1), g)  # [B]; g: none in this group
    chosen = jnp.minimum(position + first, n - 1)
    step_rng = sampling.fold_rows(rng, jnp.asarray(first_block, jnp.uint32) + chosen)

    def reason(memory):
      ck, cv, cmask, _ = gather(chosen[:, None])
      new, sample, _, _ = update_memory(params, setup.model, setup.prompts.update, setup.reasoner,
                                        setup.sampling, ck, cv, cmask, question, question_mask,
                                        memory, step_rng)
      keep = reads[:, None]
      new = WorkingMemory(jnp.where(keep, new.ids, memory.ids),
                          jnp.where(keep, new.mask, memory.mask))
      # Rows that read nothing keep their memory, so their new context equals the old one.
      return new, context_of(new), (sample.tokens, sample.logprobs, sample.lengths)

    def skip(memory):
      return memory, context, (jnp.zeros((batch, m), jnp.int32),
                               jnp.zeros((batch, m), jnp.float32), jnp.zeros((batch,), jnp.int32))

    new_memory, new_context, (tokens, logprobs, lengths) = jax.lax.cond(reads.any(), reason, skip,
                                                                        memory)
    # Write the final decisions (blocks up to the first read); the others go out of range.
    offset = jnp.arange(g)[None, :]
    is_read = offset == first[:, None]  # [B, G]
    target = jnp.where((offset <= first[:, None]) & in_document, index, n)
    after = lambda new, old: jnp.where(is_read[..., None], new[:, None], old[:, None])
    values = (jnp.where(gvalid, score, jnp.nan), is_read,  # a padding block's: no score
              after(new_memory.ids, memory.ids), after(new_memory.mask, memory.mask),
              jnp.where(is_read[..., None], tokens[:, None], 0),
              jnp.where(is_read[..., None], logprobs[:, None], 0.0),
              jnp.where(is_read, lengths[:, None], 0))
    per_block = tuple(out.at[target, rows[:, None]].set(value, mode="drop")
                      for out, value in zip(per_block, values))
    return new_memory, new_context, position + jnp.where(reads, first + 1, g), per_block

  memory, _, _, per_block = jax.lax.while_loop(
      lambda carry: (carry[2] < n).any(), step,
      (memory, context_of(memory), jnp.zeros((batch,), jnp.int32), per_block))
  return memory, per_block


def _topk_selection(params, setup: RecallSetup, blocks, question, question_mask, memory) -> tuple[Array, Array]:
  """First pass of topk mode: every block scored against `memory`; [N, B] scores and picks."""
  batch = question.shape[0]
  # One memory for every block: the gate prompt runs once.
  context = gate_context(params, setup.model, setup.prompts.gate, question, question_mask, memory,
                         slots=blocks[0].shape[3])

  def score(block):
    k, v, slot_mask, valid, _, _ = _block_inputs(block, batch)
    p = jax.nn.sigmoid(score_chunks(params, setup.model, context, k, v, slot_mask))
    return jnp.where(valid, p, -jnp.inf)

  scores = jax.lax.map(score, blocks)  # [N, B]
  return scores, _top_blocks(scores, setup.recall.topk)


def _top_blocks(scores: Array, k: int) -> Array:
  """[N, B] picks: exactly min(k, N) valid blocks per row (ties go to the earlier block)."""
  k = min(k, scores.shape[0])
  picked = jax.lax.top_k(scores.T, k)[1]  # [B, k]
  chosen = jnp.zeros(scores.T.shape, bool).at[jnp.arange(scores.shape[1])[:, None], picked].set(True)
  return chosen.T & jnp.isfinite(scores)


def finish_answer(params, setup, question, question_mask, memory, rng, per_block,
                  extra_scores=None) -> RecallOutput:
  """The final answer from the working memory, and the per-block trace batch-major."""
  scores, read, ids, mask, tokens, logprobs, lengths = per_block
  if extra_scores is not None:
    scores = jnp.where(jnp.isfinite(extra_scores), extra_scores, jnp.nan)
  answer, _, _ = final_answer(params, setup.model, setup.prompts.final, setup.reasoner,
                              setup.sampling, question, question_mask, memory, rng)
  batch_major = lambda x: jnp.moveaxis(x, 0, 1)
  trace = RecallTrace(gate_scores=scores.T, read=read.T, memory_ids=batch_major(ids),
                      memory_mask=batch_major(mask), update_tokens=batch_major(tokens),
                      update_logprobs=batch_major(logprobs), update_lengths=lengths.T)
  return RecallOutput(answer=answer, memory=memory, trace=trace)


def initial_memory(setup: RecallSetup, batch: int) -> WorkingMemory:
  """Every row's starting working memory (the prompts' initial memory)."""
  return WorkingMemory.initial(setup.prompts.initial_memory, batch, setup.memory_capacity)


@jax.jit
def recall(params, setup: RecallSetup, bank: DocumentBank, question: Array, question_mask: Array,
           rng: Array, forced_read: Array | None = None) -> RecallOutput:
  """The whole loop over a device-resident bank, then the answer; one jitted call.

  question/question_mask: [B, Q]; forced_read: optional [B, N] read decisions.
  """
  batch = question.shape[0]
  blocks = (bank.k, bank.v, bank.slot_mask, bank.chunk_valid)
  memory = initial_memory(setup, batch)
  scores = None
  forced = None if forced_read is None else forced_read.T
  if setup.recall.mode == "topk" and forced is None:
    scores, forced = _topk_selection(params, setup, blocks, question, question_mask, memory)
  rng, answer_rng = loop_keys(rng, batch)
  memory, per_block = scan_blocks(params, setup, memory, rng, blocks, question,
                                  question_mask, forced)
  return finish_answer(params, setup, question, question_mask, memory, answer_rng, per_block,
                       scores)


@functools.partial(jax.jit, static_argnames=("compressor",))
def recall_documents(params, setup: RecallSetup, compressor: CompressorConfig, chunk_ids: Array,
                     chunk_mask: Array, question: Array, question_mask: Array, rng: Array,
                     forced_read: Array | None = None) -> RecallOutput:
  """Compresses each row's own document ([B, N, C]; empty chunks are never read, and a row of
  them answers from the initial memory), then `recall`."""
  if chunk_ids.ndim != 3 or chunk_ids.shape[1] == 0:  # static: refused at trace time
    raise ValueError(f"recall_documents: chunk_ids must be [rows, chunks, chunk tokens] with at "
                     f"least one chunk (an empty document), got shape {tuple(chunk_ids.shape)}")
  b, n, c = chunk_ids.shape
  memory = compress(params, setup.model, compressor, chunk_ids.reshape(b * n, c),
                    chunk_mask.reshape(b * n, c))
  per_doc = lambda x: jnp.moveaxis(x.reshape((x.shape[0], b, n) + x.shape[2:]), 2, 0)
  # Each row's blocks where its question is: compression splits the chunks over more devices
  # than the rows may be (16 rows on 32 chips), and left so the loop re-gathers the bank at
  # every step; constrained here, it moves once.
  kv = lambda x: with_logical_constraint(per_doc(x), (None, None, "batch", None, "act_kv_heads",
                                                      None))
  rows_last = lambda x: with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
  bank = DocumentBank(k=kv(memory.k), v=kv(memory.v),
                      slot_mask=rows_last(jnp.moveaxis(memory.slot_mask.reshape(b, n, -1), 1, 0)),
                      chunk_valid=rows_last(jnp.moveaxis(chunk_mask.any(-1), 1, 0)))
  return recall(params, setup, bank, question, question_mask, rng, forced_read)


@functools.partial(jax.jit, static_argnames=("compressor",))
def recall_streaming(params, setup: RecallSetup, compressor: CompressorConfig, chunk_ids: Array,
                     chunk_mask: Array, question: Array, question_mask: Array,
                     rng: Array, forced_read: Array | None = None) -> RecallOutput:
  """Compresses and reads group by group; device memory holds one group's blocks at a time.

  chunk_ids/chunk_mask: [N, Bd, C] with N a multiple of the group size (pad
  with all-zero masks: such chunks are never read).
  """
  if setup.recall.mode == "topk":
    raise ValueError("topk mode needs every block's score first: compress into a bank and use "
                     "`recall` or `recall_from_host`")
  n, docs, c = chunk_ids.shape
  g = setup.recall.group_size
  if n % g:
    raise ValueError(f"{n} chunks are not a multiple of group_size {g}")
  batch = question.shape[0]
  forced = None if forced_read is None else forced_read.T.reshape(n // g, g, batch)

  rng, answer_rng = loop_keys(rng, batch)

  def group_step(memory, xs):
    ids, mask, group_forced, first = xs  # [G, Bd, C]
    # Document-major rows, so a mesh that splits the documents keeps each one's chunks on its
    # device (`compress` groups by device).
    doc_major = lambda x: jnp.swapaxes(x, 0, 1).reshape(docs * g, c)
    mem = compress(params, setup.model, compressor, doc_major(ids), doc_major(mask))
    def chunk_major(x):  # [L, Bd*G, ...] -> [G, L, Bd, ...]
      return jnp.moveaxis(x.reshape((x.shape[0], docs, g) + x.shape[2:]), 2, 0)
    blocks = (chunk_major(mem.k), chunk_major(mem.v),
              jnp.swapaxes(mem.slot_mask.reshape(docs, g, -1), 0, 1), mask.any(axis=-1))
    memory, per_block = scan_blocks(params, setup, memory, rng, blocks, question,
                                    question_mask, group_forced, first)
    return memory, per_block

  memory = initial_memory(setup, batch)
  memory, per_group = jax.lax.scan(
      group_step, memory, (chunk_ids.reshape(n // g, g, docs, c),
                           chunk_mask.reshape(n // g, g, docs, c), forced, jnp.arange(0, n, g)))
  per_block = jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), per_group)
  return finish_answer(params, setup, question, question_mask, memory, answer_rng, per_block)


_scan_blocks_jit = jax.jit(scan_blocks)
_topk_selection_jit = jax.jit(_topk_selection)
_finish_answer_jit = jax.jit(finish_answer)


def recall_from_host(params, setup: RecallSetup, bank: DocumentBank, question: Array,
                     question_mask: Array, rng: Array, forced_read: Array | None = None,
                     progress=None) -> RecallOutput:
  """Like `recall`, for a bank of host (numpy, possibly memory-mapped) arrays, sent group by group.

  Every group has `recall.group_size` blocks (the last padded with invalid ones, never read), so
  one compiled loop serves any document length, and the next group is read from the host and
  sent while the device reads the current one: two groups are on the device at a time.
  progress: optional callable(blocks_done, blocks_total) after each group.
  """
  batch = question.shape[0]
  n, g = bank.num_blocks, setup.recall.group_size
  starts = range(0, n, g)

  def padded(x, start):  # blocks [start, start + g) of a chunk-major array, zeros past the end
    x = np.asarray(x[start:start + g])
    return np.pad(x, [(0, g - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

  def send(start):
    return tuple(jax.device_put(padded(x, start))
                 for x in (bank.k, bank.v, bank.slot_mask, bank.chunk_valid))

  memory = initial_memory(setup, batch)
  scores = None
  forced = None if forced_read is None else jnp.asarray(forced_read).T
  if forced is not None:
    forced = jnp.pad(forced, ((0, -n % g), (0, 0)))
  if setup.recall.mode == "topk" and forced is None:
    # Per-group scores, then the selection over all of them (padding blocks score -inf).
    scores = jnp.concatenate([_topk_selection_jit(params, setup, send(start), question,
                                                  question_mask, memory)[0]
                              for start in starts], axis=0)
    forced = _top_blocks(scores, setup.recall.topk)
    scores = scores[:n]
  rng, answer_rng = loop_keys(rng, batch)
  outputs, upcoming = [], send(0)
  for start in starts:
    memory, per_block = _scan_blocks_jit(params, setup, memory, rng, upcoming, question,
                                         question_mask,
                                         None if forced is None else forced[start:start + g],
                                         start)
    if outputs:  # the previous group read (its blocks freed) before another is sent
      jax.block_until_ready(outputs[-1])
      if progress is not None:
        progress(start, n)
    if start + g < n:  # read and sent while this group is being read on the device
      upcoming = send(start + g)
    outputs.append(per_block)
  if progress is not None:
    jax.block_until_ready(outputs[-1])
    progress(n, n)
  per_block = tuple(jnp.concatenate([o[i] for o in outputs], axis=0)[:n]
                    for i in range(len(outputs[0])))
  return _finish_answer_jit(params, setup, question, question_mask, memory, answer_rng, per_block,
                            scores)
