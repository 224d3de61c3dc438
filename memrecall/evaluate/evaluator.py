"""Accuracy, latency and reading statistics of the recall loop on a list of examples."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memrecall.data import example as example_lib, specs, synthetic
from memrecall.data.example import TokenizedExample, tokenize
from memrecall import readers
from memrecall.evaluate import output_key, report, timing, traces
from memrecall.method import gate
from memrecall.method.compressor import CompressorConfig
from memrecall.method.recall import RecallSetup, inference_layout
from memrecall.models.placement import placement
from memrecall.models.qwen2 import place_params
from memrecall.readers import BaselineConfig, rows_on  # noqa: F401  (re-exported)
from memrecall.runtime import distributed, fingerprint, jsonl, sharding
from memrecall.runtime.distributed import is_primary
from memrecall.runtime.progress import Progress

# score(prediction ids without EOS, example) -> {"em", "sub_em", "strict_sub_em"}: `run_builder.Run.score`.
Scorer = Callable[[Sequence[int], TokenizedExample], dict]
ACCURACY_METRIC = "sub_em"  # `accuracy` of a result: MemAgent-compatible sub-EM (the ids form: exact)


def on_mesh(params, setup: RecallSetup, mesh, weights: str | None = "auto", log=None
            ) -> tuple[dict, RecallSetup, object]:
  """(params, setup, mesh to run on): params and setup in the recall loop's per-layer layout
  (`inference_layout`), placed on `mesh`'s devices as `weights` says (`placement`: sharded by
  the rules training uses, whole on every device, or split over a tensor axis of a
  `data x tensor` mesh of the same devices, which it returns).  mesh None: left where they
  are; weights None: already placed on `mesh` by an earlier call.  log: called with
  `placement`'s line when the mesh has several devices."""
  params, setup = inference_layout(params, setup)
  if mesh is None or weights is None:
    return params, setup, mesh
  chosen = placement(params, setup.model, mesh, weights)
  if log is not None and mesh.size > 1:
    log(chosen.line)
  if chosen.weights == "replicated":
    return jax.device_put(params, sharding.replicated(mesh)), setup, mesh
  return place_params(params, setup.model, chosen.mesh), setup, chosen.mesh


