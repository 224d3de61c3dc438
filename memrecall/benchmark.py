"""Side-by-side timing and memory of compression, gating and reasoning, per mode and length.

Everything is measured in one process, one mode after another, on the same
random weights: compression (all chunks, one batched call), the gate (the
recall loop with no block read: one gate forward per block), the reasoner
(the rest of a full run) and the total; `memagent` is MemAgent's loop on raw
chunks; `gate_stream` is gate mode with compression fused into the loop
(`recall_streaming`: one group of chunks on device at a time, so its peak does
not grow with the context).  Peak bytes are what XLA plans for the largest call (temporaries +
arguments + outputs) minus the parameters.  On GPU the script also reports
compression's achieved model TFLOP/s and batch-1 decoding's GB/s beside the
machine's measured matmul and HBM ceilings.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memrecall import baselines, model as model_lib, sampling
from memrecall.compressor import CompressorConfig, compress
from memrecall.config import ModelConfig
from memrecall.evaluation import compiled_bytes
from memrecall.prompts import Prompts, pad_ids
from memrecall.reasoner import ReasonerConfig
from memrecall.recall import DocumentBank, RecallConfig, RecallSetup, recall, recall_streaming

MODES = ("gate", "gate_stream", "all", "memagent")


def best_time(fn: Callable[[], object], repeats: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def param_bytes(params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def compression_flops(config: ModelConfig, compressor: CompressorConfig, chunks: int) -> float:
  """Model FLOPs of compressing `chunks` chunks: 2 x (non-embedding weights) per row, plus
  attention (QK^T and PV) over each window's prefix + causal own rows."""
  e, m, h, k, d = (config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.head_dim)
  per_layer = e * (h + 2 * k) * d + h * d * e + 3 * e * m
  rows_per_window = compressor.window + compressor.beacons_per_window
  windows = compressor.chunk_size // compressor.window
  dense = 2 * per_layer * config.num_layers * rows_per_window * windows * chunks
  attention = 0
  for w in range(windows):
    keys = w * compressor.beacons_per_window + rows_per_window / 2  # causal on average
    attention += 4 * rows_per_window * keys * h * d * config.num_layers
  return dense + attention * chunks


