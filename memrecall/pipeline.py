"""Loading everything a recall run needs from one checkpoint directory."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from memrecall import hf_checkpoint
from memrecall.compressor import CompressorConfig
from memrecall.config import ModelConfig
from memrecall.prompts import QWEN2_CHAT_TEMPLATE, Prompts
from memrecall.tokenizer import HFTokenizer, Tokenizer, load_tokenizer


@dataclasses.dataclass
class RecallModel:
  params: Any
  config: ModelConfig
  tokenizer: Tokenizer
  prompts: Prompts
  compressor: CompressorConfig


def chat_template_for(tokenizer: Tokenizer) -> str | None:
  """The tokenizer's own chat template; Qwen2.5's for a tokenizer.json without one; none for bytes."""
  if isinstance(tokenizer, HFTokenizer):
    return tokenizer.config.get("chat_template") or QWEN2_CHAT_TEMPLATE
  return None


def load_recall_model(directory: str | os.PathLike, *, chunk_size: int | None = None, mesh=None,
                      **config_overrides) -> RecallModel:
  """A LycheeMemory (or plain Qwen2, beacons initialised from q/k/v) HF checkpoint, ready to recall.

  The prompts default to the released model's, wrapped in the tokenizer's chat template.
  """
  config_overrides.setdefault("compressor", True)
  params, config = hf_checkpoint.load_hf_checkpoint(directory, mesh=mesh, **config_overrides)
  _, raw = hf_checkpoint.read_config(directory)
  compressor = CompressorConfig.from_hf_dict(raw, chunk_size)
  tok = load_tokenizer(directory, config.eos_token_ids, config.pad_token_id)
  prompts = Prompts.build(tok, chat_template_for(tok))
  return RecallModel(params, config, tok, prompts, compressor)


def load_trained_model(workdir: str | os.PathLike) -> RecallModel:
  """The model of a memrecall training run (its latest orbax checkpoint and saved config)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from memrecall.train import checkpoint, trainer  # pylint: disable=g-import-not-at-top
  params, config = checkpoint.load_params(os.fspath(workdir))
  run = trainer.build_run(ml_collections.ConfigDict(config))
  return RecallModel(params, run.model, run.tokenizer, run.prompts, run.compressor)