def _within(mesh):
  """The mesh the activations' logical constraints refer to while a batch runs (None: none)."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _latency_alone(prepare, examples: Sequence[TokenizedExample], count: int,
                   repeats: int = 3) -> float:
  """Seconds to answer one question by itself (a batch of 1): the latency a user waits for.

  Each of the first `count` questions runs `repeats` times and keeps its fastest run (what
  the machine does without a stray pause: on a 2-core CPU, 10 runs in a row of one compiled
  question were measured up to twice as slow as the next 10); the result is the median over
  the questions.  `prepare(group)` gives (jitted, args); the compilation is run untimed first.
  """
  fastest = []
  for i, ex in enumerate(examples[:count]):
    jitted, args = prepare([ex], first=i)
    if i == 0:
      jax.device_get(jitted(*args))
    fastest.append(timing.best_seconds(lambda: jitted(*args), repeats, wait=jax.device_get))
  return float(np.median(fastest)) if fastest else float("nan")


def example_keys(seed: int | Sequence[int], rows: Sequence[int]) -> jax.Array:
  """The random keys [len(rows)] of examples `rows`: each from `fold_in(key(seed), row)`, or
  from `key(seed[row])` when every example has a seed of its own.  A row's sample depends on
  its key alone (`sampling.row_keys`), so it is the same in any batch."""
  if isinstance(seed, (int, np.integer)):
    base = jax.random.key(int(seed))
    return jax.vmap(lambda row: jax.random.fold_in(base, row))(jnp.asarray(rows, jnp.uint32))
  if max(rows) >= len(seed):
    raise ValueError(f"one seed per example: got {len(seed)}, for rows up to {max(rows)}")
  return jax.vmap(jax.random.key)(jnp.asarray([seed[r] for r in rows], jnp.uint32))


def _in_batches(prepare, examples: Sequence[TokenizedExample], batch_size: int,
                timed: bool = True):
  """[(real examples, host output)] per batch (the last padded to one compiled shape), the
  seconds they took and the compiled peak bytes of one batch (timed=False: no untimed first
  run and no peak, for evaluations that only want the answers)."""
  outputs, seconds, peak = [], 0.0, None
  for start in range(0, len(examples), batch_size):
    group = list(examples[start:start + batch_size])
    real = len(group)
    jitted, args = prepare(group + [group[-1]] * (batch_size - real), first=start)
    if timed and start == 0:  # compiled and run once untimed: compilation is not latency
      jax.device_get(jitted(*args))
      peak = timing.compiled_bytes(jitted, *args)
    out, elapsed = timing.timed(lambda: jitted(*args), wait=jax.device_get)
    seconds += elapsed
    outputs.append((group[:real], out))
  return outputs, seconds, peak


@dataclasses.dataclass
class EvalResult:
  accuracy: float  # x100
  stderr: float  # x100
  latency_s: float  # one question answered by itself: compression + recall, seconds
  batched_s: float  # wall time per question when answered `batch_size` at a time
  blocks_read: float  # per question
  gate_recall: float  # share of relevant blocks read
  skip_rate: float  # share of blocks skipped
  examples: int
  traces: list[dict]
  peak_bytes: int | None = None  # compiled device bytes of one batch
  # Per question, in order: prediction_ids, blocks_read, the scores of `Scorer` and truncated
  # (the answer reached answer_tokens without an EOS: scored on what was cut off).
  rows: list[dict] = dataclasses.field(default_factory=list)


def _answer_ids(answer, i: int, eos: set) -> list[int]:
  n = int(answer.lengths[i])
  return [int(t) for t in answer.tokens[i, :n] if int(t) not in eos]


def _stderr(scores: np.ndarray) -> float:
  return float(100 * scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else float("nan")


# The built-in readers, in the order they were registered (any registered name is a mode).
MODES = readers.names()


def evaluate_mode(params, setup: RecallSetup, compressor: CompressorConfig,
                  examples: Sequence[TokenizedExample], score: Scorer, *, mode: str,
                  baseline: BaselineConfig = BaselineConfig(), batch_size: int = 16,
                  question_tokens: int = 64, seed: int | Sequence[int] = 0, keep_traces: int = 0,
                  latency_examples: int = 4, timed: bool = True,
                  max_tokens: int | None = None, mesh=None, weights: str | None = "auto"
                  ) -> EvalResult:
  """Reads `examples` in batches with the reader registered as `mode` (`memrecall.readers`:
  `gate`, `all`, `topk`, `memagent`, `full`, `rag`, or any other registered) and scores the
  answers; times the first `latency_examples` questions alone too.

  seed: sampling's keys (`example_keys`): one seed, or one per example.
  timed=False: no untimed first run and no peak (evaluations that only want the answers).
  max_tokens: every batch cut for this many tokens (one compiled shape across calls; default:
  the longest example).  mesh: the weights placed on it as `weights` says (`on_mesh`; None:
  placed there already) and each batch's rows split over its batch axes; None: computed where
  the parameters are."""
  params, setup, mesh = on_mesh(params, setup, mesh, weights)
  reader = readers.get(mode, setup, compressor, baseline)
  max_tokens = max_tokens or max(len(ex.context) for ex in examples)
  eos = set(setup.model.eos_token_ids)

  def prepare(group, first=0):  # group: examples[first:] (the last repeated as padding)
    inputs = reader.inputs(group, question_tokens=question_tokens, max_tokens=max_tokens)
    rows = [min(first + j, len(examples) - 1) for j in range(len(group))]
    return reader.call(params, reader.place(mesh, inputs), example_keys(seed, rows))

  with _within(mesh):
    batches, seconds, peak = _in_batches(prepare, examples, batch_size, timed)
    latency = _latency_alone(prepare, examples, latency_examples)
  scores, reads, trace_rows, rows = [], [], [], []
  # Over the rows whose blocks have labels: reads of relevant blocks, relevant blocks, blocks,
  # reads.  Gate recall and the skip rate are theirs (NaN where no row has labels).
  relevant_read = relevant = blocks = labelled_reads = 0
  labelled = False
  for group, out in batches:
    answer, trace = reader.answer(out), reader.trace(out)
    for i, ex in enumerate(group):
      predicted = _answer_ids(answer, i, eos)
      row_scores = score(predicted, ex)
      scores.append(row_scores[ACCURACY_METRIC])
      labels = reader.block_labels(ex)
      # A reader without a block loop (rag, full) reads no blocks it could count: None, not 0.
      read = np.zeros((0,), bool) if trace is None else np.asarray(trace.read[i])
      read = read if labels is None else read[:len(labels)]
      if trace is not None:
        reads.append(int(read.sum()))
      rows.append({"prediction_ids": predicted,
                   "blocks_read": None if trace is None else int(read.sum()), **row_scores,
                   "truncated": not bool(answer.done[i])})
      if labels is not None:
        labelled = True
        relevant_read += int((read & labels).sum())
        relevant += int(labels.sum())
        blocks += len(labels)
        labelled_reads += int(read.sum())
      if len(trace_rows) < keep_traces:
        trace_rows.append({"id": ex.example.id, "answer_ids": predicted,
                           "gold_ids": [list(map(int, g)) for g in ex.answers],
                           "correct": scores[-1]})
        if labels is not None:  # the blocks are the chunks the labels describe
          columns = traces.block_columns(trace, i, len(labels))
          trace_rows[-1].update(gate_scores=columns["gate_scores"], read=columns["read"],
                                relevant=labels.tolist(), memory_ids=columns["memory_ids"])
  scores = np.asarray(scores)
  return EvalResult(accuracy=float(100 * scores.mean()), stderr=_stderr(scores),
                    latency_s=latency, batched_s=seconds / len(examples),
                    blocks_read=float(np.mean(reads)) if reads else float("nan"),
                    gate_recall=relevant_read / max(relevant, 1) if labelled else float("nan"),
                    skip_rate=1 - labelled_reads / max(blocks, 1) if labelled else float("nan"),
                    examples=len(examples), traces=trace_rows, peak_bytes=peak, rows=rows)


def row_settings(params, run, setup: RecallSetup, baseline: BaselineConfig, **extra) -> dict:
  """Everything but the data that changes an evaluated row: the key `output_key.claim` checks.

  The weights and the tokenizer by content (not by directory name), the model's numerics, the
  compression and reasoner budgets, the prompts, the recall and sampling settings, the
  baselines' settings.
  """
  return {"params": fingerprint.params_fingerprint(params),
          "tokenizer": run.tokenizer.fingerprint,
          "model": fingerprint.value_hash(dataclasses.asdict(run.model)),
          "dtype": run.model.dtype, "param_dtype": run.model.param_dtype,
          "matmul_precision": run.model.matmul_precision,
          "chunk_size": run.compressor.chunk_size, "window": run.compressor.window,
          "ratio": run.compressor.ratio, "memory_size": run.reasoner.memory_size,
          "answer_tokens": run.reasoner.answer_tokens, "question_tokens": run.question_tokens,
          "prompts": fingerprint.value_hash(dataclasses.asdict(run.prompts)),
          "threshold": float(setup.recall.threshold), "topk": setup.recall.topk,
          "gate_group": setup.recall.gate_group,
          "sampling": fingerprint.value_hash(dataclasses.asdict(setup.sampling)),
          # Top-p has cut tied tokens by sorted position, as Hugging Face does, since 2026-12-07.
          **({"top_p_cut": "sorted position"} if setup.sampling.top_p < 1 else {}),
          # Answers are extracted as MemAgent's harness does (after `</think>`, `\\boxed X`)
          # since 2026-12-07; boxed prompts' answers are scored on the box alone.  Later
          # that day (the key's "stripped"), stripped first, whole where `</think>` ends them.
          "answer_scoring": "harness extraction, stripped" + (
              ", box only" if run.answers_in_box else
              ", after 'the answer is'" if run.answers_after_phrase else ""),
          **dataclasses.asdict(baseline), **extra}


def _devices_named(mesh) -> str:
  """`N x KIND` of the devices a sweep times its rows on: rows timed elsewhere are not its."""
  devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()[:1]
  return f"{len(devices)} x {devices[0].device_kind}"


def _check_own_devices(mesh) -> None:
  """Evaluation runs each process on a mesh of its own devices (rows, not batches, are split
  between processes): a mesh reaching into another process is a caller's mistake."""
  if mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat):
    raise ValueError("evaluation runs each process on its own devices: build the run with "
                     "devices=jax.local_devices() (launch/eval.py does)")


