r"""Evaluates a trained checkpoint at several context lengths and modes.

  python launch/eval.py --config=configs/tiny.py:sft --checkpoint=/tmp/run \
      --lengths=1,8,64 --modes=gate,all,memagent --output_dir=/tmp/run/eval

Writes OUTPUT_DIR/results.json and results.csv (one row per model, mode and
length: accuracy with its standard error, latency (one question alone) and
time per question in batches, compiled peak bytes,
blocks read, gate recall and skip rate), traces/*.json for a few questions,
and accuracy/latency/peak-memory-vs-length PNGs.  Rerunning skips the rows
already in results.json.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config (model, task).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir of a training run (orbax).")
_MODEL_NAME = flags.DEFINE_string("model_name", "lychee", "Label of the model in the results.")
_LENGTHS = flags.DEFINE_list("lengths", ["1", "8", "64"], "Multiples of the training length.")
_MODES = flags.DEFINE_list("modes", ["gate", "all", "memagent"],
                           "Any of gate, all, topk, memagent, full, rag.")
_EXAMPLES = flags.DEFINE_integer("examples", 64, "Questions per length.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Questions per batch.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "Gate threshold.")
_TOPK = flags.DEFINE_integer("topk", 4, "Blocks read in topk mode.")
_GATE_GROUP = flags.DEFINE_integer(
    "gate_group", 16, "Blocks the gate scores per step against the current memory (same decisions; "
    "fewer sequential steps).")
_LATENCY_EXAMPLES = flags.DEFINE_integer(
    "latency_examples", 4, "Questions per row also answered one at a time for the latency.")
_MEMAGENT_CHUNK = flags.DEFINE_integer("memagent_chunk", None,
                                       "Raw tokens per MemAgent section (default: chunk size).")
_FULL_BUDGET = flags.DEFINE_integer("full_budget", 512, "Token budget of the full-context mode.")
_RAG_TOPK = flags.DEFINE_integer("rag_topk", 4, "Chunks retrieved by BM25 in rag mode.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Default: CHECKPOINT/eval.")
from memrecall import distributed  # noqa: E402  (defines --distributed and the coordinator flags)
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from memrecall import eval_report, evaluation
  distributed.initialize_from_flags()
  from memrecall.config import ConfigError
  from memrecall.train import checkpoint, trainer

  try:
    lengths = [int(x) for x in _LENGTHS.value]
    run = trainer.build_run(_CONFIG.value)
    params, _ = checkpoint.load_params(_CHECKPOINT.value)
  except (ValueError, ConfigError, OSError) as e:
    raise app.UsageError(str(e)) from None
  chunk = run.compressor.chunk_size
  baseline = evaluation.BaselineConfig(memagent_chunk=_MEMAGENT_CHUNK.value or chunk,
                                       full_budget=_FULL_BUDGET.value, rag_topk=_RAG_TOPK.value,
                                       rag_chunk=chunk)
  output_dir = _OUTPUT_DIR.value or os.path.join(_CHECKPOINT.value, "eval")
  try:
    rows = evaluation.evaluate_suite(
        params, run, model_name=_MODEL_NAME.value, lengths=lengths, modes=_MODES.value,
        examples=_EXAMPLES.value, batch_size=_BATCH_SIZE.value, output_dir=output_dir,
        baseline=baseline, threshold=_THRESHOLD.value, topk=_TOPK.value,
        gate_group=_GATE_GROUP.value, latency_examples=_LATENCY_EXAMPLES.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print(eval_report.table(rows))
  print(f"results in {output_dir}")


if __name__ == "__main__":
  app.run(main)
