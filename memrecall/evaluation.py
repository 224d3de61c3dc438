"""Accuracy, latency and reading statistics of the recall loop on a list of examples."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import jax
import numpy as np

from memrecall.compressor import CompressorConfig
from memrecall.data import metrics as metrics_lib
from memrecall.data.example import TokenizedExample
from memrecall.distributed import is_primary
from memrecall.prompts import pad_ids
from memrecall.recall import RecallSetup, recall_documents
from memrecall.train.batches import chunked


def is_correct(prediction: Sequence[int], golds, tokenizer, form: str) -> float:
  """Exact ids for the small-vocabulary form; MemAgent-compatible sub-EM for text."""
  if form == "ids":
    return float(any(tuple(prediction) == tuple(g) for g in golds))
  return metrics_lib.sub_em(tokenizer.decode(prediction), [tokenizer.decode(g) for g in golds])


def compiled_bytes(jitted, *args) -> int:
  """Device bytes of one call as XLA plans it: temporaries + arguments + outputs."""
  stats = jitted.lower(*args).compile().memory_analysis()
  return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


def _timed(jitted, args, first: bool) -> tuple[object, float, int | None]:
  """(host output, seconds, compiled bytes on the first batch) of jitted(*args); the first
  batch is run once untimed, so compilation never counts as latency."""
  peak = None
  if first:
    jax.device_get(jitted(*args))
    peak = compiled_bytes(jitted, *args)
  began = time.perf_counter()
  out = jax.device_get(jitted(*args))
  return out, time.perf_counter() - began, peak


@dataclasses.dataclass
class EvalResult:
  accuracy: float  # x100
  stderr: float  # x100
  latency_s: float  # per question, wall time of compression + recall
  blocks_read: float  # per question
  gate_recall: float  # share of relevant blocks read
  skip_rate: float  # share of blocks skipped
  examples: int
  traces: list[dict]
  peak_bytes: int | None = None  # compiled device bytes of one batch


def evaluate(params, setup: RecallSetup, compressor: CompressorConfig,
             examples: Sequence[TokenizedExample], tokenizer, *, form: str, batch_size: int = 16,
             question_tokens: int = 64, seed: int = 0, keep_traces: int = 0) -> EvalResult:
  """Runs compression + recall on `examples` in batches and scores the answers."""
  n_chunks = max(-(-len(ex.context) // compressor.chunk_size) for ex in examples)
  eos = set(setup.model.eos_token_ids)
  scores, reads, relevant_read, relevant, blocks, seconds, traces = [], [], 0, 0, 0, 0.0, []
  peak = None
  for start in range(0, len(examples), batch_size):
    group = list(examples[start:start + batch_size])
    real = len(group)
    group += [group[-1]] * (batch_size - real)  # one compiled shape for every batch
    ids, mask = chunked(group, compressor.chunk_size, n_chunks, setup.model.pad_token_id)
    question, question_mask = pad_ids([ex.question for ex in group], question_tokens)
    rng = jax.random.key(seed + start)
    out, elapsed, first_peak = _timed(
        recall_documents, (params, setup, compressor, ids, mask, question, question_mask, rng),
        start == 0)
    seconds += elapsed
    peak = first_peak if first_peak is not None else peak
    for i, ex in enumerate(group[:real]):
      n = int(out.answer.lengths[i])
      answer = [int(t) for t in out.answer.tokens[i, :n] if int(t) not in eos]
      scores.append(is_correct(answer, ex.answers, tokenizer, form))
      labels = ex.chunk_labels(compressor.chunk_size)
      read = np.asarray(out.trace.read[i, :len(labels)])
      reads.append(read.sum())
      relevant_read += int((read & labels).sum())
      relevant += int(labels.sum())
      blocks += len(labels)
      if len(traces) < keep_traces:
        traces.append({"id": ex.example.id, "answer_ids": answer,
                       "gold_ids": [list(map(int, g)) for g in ex.answers],
                       "correct": scores[-1],
                       "gate_scores": [None if np.isnan(s) else float(s)
                                       for s in out.trace.gate_scores[i, :len(labels)]],
                       "read": read.tolist(), "relevant": labels.tolist(),
                       "memory_ids": [out.trace.memory_ids[i, c][out.trace.memory_mask[i, c]].tolist()
                                      for c in range(len(labels))]})
  scores = np.asarray(scores)
  stderr = scores.std(ddof=1) / np.sqrt(len(scores)) if len(scores) > 1 else float("nan")
  return EvalResult(accuracy=float(100 * scores.mean()), stderr=float(100 * stderr),
                    latency_s=seconds / len(examples), blocks_read=float(np.mean(reads)),
                    gate_recall=relevant_read / max(relevant, 1),
                    skip_rate=1 - float(np.sum(reads)) / max(blocks, 1), examples=len(examples),
                    traces=traces, peak_bytes=peak)


# --- baselines through the same scoring ----------------------------------------

RECALL_MODES = ("gate", "all", "topk")
BASELINE_MODES = ("memagent", "full", "rag")
MODES = RECALL_MODES + BASELINE_MODES


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  """memagent_chunk: raw tokens per MemAgent section; full_budget: tokens the `full` baseline
  keeps (middle-truncated); rag_topk / rag_chunk: retrieved chunks and their size."""
  memagent_chunk: int = 32
  full_budget: int = 512
  rag_topk: int = 4
  rag_chunk: int = 32


def evaluate_mode(params, setup: RecallSetup, compressor: CompressorConfig,
                  examples: Sequence[TokenizedExample], tokenizer, *, mode: str, form: str,
                  baseline: BaselineConfig = BaselineConfig(), batch_size: int = 16,
                  question_tokens: int = 64, seed: int = 0, keep_traces: int = 0) -> EvalResult:
  """Any mode: the recall loop (`gate`, `all`, `topk`, read from `setup.recall`) or a baseline."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
  if mode in RECALL_MODES:
    setup = dataclasses.replace(setup, recall=dataclasses.replace(setup.recall, mode=mode))
    return evaluate(params, setup, compressor, examples, tokenizer, form=form,
                    batch_size=batch_size, question_tokens=question_tokens, seed=seed,
                    keep_traces=keep_traces)
  from memrecall import baselines  # pylint: disable=g-import-not-at-top
  eos = set(setup.model.eos_token_ids)
  pad = setup.model.pad_token_id
  scores, seconds, reads, traces, peak = [], 0.0, [], [], None
  for start in range(0, len(examples), batch_size):
    group = list(examples[start:start + batch_size])
    real = len(group)
    group += [group[-1]] * (batch_size - real)
    question, question_mask = pad_ids([ex.question for ex in group], question_tokens)
    rng = jax.random.key(seed + start)
    if mode == "memagent":
      n = max(-(-len(ex.context) // baseline.memagent_chunk) for ex in examples)
      ids, mask = chunked(group, baseline.memagent_chunk, n, pad)
      out, elapsed, first_peak = _timed(
          baselines.memagent, (params, setup, ids, mask, question, question_mask, rng), start == 0)
      answer, read = out.answer, out.trace.read.sum(axis=1)
    else:
      contexts = []
      for ex in group:
        ids = list(map(int, ex.context))
        if mode == "full":
          contexts.append(baselines.middle_truncate(ids, baseline.full_budget))
        else:
          pieces = [ids[i:i + baseline.rag_chunk] for i in range(0, len(ids), baseline.rag_chunk)]
          best = baselines.bm25_top_chunks(pieces, ex.question, baseline.rag_topk)
          contexts.append([t for i in best for t in pieces[i]])
      width = baseline.full_budget if mode == "full" else baseline.rag_topk * baseline.rag_chunk
      context, context_mask = pad_ids(contexts, width)
      answer, elapsed, first_peak = _timed(
          baselines.answer_from_context,
          (params, setup, context, context_mask, question, question_mask, rng), start == 0)
      read = np.zeros(len(group))
    seconds += elapsed
    peak = first_peak if first_peak is not None else peak
    for i, ex in enumerate(group[:real]):
      n_tokens = int(answer.lengths[i])
      predicted = [int(t) for t in answer.tokens[i, :n_tokens] if int(t) not in eos]
      scores.append(is_correct(predicted, ex.answers, tokenizer, form))
      reads.append(float(read[i]))
      if len(traces) < keep_traces:
        traces.append({"id": ex.example.id, "answer_ids": predicted, "correct": scores[-1],
                       "gold_ids": [list(map(int, g)) for g in ex.answers]})
  scores = np.asarray(scores)
  stderr = scores.std(ddof=1) / np.sqrt(len(scores)) if len(scores) > 1 else float("nan")
  return EvalResult(accuracy=float(100 * scores.mean()), stderr=float(100 * stderr),
                    latency_s=seconds / len(examples), blocks_read=float(np.mean(reads)),
                    gate_recall=float("nan"), skip_rate=float("nan"), examples=len(examples),
                    traces=traces, peak_bytes=peak)


def evaluate_suite(params, run, *, model_name: str, lengths: Sequence[int], modes: Sequence[str],
                   examples: int, batch_size: int, output_dir: str, baseline: BaselineConfig,
                   seed_offset: int = 1000, keep_traces: int = 4, threshold: float = 0.5,
                   topk: int = 4, mode_examples: dict[str, int] | None = None,
                   log=print) -> list[dict]:
  """Every (length multiple, mode) not yet in OUTPUT_DIR/results.json; resumable.

  `run` is a `trainer.Run` (model, prompts, task at training length).  Examples
  come from a stream (`seed_offset`) that training never reads.  mode_examples
  caps the questions of some modes (the first ones of the same stream), e.g. a
  slow baseline that is run for its timing only.
  """
  from memrecall import eval_report  # pylint: disable=g-import-not-at-top
  from memrecall.data import example as example_lib, synthetic
  from memrecall.progress import Progress
  from memrecall.recall import RecallConfig
  from memrecall.sampling import SamplingConfig
  unknown = set(modes) - set(MODES)
  if unknown:
    raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
  results_path = os.path.join(output_dir, "results.json")
  rows = eval_report.load_rows(results_path)
  done = {(r["model"], r["mode"], r["length_multiple"]) for r in rows}
  todo = [(m, mode) for m in lengths for mode in modes if (model_name, mode, m) not in done]
  setup = RecallSetup(model=run.model, prompts=run.prompts, reasoner=run.reasoner,
                      recall=RecallConfig(mode="all", threshold=threshold, topk=topk),
                      sampling=SamplingConfig(eos_ids=run.model.eos_token_ids,
                                              pad_id=run.model.pad_token_id))
  progress = Progress(len(todo), "eval")
  cache: dict[int, list] = {}
  for i, (multiple, mode) in enumerate(todo):
    if multiple not in cache:
      task = dataclasses.replace(run.task, length=run.task.length * multiple)
      seed = run.config.task.seed + seed_offset
      cache = {multiple: [example_lib.tokenize(synthetic.make_example(task, seed, j, run.tokenizer),
                                               run.tokenizer) for j in range(examples)]}
    batch = cache[multiple][:(mode_examples or {}).get(mode, examples)]
    result = evaluate_mode(params, setup, run.compressor, batch, run.tokenizer, mode=mode,
                           form=run.task.form, baseline=baseline, batch_size=batch_size,
                           question_tokens=run.config.reasoner.question_tokens,
                           keep_traces=keep_traces)
    row = {"model": model_name, "mode": mode, "length_multiple": multiple,
           "context_tokens": run.task.length * multiple, "examples": result.examples,
           "accuracy": result.accuracy, "stderr": result.stderr, "latency_s": result.latency_s,
           "peak_bytes": result.peak_bytes, "blocks_read": result.blocks_read,
           "gate_recall": result.gate_recall, "skip_rate": result.skip_rate}
    rows.append(eval_report.json_safe(row))  # as a resumed run reads it back
    if is_primary():  # every process computes the same rows; one writes them
      eval_report.save_rows(rows, output_dir)
      os.makedirs(os.path.join(output_dir, "traces"), exist_ok=True)
      with open(os.path.join(output_dir, "traces", f"{model_name}-{mode}-{multiple}x.json"),
                "w") as f:
        json.dump(result.traces, f)
      progress(i + 1)
  if is_primary():
    eval_report.plot(rows, output_dir)
  return rows