def _trace_task(task: str) -> str:
  """Trace files of the main task keep their short names; others carry the task."""
  return "" if task == "multihop" else f"{task}-"


# Questions per batch when none is given, here and in launch/eval.py alike: a batch size is part
# of an output directory's key, so a notebook's rows and the launcher's share a directory only
# when they agree.
SWEEP_BATCH_SIZE = 16  # the synthetic sweep
DATA_BATCH_SIZE = 8    # data files


def evaluate_suite(params, run, *, model_name: str, lengths: Sequence[int], modes: Sequence[str],
                   examples: int, output_dir: str, batch_size: int = SWEEP_BATCH_SIZE,
                   baseline: BaselineConfig | None = None, seed_offset: int = 1000,
                   keep_traces: int = 4, threshold: float | None = None,
                   topk: int = 4, gate_group: int = 16, latency_examples: int = 4,
                   mode_examples: dict[str, int] | None = None, mesh=None,
                   weights: str = "auto", log=print) -> list[dict]:
  """Every (length multiple, mode) not yet in OUTPUT_DIR/results.json; resumable.

  `run` is a `run_builder.Run` (model, prompts, synthetic task at training length).  Examples
  come from a stream (`seed_offset`) that training never reads.  mode_examples
  caps the questions of some modes (the first ones of the same stream), e.g. a
  slow baseline that is run for its timing only.  Each row's latency is the mean
  time of the first `latency_examples` questions answered one at a time;
  `batched_s` is the time per question in batches of `batch_size`.  baseline: the baselines'
  cuts (None: sections of the run's chunk size, as it trains on).  threshold: the gate's
  (None: the run's gate.threshold).  mesh, weights: as in `evaluate_mode`
  (this process's devices).  Every process computes every row (each row is one mode at one
  length, timed); process 0 writes them.
  """
  readers.check(modes, "mode")
  gate.warn_if_untrained(params, modes)
  _check_own_devices(mesh)
  report.check_results_kind(output_dir, "sweep")
  baseline = baseline or BaselineConfig(memagent_chunk=run.compressor.chunk_size,
                                        rag_chunk=run.compressor.chunk_size)
  results_path = os.path.join(output_dir, "results.json")
  rows = report.load_rows(results_path)
  task_name = run.task.task
  setup = run.recall_setup("all", threshold=threshold, topk=topk, gate_group=gate_group)
  # Rows are reused only when made from these weights, this task and these settings.
  group = f"{model_name}/{task_name}"
  output_key.claim(output_dir, {group: row_settings(
      params, run, setup, baseline, task=synthetic.task_key(run.task),
      task_seed=run.config.task.seed + seed_offset, examples=examples,
      mode_examples=mode_examples or {}, batch_size=batch_size,
      latency_examples=latency_examples, timed_on=_devices_named(mesh))},
      {f"{r['model']}/{r.get('task')}" for r in rows})
  # Placed once, not per row: each row's evaluate_mode takes them as placed (weights None).
  layer_params, layer_setup, mesh = on_mesh(params, setup, mesh, weights, log)
  done = {(r["model"], r.get("task"), r["mode"], r["length_multiple"]) for r in rows}
  todo = [(m, mode) for m in lengths for mode in modes
          if (model_name, task_name, mode, m) not in done]
  progress = Progress(len(todo), "eval")
  cache: dict[int, list] = {}
  for i, (multiple, mode) in enumerate(todo):
    if multiple not in cache:
      task = dataclasses.replace(run.task, length=run.task.length * multiple)
      seed = run.config.task.seed + seed_offset
      cache = {multiple: [example_lib.tokenize(synthetic.make_example(task, seed, j, run.tokenizer),
                                               run.tokenizer) for j in range(examples)]}
    batch = cache[multiple][:(mode_examples or {}).get(mode, examples)]
    result = evaluate_mode(layer_params, layer_setup, run.compressor, batch, run.score,
                           mode=mode, baseline=baseline, batch_size=batch_size,
                           question_tokens=run.question_tokens, keep_traces=keep_traces,
                           latency_examples=latency_examples, mesh=mesh, weights=None)
    row = {"model": model_name, "task": task_name, "mode": mode, "length_multiple": multiple,
           "context_tokens": run.task.length * multiple, "examples": result.examples,
           "accuracy": result.accuracy, "stderr": result.stderr, "latency_s": result.latency_s,
           "batched_s": result.batched_s, "peak_bytes": result.peak_bytes,
           "blocks_read": result.blocks_read,
           "gate_recall": result.gate_recall, "skip_rate": result.skip_rate}
    rows.append(report.json_safe(row))  # as a resumed run reads it back
    if is_primary():  # every process computes the same rows; one writes them
      # The traces first, each whole or not at all: a finished row always has its traces.
      os.makedirs(os.path.join(output_dir, "traces"), exist_ok=True)
      trace = os.path.join(output_dir, "traces",
                           f"{model_name}-{_trace_task(task_name)}{mode}-{multiple}x.json")
      with open(trace + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result.traces, f)
      os.replace(trace + ".tmp", trace)
      report.save_rows(rows, output_dir)
      progress(i + 1)
  if is_primary():
    report.plot(rows, output_dir)
  return rows