def machine_ceilings(dtype=jnp.bfloat16, size: int = 8192, repeats: int = 5,
                     copy_bytes: int = 2**30) -> dict:
  """Measured bf16 matmul TFLOP/s and elementwise HBM GB/s of the default device."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  t = best_time(lambda: matmul(a), repeats)
  big = jnp.ones((copy_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda x: x * 1.0001)
  t_copy = best_time(lambda: copy(big), repeats)
  return {"matmul_tflops": 2 * size**3 / t / 1e12, "hbm_gbps": 2 * big.nbytes / t_copy / 1e9}


def decode_rate(params, config: ModelConfig, cache_tokens: int, steps: int, repeats: int) -> dict:
  """Batch-1 decode: seconds per token and the bytes it must read (weights + KV cache)."""
  settings = sampling.SamplingConfig(eos_ids=(), pad_id=0)
  prompt = jnp.ones((1, cache_tokens), jnp.int32)

  def run(n):
    return sampling.generate(params, config, prompt, None, jax.random.key(0), max_new_tokens=n,
                             sampling=settings).tokens
  t_long = best_time(lambda: run(steps), repeats)
  t_short = best_time(lambda: run(1), repeats)
  per_token = max(t_long - t_short, 1e-9) / (steps - 1)
  kv = (2 * config.num_layers * (cache_tokens + steps) * config.num_kv_heads * config.head_dim
        * np.dtype(config.jnp_dtype).itemsize)
  weights = param_bytes(params)
  return {"seconds_per_token": per_token, "bytes_per_token": weights + kv,
          "gbps": (weights + kv) / per_token / 1e9}


@dataclasses.dataclass(frozen=True)
class BenchSettings:
  lengths: Sequence[int]
  questions: int = 8
  selected_fraction: float = 0.1
  memory_size: int = 64
  answer_tokens: int = 16
  memagent_chunk: int = 0  # 0: the compressor's chunk size
  repeats: int = 2
  group_size: int = 8  # gate_stream: chunks compressed per step of the loop


def run_benchmark(params, config: ModelConfig, compressor: CompressorConfig, prompts: Prompts,
                  settings: BenchSettings, modes: Sequence[str] = MODES,
                  log=print) -> list[dict]:
  """Rows {"mode", "context_tokens", "compress_s", "gate_s", "reason_s", "total_s", "peak_bytes"}."""
  reasoner = ReasonerConfig(memory_size=settings.memory_size, answer_tokens=settings.answer_tokens)
  greedy = sampling.SamplingConfig(eos_ids=(), pad_id=0)  # no EOS: every update decodes fully
  rows = []
  base = param_bytes(params)
  b = settings.questions
  question, question_mask = pad_ids([[3 + i % 200 for i in range(16)]] * b)
  rng = np.random.default_rng(0)
  unknown = set(modes) - set(MODES)
  if unknown:
    raise ValueError(f"unknown benchmark modes {sorted(unknown)}; choose from {MODES}")
  for length in settings.lengths:
    n = max(1, length // compressor.chunk_size)
    if "gate_stream" in modes:  # whole groups of chunks
      n = -(-n // settings.group_size) * settings.group_size
    ids = jnp.asarray(rng.integers(3, min(config.vocab_size, 30000), (n, compressor.chunk_size)),
                      jnp.int32)
    mask = jnp.ones(ids.shape, bool)
    every = max(1, round(1 / settings.selected_fraction))
    compress_args = (params, config, compressor, ids, mask)
    # Compression is the same work in every compressed mode: timed once, banked once.
    compress_seconds = functools.cache(
        lambda: best_time(lambda: compress(*compress_args).k, settings.repeats))
    bank = functools.cache(lambda: DocumentBank.from_chunks([compress(*compress_args)]))
    for mode in modes:
      setup = RecallSetup(config, prompts, reasoner,
                          RecallConfig(mode="all" if mode == "all" else "gate",
                                       group_size=settings.group_size), greedy)
      picks = np.zeros((b, n), bool)
      picks[:, ::1 if mode == "all" else every] = True
      if mode == "memagent":
        chunk = settings.memagent_chunk or compressor.chunk_size
        raw = jnp.asarray(rng.integers(3, min(config.vocab_size, 30000), (b, length // chunk, chunk)),
                          jnp.int32)
        raw_mask = jnp.ones(raw.shape, bool)
        args = (params, setup, raw, raw_mask, question, question_mask, jax.random.key(0))
        total = best_time(lambda: baselines.memagent(*args).answer.tokens, settings.repeats)
        rows.append({"mode": mode, "context_tokens": length, "compress_s": 0.0, "gate_s": 0.0,
                     "reason_s": total, "total_s": total,
                     "peak_bytes": compiled_bytes(baselines.memagent, *args) - base})
      elif mode == "gate_stream":
        # One shared document [N, 1, C]; compression happens inside the loop, so the parts
        # are: compression alone, the loop reading nothing (+ gate), the loop as selected.
        stream = lambda read: (params, setup, compressor, ids[:, None], mask[:, None], question,
                               question_mask, jax.random.key(0), jnp.asarray(read))
        t_compress = compress_seconds()
        t_none = best_time(lambda: recall_streaming(*stream(np.zeros_like(picks))).answer.tokens,
                           settings.repeats)
        t_loop = best_time(lambda: recall_streaming(*stream(picks)).answer.tokens, settings.repeats)
        rows.append({"mode": mode, "context_tokens": length, "compress_s": t_compress,
                     "gate_s": max(t_none - t_compress, 0.0), "reason_s": max(t_loop - t_none, 0.0),
                     "total_s": t_loop,
                     "peak_bytes": int(compiled_bytes(recall_streaming, *stream(picks)) - base)})
      else:
        t_compress = compress_seconds()
        full_args = (params, setup, bank(), question, question_mask, jax.random.key(0),
                     jnp.asarray(picks))
        t_loop = best_time(lambda: recall(*full_args).answer.tokens, settings.repeats)
        t_gate = 0.0
        if mode == "gate":
          none_args = full_args[:-1] + (jnp.zeros((b, n), bool),)
          t_gate = best_time(lambda: recall(*none_args).answer.tokens, settings.repeats)
        peak = max(compiled_bytes(compress, *compress_args),
                   compiled_bytes(recall, *full_args)) - base
        rows.append({"mode": mode, "context_tokens": length, "compress_s": t_compress,
                     "gate_s": t_gate, "reason_s": t_loop - t_gate,
                     "total_s": t_compress + t_loop, "peak_bytes": int(peak)})
      log(f"  {mode:<11} {length:>9} tokens: {rows[-1]['total_s']:.3f} s")
  return rows


def table(rows: Sequence[dict]) -> str:
  reference = {r["context_tokens"]: r for r in rows if r["mode"] == "memagent"}
  header = (f"{'mode':<12}{'tokens':>9}{'compress s':>12}{'gate s':>9}{'reason s':>10}"
            f"{'total s':>10}{'peak MiB':>10}{'speed-up':>9}{'mem ratio':>10}")
  lines = [header, "-" * len(header)]
  for r in rows:
    ref = reference.get(r["context_tokens"])
    speed = ref["total_s"] / r["total_s"] if ref else float("nan")
    memory = r["peak_bytes"] / ref["peak_bytes"] if ref and ref["peak_bytes"] else float("nan")
    lines.append(f"{r['mode']:<12}{r['context_tokens']:>9}{r['compress_s']:>12.4f}{r['gate_s']:>9.4f}"
                 f"{r['reason_s']:>10.4f}{r['total_s']:>10.4f}{r['peak_bytes'] / 2**20:>10.1f}"
                 f"{speed:>9.2f}{memory:>10.2f}")
  return "\n".join(lines)
