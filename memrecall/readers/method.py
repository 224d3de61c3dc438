"""The method's reader: compressed chunks, walked by the recall loop (`method.recall`).

Registered as `gate`, `all` and `topk`, its three block selections.  Where the
compressed blocks live is the `placement` option, one program of `method.recall`
each (the same loop inside):

* `documents` (default): each row's own document compressed and read in one
  jitted call (`recall_documents`): evaluation, the RL rollout.
* `bank`: a device-resident `DocumentBank` given (`recall`): the benchmark, which
  times compression apart.
* `host`: a bank in host memory, sent a group at a time (`recall_from_host`):
  launch/answer.py with a memory bank.
* `stream`: chunks compressed group by group inside the loop (`recall_streaming`):
  flat device memory however long the document.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from memrecall.data.example import TokenizedExample
from memrecall.method.compressor import ChunkMemory, CompressorConfig, chunk_document, compress
from memrecall.method.recall import (MODES, RecallSetup, recall, recall_documents, recall_from_host,
                                     recall_streaming)
from memrecall.readers.base import (BaselineConfig, Reader, chunked, questions, register,
                                    rows_on)
from memrecall.readers.trajectory import TurnBatch, score_trajectory

PLACEMENTS = ("documents", "bank", "host", "stream")


class MethodReader(Reader):
  """Compressed chunks through the gate (or all of them, or each row's top k)."""

  summary = "reads compressed chunks"
  compressed = True
  trains = True
  has_gate = True
  stages = ("compressor", "sft", "rl", "gate", "eval")

  def __init__(self, setup: RecallSetup, compressor: CompressorConfig,
               baseline: BaselineConfig = BaselineConfig(), *, mode: str = "all",
               placement: str = "documents"):
    if placement not in PLACEMENTS:
      raise ValueError(f"unknown placement {placement!r}; choose from {PLACEMENTS}")
    super().__init__(setup.replace(recall=setup.recall.replace(mode=mode)), compressor, baseline)
    self.placement = placement

  @property
  def gated(self) -> bool:
    """Whether the gate decides what is read (its forward runs on every block)."""
    return self.setup.recall.mode == "gate"

  # --- inputs ----------------------------------------------------------------------

  def inputs(self, examples: Sequence[TokenizedExample], *, question_tokens: int,
             max_tokens: int) -> tuple:
    """documents: ([B, N, C] ids, mask, question, mask); stream: chunk-major [N, B, C] with N
    padded to whole groups.  The bank placements read compressed banks (`compress`)."""
    if self.placement in ("bank", "host"):
      raise ValueError(f"the {self.placement} placement reads a compressed bank: compress the "
                       "documents first (`compress`) and pass (bank, question, question_mask)")
    c = self.compressor.chunk_size
    ids, mask = chunked(examples, c, -(-max_tokens // c), self.setup.model.pad_token_id)
    if self.placement == "stream":
      ids, mask = self.chunk_major(ids, mask)
    return (ids, mask, *questions(examples, question_tokens))

  def chunk_document(self, tokens) -> tuple[np.ndarray, np.ndarray]:
    """One document as [N, C] chunk ids and mask (the last chunk padded)."""
    return chunk_document(tokens, self.compressor.chunk_size, self.setup.model.pad_token_id)

  def chunk_major(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, N, C] rows' chunks -> the streaming loop's [N', B, C], N' padded with empty chunks
    to whole groups of `recall.group_size` (never read)."""
    pad = -ids.shape[1] % self.setup.recall.group_size
    widths = ((0, 0), (0, pad), (0, 0))
    return (np.moveaxis(np.pad(ids, widths), 1, 0), np.moveaxis(np.pad(mask, widths), 1, 0))

  def compress(self, params, chunk_ids, chunk_mask, mesh=None) -> ChunkMemory:
    """Compressed blocks of chunks [N, C] (split over the mesh's batch axes): a bank's contents."""
    return compress(params, self.setup.model, self.compressor,
                    *rows_on(mesh, chunk_ids, chunk_mask))

  def place(self, mesh, inputs: tuple) -> tuple:
    # Only the per-row layout has rows first; the others are read as they are.
    return rows_on(mesh, *inputs) if self.placement == "documents" else inputs

  # --- reading ---------------------------------------------------------------------

  def call(self, params, inputs: tuple, rng, forced_read=None, progress=None):
    """forced_read: [B, N] read decisions replacing the selection (benchmarks); progress: the
    host placement's callable(blocks_done, blocks_total)."""
    forced = () if forced_read is None else (forced_read,)
    if self.placement == "documents":
      return recall_documents, (params, self.setup, self.compressor, *inputs, rng, *forced)
    if self.placement == "stream":
      return recall_streaming, (params, self.setup, self.compressor, *inputs, rng, *forced)
    if self.placement == "bank":
      return recall, (params, self.setup, *inputs, rng, *forced)
    return (functools.partial(recall_from_host, progress=progress),
            (params, self.setup, *inputs, rng, *forced))

  def read(self, params, inputs: tuple, rng, forced_read=None, progress=None):
    program, args = self.call(params, inputs, rng, forced_read, progress)
    return program(*args)

  def update_shape(self, question_tokens: int) -> tuple[int, int]:
    return (self.setup.prompts.update.length(question_tokens, self.setup.memory_capacity),
            self.compressor.slots)

  def block_labels(self, example: TokenizedExample) -> np.ndarray | None:
    # Data without supporting facts (`rows:` files, MemAgent's eval files without
    # --hotpotqa_dev) has no labels: all-False ones made its gate recall 0 where it is unknown.
    if not example.example.supporting:
      return None
    return example.chunk_labels(self.compressor.chunk_size)

  # --- training --------------------------------------------------------------------

  def trajectory_logprobs(self, params, batch: TurnBatch, with_gate: bool = False,
                          temperature: float = 1.0):
    """Each block's chunk compressed (with gradients) into the KV prefix of its update."""
    config = self.setup.model

    def block_turn(params, ids, mask):
      chunk = compress(params, config, self.compressor, ids, mask, for_gradients=True)
      return self.setup.prompts.update, (chunk.k, chunk.v, chunk.slot_mask), ()

    return score_trajectory(params, config, self.setup.prompts, batch, block_turn, with_gate,
                            temperature)


for _mode in MODES:  # one name per block selection, in this order
  register(_mode, mode=_mode)(MethodReader)
del _mode