# --- evaluation on data files (launch/eval.py --data) -----------------------------

PREDICTION_KEYS = ("model", "data", "mode", "row", "id", "num_docs", "context_tokens", "question",
                   "prediction", "prediction_ids", "answers", "em", "sub_em", "strict_sub_em",
                   "blocks_read", "truncated")
METRIC_KEYS = ("sub_em", "strict_sub_em", "em")


PREDICTIONS = "predictions.jsonl"
_PROCESS_FILE = re.compile(r"^predictions-\d{5}-of-\d{5}\.jsonl$")  # `predictions_path`'s


def read_predictions(path: str) -> list[dict]:
  """The records of a predictions.jsonl (a torn last line, from a run that was killed, is
  left out: that row is simply evaluated again; see `memrecall.jsonl`)."""
  return jsonl.read(path)


def predictions_path(output_dir: str, process: int = 0, processes: int = 1) -> str:
  """Where a process appends the rows it computes: predictions.jsonl itself when it is the only
  one; else its own predictions-IIIII-of-NNNNN.jsonl (no two processes write one file)."""
  if processes == 1:
    return os.path.join(output_dir, PREDICTIONS)
  return os.path.join(output_dir, f"predictions-{process:05d}-of-{processes:05d}.jsonl")


def prediction_key(record: dict) -> tuple:
  """What makes a row the same row: model, data file, mode and row index."""
  return record["model"], record["data"], record["mode"], record["row"]


