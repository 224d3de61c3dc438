r"""Evaluates a checkpoint: on data files (RULER-HQA, question rows) or on the synthetic task.

Data files, from a HF checkpoint (e.g. the released LycheeMemory-7B) or a training workdir:

  python launch/eval.py --hf_checkpoint=/ckpt/LycheeMemory-7B \
      --data=ruler_hqa:/data/eval_50.json,/data/eval_100.json --modes=all,gate \
      --output_dir=/tmp/eval_lychee
  python launch/eval.py --checkpoint=/tmp/rl_run --data=rows:/data/test.json --limit=16

writes OUTPUT_DIR/predictions.jsonl (one JSON object per (mode, row): prediction text and ids,
answers, em, sub_em, strict_sub_em, blocks read, whether the answer was cut off at
--answer_tokens, ...) and results.json / results.csv / sub_em_vs_length.png grouped by data file
and number of documents.  Rerunning skips the rows
already in predictions.jsonl, and refuses (naming what differs) when they were made from other
weights, data or settings (OUTPUT_DIR/keys.json): evaluate into another --output_dir, or under
another --model_name beside them.  --chunk_size, --memory_size, --answer_tokens and
--question_tokens override the checkpoint's settings (leave a flag out for the default; 0 is
an error).  --modes defaults to gate,all,memagent for a checkpoint with a gate, else
all,memagent.  Errors are one line; --verbose shows tracebacks.

Each process runs on a mesh of its own devices (--mesh, default the run's, or all of them on
fsdp where the run's needs other devices, as a pod recipe's workdir on one host; every device on
fsdp for a HF checkpoint), a batch's questions split over data x fsdp.  The weights (--weights): a
whole bfloat16 copy on every device when it takes at most a third of a device's memory (7B
with its compressor and gate, 15.1 GiB, on an H100 or a v5p chip), else split over heads and
MLP columns on the fewest devices whose share fits that third (the devices formed into data x
tensor, questions split over data: 7B on v5e chips, groups of 4), else sharded by training's
rules, which on an fsdp axis gathers every layer's weights at every decode step; the run says
which it chose.  With several processes (--distributed, or --coordinator_address,
--num_processes, --process_id) each evaluates only its rows of each file (row i on process i
mod N) into its own predictions-IIIII-of-NNNNN.jsonl, and process 0 merges them into
predictions.jsonl once all are done; a rerun, after any process was killed, skips every row
already in any of these files.

The synthetic sweep (no --data), at multiples of the training length:

  python launch/eval.py --checkpoint=/tmp/run --lengths=1,8,64 --modes=gate,all,memagent

writes OUTPUT_DIR/results.json and results.csv (one row per model, mode and length:
accuracy with its standard error, latency (one question alone) and time per question in
batches, compiled peak bytes, blocks read, gate recall and skip rate), traces/*.json for a few
questions, and accuracy/latency/peak-memory-vs-length PNGs.  OUTPUT_DIR defaults to
CHECKPOINT/eval (or eval/NAME of the HF checkpoint under the current directory).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Synthetic sweep only (refused with --data): a training config to evaluate "
    "with instead of the one the checkpoint saved, of the checkpoint's model shapes; the size "
    "flags and --matmul_precision apply to it.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir of a training run (orbax; its "
                                  "latest checkpoint), or one checkpoint's folder "
                                  "WORKDIR/checkpoints/STEP.")
_HF_CHECKPOINT = flags.DEFINE_string("hf_checkpoint", None,
                                     "Or a HF LycheeMemory / Qwen2 checkpoint directory.")
_DATA = flags.DEFINE_multi_string(
    "data", None, "KIND:PATH[,PATH...] (rows, hotpotqa, ruler_hqa, synthetic, tfds); repeatable.")
# (`tfds:DIR` directories are written by launch/prepare_data.py.)
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate the first N rows of each data file.",
                              lower_bound=1)
_NUM_DOCS = flags.DEFINE_integer("num_docs", 200, "hotpotqa data: documents per question.",
                                 lower_bound=1)
_SPLIT = flags.DEFINE_string("split", "test", "tfds and synthetic data: the split to read.")
_HOTPOTQA_DEV = flags.DEFINE_string(
    "hotpotqa_dev", "", "ruler_hqa data: the HotpotQA dev file (labels; index-only contexts).")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", None, "Tokens per chunk.", lower_bound=1)
_MEMORY_SIZE = flags.DEFINE_integer("memory_size", None, "Max tokens of a memory update.",
                                    lower_bound=1)
_ANSWER_TOKENS = flags.DEFINE_integer("answer_tokens", None, "Max tokens of the answer.",
                                      lower_bound=1)
_QUESTION_TOKENS = flags.DEFINE_integer("question_tokens", None, "Question budget in tokens.",
                                        lower_bound=1)
_PROMPTS = flags.DEFINE_enum(
    "prompts", "lychee", ["lychee", "memagent", "memagent_recurrent"], "HF checkpoints: the final "
    "answer's prompt, LycheeMemory's, MemAgent's training one (answers in \\boxed{}), or its "
    "evaluation harness's (\"Therefore, the answer is ...\", with which MemAgent's published "
    "RL-MemAgent numbers were made).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Label of the model in the results.")
_LENGTHS = flags.DEFINE_list("lengths", ["1", "8", "64"], "Synthetic: multiples of the training "
                             "length.")
_MODES = flags.DEFINE_list("modes", None, "Any of gate, all, topk, memagent, full, rag (default: "
                           "gate,all,memagent with a gate, else all,memagent; memagent for a "
                           "MemAgent baseline's run, which has no compressor).")
_EXAMPLES = flags.DEFINE_integer("examples", 64, "Synthetic: questions per length.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Questions per batch (default 16 "
                                   "synthetic, 8 data).", lower_bound=1)
_THRESHOLD = flags.DEFINE_float("threshold", None, "Gate threshold (default: the run's own "
                                "gate.threshold or an export's; 0.5 for another HF checkpoint).",
                                lower_bound=0.0, upper_bound=1.0)
_TOPK = flags.DEFINE_integer("topk", 4, "Blocks read in topk mode.", lower_bound=1)
_GATE_GROUP = flags.DEFINE_integer(
    "gate_group", 16, "Blocks the gate scores per step against the current memory (same decisions; "
    "fewer sequential steps).", lower_bound=1)
_LATENCY_EXAMPLES = flags.DEFINE_integer(
    "latency_examples", 4, "Synthetic: questions per row also answered one at a time.",
    lower_bound=0)
_MEMAGENT_CHUNK = flags.DEFINE_integer(
    "memagent_chunk", None, "Raw tokens per MemAgent section (default: the chunk size; MemAgent's "
    "own is 5000).", lower_bound=1)
_FULL_BUDGET = flags.DEFINE_integer("full_budget", 512, "Token budget of the full-context mode.",
                                    lower_bound=1)
_RAG_TOPK = flags.DEFINE_integer("rag_topk", 4, "Chunks retrieved by BM25 in rag mode.",
                                 lower_bound=1)
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "--data: sample each answer and memory update at this temperature (0: "
    "greedy, as LycheeMemory's example; MemAgent's RULER-HQA harness samples at 0.7).",
    lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "--data: nucleus sampling mass in (0, 1] with "
                            "--temperature (MemAgent's harness: 0.95).")
_SEED = flags.DEFINE_integer("seed", 0, "--data: the samples' seed with --temperature.",
                             lower_bound=0)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Default: CHECKPOINT/eval (the synthetic "
                                   "sweep), CHECKPOINT/eval_data (--data), WORKDIR/eval_stepN "
                                   "for a checkpoints/N folder, or eval/NAME.")
# --verbose; --distributed and the coordinator flags; --gate_lora_rank, --matmul_precision
from launch import cli, distributed_flags, model_flags  # noqa: E402
flags.adopt_module_key_flags(cli)  # its flags in --help
flags.adopt_module_key_flags(distributed_flags)
flags.adopt_module_key_flags(model_flags)


def _check_flags():
  """Every flag and path, before anything is loaded (see launch/cli.py)."""
  from memrecall import readers
  from memrecall.data import specs
  if (_HF_CHECKPOINT.value is None) == (_CHECKPOINT.value is None):
    raise app.UsageError("give exactly one of --hf_checkpoint and --checkpoint")
  if _CONFIG.value is not None and _DATA.value:
    raise app.UsageError("--config is for the synthetic sweep only (the config's task): drop "
                         "--data, or drop --config to evaluate the run on data as it was saved")
  if _CHECKPOINT.value and flags.FLAGS["prompts"].present:
    raise app.UsageError("--prompts is for --hf_checkpoint: a training workdir evaluates with "
                         "the prompts it trained with (its config's prompts.final_template)")
  sweep_only = [f"--{name}" for name in ("lengths", "examples", "latency_examples")
                if flags.FLAGS[name].present]
  if _DATA.value and sweep_only:
    raise app.UsageError(f"{', '.join(sweep_only)}: the synthetic sweep's; --data evaluates every "
                         "row of its files (--limit caps them)")
  sampled = [f"--{name}" for name in ("temperature", "top_p", "seed") if flags.FLAGS[name].present]
  if not _DATA.value and sampled:
    raise app.UsageError(f"{', '.join(sampled)}: --data evaluation's sampling; the synthetic "
                         "sweep decodes greedily")
  if not 0.0 < _TOP_P.value <= 1.0:
    raise app.UsageError(f"--top_p={_TOP_P.value}: a probability mass in (0, 1]")
  if _TEMPERATURE.value == 0 and (_TOP_P.value < 1 or flags.FLAGS["seed"].present):
    raise app.UsageError("--top_p and --seed shape sampling, and decoding is greedy at "
                         "--temperature=0: set a temperature")
  if not _DATA.value and flags.FLAGS["split"].present:
    raise app.UsageError("--split picks the split of --data's tfds: and synthetic: sources; "
                         "the synthetic sweep draws its own questions (a stream training never "
                         "reads)")
  cli.readable("hf_checkpoint", _HF_CHECKPOINT.value)
  cli.readable("checkpoint", _CHECKPOINT.value)
  unknown = [m for m in _MODES.value or [] if m not in readers.names()]  # any registered reader
  if unknown or _MODES.value == []:
    raise app.UsageError(f"--modes: unknown {', '.join(unknown) or 'empty list'}; choose from "
                         f"{', '.join(readers.names())}")
  for spec in _DATA.value or []:
    parsed = specs.parse_spec(spec)
    if parsed.kind not in specs.KINDS:
      raise app.UsageError(f"--data={spec}: unknown kind {parsed.kind!r}; choose from "
                           f"{', '.join(specs.KINDS)}")
    if parsed.kind != "synthetic":
      for path in parsed.paths:
        cli.readable("data", path)
  try:
    lengths = [int(x) for x in _LENGTHS.value]
  except ValueError:
    lengths = []
  if not lengths or min(lengths) < 1:
    raise app.UsageError(f"--lengths must be positive integers, got {','.join(_LENGTHS.value)}")
  cli.writable("output_dir", _OUTPUT_DIR.value, directory=True)
  model_flags.mesh_shape()


def _modes(run) -> list[str]:
  """--modes, or what the checkpoint has: a gate mode needs a gate, the method's modes a
  compressor (a MemAgent baseline's workdir has none: memagent alone)."""
  if not run.model.compressor:
    compressed = [m for m in _MODES.value or [] if m not in ("memagent", "full", "rag")]
    if compressed:
      raise app.UsageError(f"--modes={','.join(_MODES.value)}: {', '.join(compressed)} read "
                           "compressed chunks and this model has no compressor (a MemAgent "
                           "baseline's run): use --modes=memagent (or full, rag)")
    return _MODES.value or ["memagent"]
  modes = _MODES.value or (["gate", "all", "memagent"] if run.model.has_gate else ["all", "memagent"])
  gated = [m for m in modes if m in ("gate", "topk")]
  if gated and not run.model.has_gate:
    raise app.UsageError(f"--modes={','.join(modes)}: {', '.join(gated)} needs a gate and this "
                         "checkpoint has none (drop it, or --gate_lora_rank for a HF checkpoint "
                         "with a gate head)")
  return modes


def _settings() -> dict[str, int]:
  """The run settings the size flags override (`run_builder.SIZE_OVERRIDES`): one list every
  way of building the run takes them from (a flag left out: the run's own)."""
  given = {"chunk_size": _CHUNK_SIZE.value, "memory_size": _MEMORY_SIZE.value,
           "answer_tokens": _ANSWER_TOKENS.value, "question_tokens": _QUESTION_TOKENS.value}
  return {key: value for key, value in given.items() if value}


def _load():
  """(run, a function giving its parameters, default output dir, model name) of the checkpoint
  the flags name, on a mesh of this process's own devices (--mesh, or the run's shape where it
  fits them: `model_flags.on_own_devices`); a HF
  checkpoint's weights are read only when that function is called.  The size flags
  (`_settings`) and --matmul_precision apply to whichever config the run is built from."""
  import jax
  from memrecall import run_builder
  from memrecall.method import prompts
  devices = jax.local_devices()
  values = _settings()
  if _HF_CHECKPOINT.value:
    hf = _HF_CHECKPOINT.value
    final = {"memagent": prompts.MEMAGENT_FINAL_TEMPLATE,
             "memagent_recurrent": prompts.MEMAGENT_RECURRENT_FINAL_TEMPLATE}.get(_PROMPTS.value)
    if final:
      values["prompts"] = {"final_template": final}
    run = model_flags.on_own_devices(lambda mesh: run_builder.from_hf_checkpoint(
        hf, devices, model=model_flags.hf_model_settings(), mesh=mesh, **values), len(devices))
    name = os.path.basename(os.path.normpath(hf))
    return run, run.params, os.path.join("eval", name), name
  from memrecall.runtime import checkpoint
  # --config: another config over the same weights (its shapes checked against them).
  run, params = model_flags.on_own_devices(lambda mesh: run_builder.from_workdir(
      _CHECKPOINT.value, matmul_precision=model_flags.MATMUL_PRECISION.value,
      devices=devices, mesh=mesh, config=_CONFIG.value, **values), len(devices))
  # Data files and the synthetic sweep each rewrite results.json: apart by default.  One
  # checkpoint's folder (WORKDIR/checkpoints/STEP) writes beside the others', not into orbax's.
  workdir, step = checkpoint.step_folder(_CHECKPOINT.value, None)
  where = ("eval_data" if _DATA.value else "eval") + (f"_step{step}" if step is not None else "")
  # The label of its rows: the agent it trained (configs/memagent.py's runs are MemAgent's).
  return run, lambda: params, os.path.join(workdir, where), run.config.get("agent", "lychee")


def main(argv):
  del argv
  _check_flags()
  distributed_flags.initialize()
  from memrecall.data import specs
  from memrecall.evaluate import report, evaluator

  run, load_params, default_dir, name = _load()
  modes = _modes(run)
  output_dir = _OUTPUT_DIR.value or default_dir
  cli.writable("output_dir", output_dir, directory=True)
  sources = [s for spec in _DATA.value or []
             for s in run.sources(spec, num_docs=_NUM_DOCS.value,
                                  hotpotqa_dev=_HOTPOTQA_DEV.value, split=_SPLIT.value)]
  if not sources and run.task is None:
    raise app.UsageError("this run needs --data=KIND:PATH: it has no synthetic task to sweep (a "
                         "HF checkpoint has one only as memrecall's export of a run trained on it)")
  specs.check_names(sources)  # before the weights: two files of one name would share rows
  params = load_params()  # last: every check above is cheap
  model_name = _MODEL_NAME.value or name
  chunk = run.compressor.chunk_size
  baseline = evaluator.BaselineConfig(memagent_chunk=_MEMAGENT_CHUNK.value or chunk,
                                       full_budget=_FULL_BUDGET.value, rag_topk=_RAG_TOPK.value,
                                       rag_chunk=chunk)
  if sources:
    rows = evaluator.evaluate_data(
        params, run, sources, modes=modes, output_dir=output_dir, model_name=model_name,
        limit=_LIMIT.value, batch_size=_BATCH_SIZE.value or evaluator.DATA_BATCH_SIZE,
        baseline=baseline, threshold=_THRESHOLD.value, topk=_TOPK.value,
        gate_group=_GATE_GROUP.value, mesh=run.mesh, weights=model_flags.WEIGHTS.value,
        temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value)
    print(report.data_table(rows))
  else:
    rows = evaluator.evaluate_suite(
        params, run, model_name=model_name, lengths=[int(x) for x in _LENGTHS.value],
        modes=modes, examples=_EXAMPLES.value,
        batch_size=_BATCH_SIZE.value or evaluator.SWEEP_BATCH_SIZE, output_dir=output_dir,
        baseline=baseline, threshold=_THRESHOLD.value, topk=_TOPK.value,
        gate_group=_GATE_GROUP.value, latency_examples=_LATENCY_EXAMPLES.value, mesh=run.mesh,
        weights=model_flags.WEIGHTS.value)
    print(report.table(rows))
  print(f"results in {output_dir}")


if __name__ == "__main__":
  cli.run(main)
