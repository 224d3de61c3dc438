"""Loading everything a recall run needs from one checkpoint directory (a notebook's entry point)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from memrecall import hf_checkpoint, runs
from memrecall.compressor import CompressorConfig
from memrecall.config import ModelConfig
from memrecall.prompts import Prompts
from memrecall.tokenizer import Tokenizer


@dataclasses.dataclass
class RecallModel:
  params: Any
  config: ModelConfig
  tokenizer: Tokenizer
  prompts: Prompts
  compressor: CompressorConfig


def load_recall_model(directory: str | os.PathLike, *, chunk_size: int | None = None, mesh=None,
                      **config_overrides) -> RecallModel:
  """A LycheeMemory (or plain Qwen2, beacons initialised from q/k/v) HF checkpoint, ready to recall.

  The prompts default to the released model's, wrapped in the tokenizer's chat template;
  `mesh` None puts every parameter on the first device.  config_overrides: `runs.MODEL_RUN_KEYS`.
  A checkpoint without a tokenizer.json gets the byte tokenizer (for work on token ids).
  """
  directory = os.fspath(directory)
  has_tokenizer = os.path.exists(os.path.join(directory, "tokenizer.json"))
  run = runs.from_hf_checkpoint(directory, chunk_size=chunk_size or 0, model=config_overrides,
                                tokenizer="" if has_tokenizer else "bytes")
  params, _ = hf_checkpoint.load_hf_checkpoint(
      directory, mesh=mesh, **{k: getattr(run.model, k) for k in runs.MODEL_RUN_KEYS})
  return RecallModel(params, run.model, run.tokenizer, run.prompts, run.compressor)


def load_trained_model(workdir: str | os.PathLike) -> RecallModel:
  """The model of a memrecall training run (its latest orbax checkpoint and saved config)."""
  run, params = runs.from_workdir(os.fspath(workdir))
  return RecallModel(params, run.model, run.tokenizer, run.prompts, run.compressor)