def read_all_predictions(output_dir: str) -> tuple[list[dict], list[dict]]:
  """(rows of predictions.jsonl, rows only in the per-process files): every row once.

  The per-process files of any earlier run count whatever its process count, so a rerun
  with another number of processes skips them too."""
  merged = read_predictions(os.path.join(output_dir, PREDICTIONS))
  seen = {prediction_key(r) for r in merged}
  extra = []
  names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
  for name in filter(_PROCESS_FILE.match, names):
    for record in read_predictions(os.path.join(output_dir, name)):
      if prediction_key(record) not in seen:
        seen.add(prediction_key(record))
        extra.append(record)
  return merged, extra


def merge_predictions(output_dir: str) -> list[dict]:
  """Appends to predictions.jsonl the per-process files' rows it lacks (kill-safe, and a no-op
  when none is missing: a rerun merges what an interrupted merge left); returns every row."""
  merged, extra = read_all_predictions(output_dir)
  extra.sort(key=prediction_key)
  if extra:
    jsonl.append(os.path.join(output_dir, PREDICTIONS), extra)
  return merged + extra


def check_every_row(output_dir: str, asked: set, records: Sequence[dict],
                    processes: int) -> None:
  """Refuses to report when, after every process finished, rows it asked for are not in
  OUTPUT_DIR: each process wrote its rows to its own file there, so a directory that is not one
  file system for every host (a local disk on each) holds only this host's share, and the
  results would silently cover a fraction of the rows."""
  missing = asked - {prediction_key(r) for r in records}
  if not missing or processes == 1:
    return
  owners = sorted({key[3] % processes for key in missing})  # row i: process i mod N
  files = [os.path.basename(predictions_path(output_dir, p, processes)) for p in owners]
  absent = [f for f in files if not os.path.exists(os.path.join(output_dir, f))]
  where = (f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} missing there" if absent
           else "their files lack them")
  raise RuntimeError(
      f"{len(missing)} of the {len(asked)} rows are not in {output_dir} after every process "
      f"finished (those of process {', '.join(map(str, owners))}: {where}).  The output "
      "directory (--output_dir) must be on a file system every host sees: each host saved its "
      "rows in its own copy of it")


def _summary_order(group: tuple) -> tuple:
  """(model, data, num_docs, mode) in that order, a row without num_docs first."""
  model, data, num_docs, mode = group
  return model, data, -1 if num_docs is None else num_docs, mode


def _summary_group(row: dict) -> tuple:
  return row["model"], row["data"], row.get("num_docs"), row["mode"]


def summarize_predictions(records: Sequence[dict]) -> list[dict]:
  """One result row per (model, data file, number of documents, mode): each metric x100 with
  its standard error, mean context tokens and blocks read (the paper's table by length), and
  how many answers were cut off at answer_tokens (None when a row predates the record)."""
  groups: dict[tuple, list[dict]] = {}
  for r in records:
    groups.setdefault((r["model"], r["data"], r.get("num_docs"), r["mode"]), []).append(r)
  rows = []
  for (model, data, num_docs, mode), group in sorted(groups.items(),
                                                      key=lambda kv: _summary_order(kv[0])):
    row = {"model": model, "data": data, "num_docs": num_docs, "mode": mode,
           "examples": len(group),
           "context_tokens": float(np.mean([r["context_tokens"] for r in group])),
           "blocks_read": (None if any(r["blocks_read"] is None for r in group)
                           else float(np.mean([r["blocks_read"] for r in group])))}
    for key in METRIC_KEYS:
      values = np.asarray([r[key] for r in group], float)
      row[key], row[f"{key}_stderr"] = float(100 * values.mean()), _stderr(values)
    known = all("truncated" in r for r in group)
    cut = sum(bool(r["truncated"]) for r in group) if known else None
    row["truncated"], row["truncated_fraction"] = cut, cut / len(group) if known else None
    rows.append(row)
  return rows


def _row_count(named, limit: int | None) -> int:
  """The rows of a source evaluated: its first `limit` (all of them when None)."""
  return len(named.source) if limit is None else min(limit, len(named.source))


def evaluate_data(params, run, sources, *, modes: Sequence[str], output_dir: str,
                  model_name: str = "model", limit: int | None = None,
                  batch_size: int = DATA_BATCH_SIZE,
                  baseline: BaselineConfig | None = None, threshold: float | None = None,
                  topk: int = 4, gate_group: int = 16, mesh=None, weights: str = "auto",
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  log=print) -> list[dict]:
  """Every (source, mode, row) not yet in OUTPUT_DIR's predictions; resumable by row.

  Greedy, or one sample per question at `temperature` and `top_p` (MemAgent's RULER-HQA
  harness samples at 0.7 and 0.95), each row's drawn from a key of its own (`seed`, the file,
  the mode and the row): a rerun, one that resumes after a kill, or one on another number of
  processes or with another batch size draws the same sample for the row; the output
  directory's key records the settings and the seed.

  `sources` are `specs.NamedSource`s (their rows in order, the first `limit`); `run` a
  `run_builder.Run`; mesh, weights: as in `evaluate_mode` (this process's devices).  Each
  finished batch is appended to predictions.jsonl (one JSON object per (mode, row): the fields
  of PREDICTION_KEYS), so a run that stops loses at most one batch; results.json / results.csv
  and plots are rewritten at the end: `summarize_predictions` of the rows asked for (the
  returned rows), beside the earlier rows of other models, files or modes.  A question over
  `reasoner.question_tokens` stops the run with an error naming its row, after every earlier
  batch was saved.  Rows are reused only from the same weights, data content and settings
  (`row_settings`, checked by `output_key.claim` before any row).

  With N processes (jax.distributed) each computes only the rows it owns (row i: process
  i mod N, `distributed.round_robin`) on its own devices, appending them to its own
  `predictions_path` file (an output directory the hosts do not share is refused before any
  row: `distributed.check_shared_directory`); after a barrier process 0 merges them all into
  predictions.jsonl (`merge_predictions`), every process checks that every row is there
  (`check_every_row`), and process 0 writes the results.  A rerun, with any number of
  processes, skips every row found in any of these files.
  """
  readers.check(modes, "mode")
  gate.warn_if_untrained(params, modes)
  specs.check_names(sources)
  _check_own_devices(mesh)
  report.check_results_kind(output_dir, "data")
  os.makedirs(output_dir, exist_ok=True)
  process, processes = jax.process_index(), jax.process_count()
  distributed.check_shared_directory(output_dir, "--output_dir")
  path = predictions_path(output_dir, process, processes)
  merged, extra = read_all_predictions(output_dir)
  records = merged + extra
  done = {prediction_key(r) for r in records}
  baseline = baseline or BaselineConfig(memagent_chunk=run.compressor.chunk_size,
                                        rag_chunk=run.compressor.chunk_size)
  setup = run.recall_setup("all", threshold=threshold, topk=topk, gate_group=gate_group,
                           temperature=temperature, top_p=top_p)
  # Rows are reused only when made from these weights, these data (file and options) and these
  # settings (a sampled evaluation's seed too).
  settings = row_settings(params, run, setup, baseline,
                          task=synthetic.task_key(run.task) if run.task else None,
                          **({"sample_seed": seed, "sample_keys": "per row"}
                             if temperature > 0 else {}))
  output_key.claim(output_dir, {
      f"{model_name}/{named.name}": {**settings, **named.key()}
      for named in sources}, {f"{r['model']}/{r['data']}" for r in records})
  params, setup, mesh = on_mesh(params, setup, mesh, weights, log)  # once, not per batch
  budget = run.question_tokens
  whose = f" (process {process} of {processes})" if processes > 1 else ""
  for named in sources:
    count = _row_count(named, limit)
    cache: dict[int, TokenizedExample] = {}

    def example(i):
      if i not in cache:
        ex = tokenize(named.source[i], run.tokenizer)
        if len(ex.question) > budget:
          raise ValueError(f"{named.path} row {i}: the question has {len(ex.question)} tokens, "
                           f"over the budget of {budget} (reasoner.question_tokens / "
                           "--question_tokens)")
        cache[i] = ex
      return cache[i]

    owned = distributed.round_robin(count, process, processes)
    for mode in modes:
      todo = [i for i in owned if (model_name, named.name, mode, i) not in done]
      if not todo:
        continue
      longest = max(len(example(i).context) for i in todo)  # one compiled shape per file and mode
      for start in range(0, len(todo), batch_size):
        rows = todo[start:start + batch_size]
        batch = [example(i) for i in rows]
        row_seeds = [int(fingerprint.value_hash([seed, named.name, mode, i]), 16) % 2**31
                     for i in rows]
        result = evaluate_mode(params, setup, run.compressor, batch, run.score, mode=mode,
                               baseline=baseline, batch_size=batch_size,
                               question_tokens=budget, seed=row_seeds, latency_examples=0,
                               timed=False, max_tokens=longest, mesh=mesh, weights=None)
        new = []
        for i, ex, out in zip(rows, batch, result.rows):
          answers = run.answer_texts(ex)
          question = ex.example.question
          new.append(report.json_safe({
              "model": model_name, "data": named.name, "mode": mode, "row": i, "id": ex.example.id,
              "num_docs": ex.example.metadata.get("num_docs"), "context_tokens": len(ex.context),
              "question": question if isinstance(question, str) else run.decode(question),
              "prediction": run.decode(out["prediction_ids"]), "answers": answers,
              **out}))
        jsonl.append(path, new)
        done.update((model_name, named.name, mode, i) for i in rows)
        log(f"{named.name} {mode}: {min(start + batch_size, len(todo))}/{len(todo)} rows{whose}")
  try:
    distributed.barrier("memrecall.evaluation.evaluate_data: every process's rows are written")
  except jax.errors.JaxRuntimeError as e:  # a process that stopped never arrives
    raise RuntimeError(f"process {process}: not every process finished its rows (did one stop?); "
                       f"this one's are saved in {path}, and a rerun resumes") from e
  # The summary is of the rows asked for: a rerun with a smaller `limit` (or fewer files or
  # modes) reports those, not every row an earlier run left in the directory.  results.json
  # keeps the earlier rows of the (model, data file, mode)s this run did not ask for, e.g.
  # another model evaluated beside this one.
  asked = {(model_name, named.name, mode, i) for named in sources for mode in modes
           for i in range(_row_count(named, limit))}
  if is_primary():
    records = merge_predictions(output_dir)
  else:  # the same rows, read: process 0 may be appending them to predictions.jsonl
    merged, extra = read_all_predictions(output_dir)
    records = merged + extra
  check_every_row(output_dir, asked, records, processes)
  summary = summarize_predictions([r for r in records if prediction_key(r) in asked])
  if is_primary():
    covered = {key[:3] for key in asked}
    kept = [r for r in report.load_rows(os.path.join(output_dir, "results.json"))
            if (r["model"], r["data"], r["mode"]) not in covered]
    report.save_data_rows(sorted(kept + summary, key=lambda r: _summary_order(_summary_group(r))),
                          output_dir)
  return summary
