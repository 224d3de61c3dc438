"""Side-by-side timing and memory of compression, gating and reasoning, per mode and length.

Everything is measured in one process, one mode after another, on the same
random weights: compression (all chunks, in `group_size` groups), the gate (the
recall loop with no block read: one gate forward per block), the reasoner
(the rest of a full run) and the total; `memagent` is MemAgent's loop on raw
chunks; `gate_stream` is gate mode with compression fused into the loop
(`recall_streaming`: one group of chunks on device at a time, so its peak does
not grow with the context).  Every question reads its own document, as in evaluation: the
compressed modes compress all of them (`shared_document`: one document for every question,
compressed once, the case of many questions about one text).  Peak bytes are what XLA plans
for the largest call beyond the weights: temporaries, outputs and the arguments other than
the parameters (XLA leaves out of its plan the weights a program never reads, so subtracting
all of them undercounted).

Efficiency is judged against the machine, not against another program: the
matmul FLOP/s and the read bandwidth are measured in the same run
(`measure_ceilings`), and each mode's time is compared with its floor, the
FLOPs and bytes its work needs at those ceilings (`mode_floor`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memrecall import readers
from memrecall.evaluate.timing import best_seconds, best_time, compile_ahead, planned_bytes, \
    time_compiled, timed
from memrecall.method.compressor import ChunkMemory, CompressorConfig, compress
from memrecall.method.prompts import Prompts, pad_ids
from memrecall.method.reasoner import ReasonerConfig
from memrecall.method.recall import DocumentBank, RecallConfig, RecallSetup
from memrecall.models import sampling
from memrecall.models.config import ModelConfig
from memrecall.models.qwen2 import inference_params, init_cache

STREAM = "_stream"  # benchmark mode NAME_stream: the reader NAME, compressing inside its loop


def mode_names() -> list[str]:
  """Every mode `mode_reader` times: the registered readers, then NAME_stream of each compressed
  one (launch/bench.py checks --modes against these before any work)."""
  names = readers.names()
  return [*names, *(name + STREAM for name in names if readers.reader_class(name).compressed)]


def mode_reader(mode: str, setup: RecallSetup, compressor: CompressorConfig,
                baseline: readers.BaselineConfig) -> readers.Reader:
  """The reader a benchmark mode times: a registered name (a compressed reader reads a device
  bank, compression timed apart), or NAME_stream (its streaming placement)."""
  name = mode.removesuffix(STREAM)
  if name not in readers.names():
    raise readers.UnknownReaderError(f"unknown benchmark mode {mode!r}; choose from "
                                     f"{', '.join(mode_names())}")
  if not readers.reader_class(name).compressed:
    if name != mode:
      raise ValueError(f"benchmark mode {mode}: the {name} reader has no compressed blocks to "
                       "stream")
    return readers.get(name, setup, compressor, baseline)
  return readers.get(name, setup, compressor, baseline,
                     placement="stream" if name != mode else "bank")


def param_bytes(params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def step_weight_bytes(params, config: ModelConfig) -> int:
  """Weight bytes one generation step reads: the decoder layers' weights but not their beacon
  projections or the gate's LoRA (read only when compressing or gating: about 1 GB of a 7B
  model with both), the final norm and the LM head; of the other top-level tables the
  embedding is read only as the rows it gathers (counted as none) unless it is the LM head,
  and the beacon embedding and the gate's head not at all."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    top = path[0].key
    if top.startswith("layers"):
      name = jax.tree_util.keystr(path)
      read = "beacon_" not in name and "_lora_" not in name
    else:
      read = top in ("final_norm", "lm_head") or (top == "embedding"
                                                  and config.tie_word_embeddings)
    total += leaf.size * leaf.dtype.itemsize if read else 0
  return total


def _layer_weights(config: ModelConfig) -> int:
  """Matmul weights of one decoder layer (q/k/v/o and the SwiGLU MLP)."""
  e, m, h, k, d = (config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.head_dim)
  return e * (h + 2 * k) * d + h * d * e + 3 * e * m


def forward_flops(config: ModelConfig, rows: float, keys: float, logit_rows: float = 0) -> float:
  """Model FLOPs of `rows` token rows through every layer, each attending to `keys` keys on
  average (QK^T and PV), plus the LM head for `logit_rows` of them."""
  per_row = 2 * _layer_weights(config) + 4 * keys * config.num_heads * config.head_dim
  return (rows * per_row * config.num_layers
          + 2 * logit_rows * config.hidden_size * config.vocab_size)


def cache_bytes(config: ModelConfig, slots: float) -> float:
  """Bytes of `slots` cached key/value positions across the layers."""
  return (2 * config.num_layers * slots * config.num_kv_heads * config.head_dim
          * np.dtype(config.jnp_dtype).itemsize)


def compression_flops(config: ModelConfig, compressor: CompressorConfig, chunks: int) -> float:
  """Model FLOPs of compressing `chunks` chunks: every window's raw and beacon rows through
  every layer but the last, attending to the earlier windows' beacons and causally to their
  own rows; of the last layer only the beacons' keys and values are the memory (XLA drops
  the rest: 2x the FLOPs of a 2-layer model counted whole)."""
  rows = compressor.window + compressor.beacons_per_window
  below = (config.num_layers - 1) / config.num_layers  # forward_flops counts every layer
  kv = 2 * config.hidden_size * 2 * config.num_kv_heads * config.head_dim
  total = 0.0
  for w in range(compressor.chunk_size // compressor.window):
    total += (below * forward_flops(config, rows, w * compressor.beacons_per_window + rows / 2)
              + compressor.beacons_per_window * kv)
  return total * chunks


@dataclasses.dataclass(frozen=True)
class Ceilings:
  """What the machine measurably does: matmul FLOP/s and bytes/s read by a matrix-vector product
  (decoding's access pattern: every weight read once per step)."""
  matmul_flops: float
  read_bytes: float

  def seconds(self, flops: float, nbytes: float) -> float:
    """The floor of a piece of work: its FLOPs at the matmul ceiling plus its bytes at the
    read bandwidth (no overlap assumed, so the floor is reachable)."""
    return flops / self.matmul_flops + nbytes / self.read_bytes


def measure_ceilings(dtype=jnp.float32, matmul_size: int = 0, read_bytes: int = 0,
                     repeats: int = 5) -> Ceilings:
  """Measured on the default device in the model's dtype: a square matmul (default 2048 on
  CPU, 8192 on accelerators) and a matrix-vector product over `read_bytes` (default 256 MiB
  on CPU, 8x its last cache; 2 GiB on accelerators)."""
  on_cpu = jax.default_backend() == "cpu"
  size = matmul_size or (2048 if on_cpu else 8192)
  a = jnp.ones((size, size), dtype)
  t_matmul = best_time(_matmul, repeats, a, a)
  columns = 4096
  rows = max(1, (read_bytes or (2**28 if on_cpu else 2**31)) // np.dtype(dtype).itemsize // columns)
  matrix, vector = jnp.ones((rows, columns), dtype), jnp.ones((columns,), dtype)
  t_read = best_time(_matmul, repeats, matrix, vector)
  return Ceilings(matmul_flops=2 * size**3 / t_matmul, read_bytes=matrix.nbytes / t_read)


_matmul = jax.jit(jnp.matmul)


def generation_floor(config: ModelConfig, ceilings: Ceilings, weight_bytes: float, batch: int,
                     prompt: int, prefix: int, new_tokens: int, logit_rows: int = 1) -> float:
  """Seconds at the ceilings to prefill `prompt` tokens per row over `prefix` cached slots, then
  decode `new_tokens` (the first from the prefill's logits: new_tokens - 1 decode steps, each
  reading the weights once and every row's cache)."""
  seconds = ceilings.seconds(
      batch * forward_flops(config, prompt, prefix + prompt / 2, logit_rows), weight_bytes)
  for step in range(1, new_tokens):
    slots = prefix + prompt + step
    seconds += ceilings.seconds(batch * forward_flops(config, 1, slots, 1),
                                weight_bytes + batch * cache_bytes(config, slots))
  return seconds


def gate_steps(picks: np.ndarray, gate_group: int) -> int:
  """Sequential steps of the grouped gate loop (`recall._gate_in_groups`) for read decisions
  picks [B, N]: a row's step scores its next G blocks and moves past the first it reads."""
  n = picks.shape[1]
  positions, steps = np.zeros(picks.shape[0], int), 0
  while (positions < n).any():
    steps += 1
    for row, position in enumerate(positions):
      window = picks[row, position:position + gate_group]
      positions[row] += (int(np.argmax(window)) + 1) if window.any() else gate_group
  return steps


def mode_floor(mode: str, config: ModelConfig, compressor: CompressorConfig, setup: RecallSetup,
               ceilings: Ceilings, weight_bytes: float, picks: np.ndarray,
               memagent_chunk: int, question: int, documents: int | None = None) -> float:
  """Seconds a mode's question batch needs at the machine's ceilings: compression of
  `documents` documents (default: one per question), the gate's forwards, every memory update
  the picks [B, N] read, and the answer (`question` tokens).  For a raw reader (memagent)
  picks is [B, sections]: the raw sections of `memagent_chunk` tokens it reads."""
  reader = mode_reader(mode, setup, compressor,
                       readers.BaselineConfig(memagent_chunk=memagent_chunk))
  batch, n = picks.shape
  capacity = setup.memory_capacity
  m, answer = setup.reasoner.memory_size, setup.reasoner.answer_tokens
  prompts = setup.prompts
  final = generation_floor(config, ceilings, weight_bytes, batch,
                           prompts.final.length(question, capacity), 0, answer)
  prompt, slots = reader.update_shape(question)
  update = generation_floor(config, ceilings, weight_bytes, batch, prompt, slots, m)
  documents = batch if documents is None else documents
  seconds = (ceilings.seconds(documents * compression_flops(config, compressor, n), weight_bytes)
             if reader.compressed else 0.0)
  seconds += int(picks[0].sum()) * update + final
  if reader.gated:
    g = setup.recall.gate_group
    # Streaming gates each group of `group_size` chunks on its own (`recall_streaming`).
    span = setup.recall.group_size if getattr(reader, "placement", None) == "stream" else n
    g = min(g, span)
    gate_prompt = prompts.gate.length(question, capacity)
    per_step = (ceilings.seconds(batch * forward_flops(config, gate_prompt, gate_prompt / 2),
                                 weight_bytes)
                + ceilings.seconds(batch * g * forward_flops(config, 1, slots + gate_prompt),
                                   weight_bytes + batch * g * cache_bytes(config, slots)))
    steps = sum(gate_steps(picks[:, s:s + span], g) for s in range(0, n, span))
    seconds += steps * per_step
  return seconds


def decode_rate(params, config: ModelConfig, cache_tokens: int, steps: int, repeats: int,
                batch: int = 1) -> dict:
  """Generation for `batch` rows after a `cache_tokens` prompt each: the prefill's seconds and
  FLOPs, and per decode step (one token for every row) its seconds and the bytes it must read
  (the weights once, every row's KV cache).  The prefill and the `steps`-token sampling loop
  that `sampling.generate` runs are timed apart, each compiled once (`generate` at two lengths
  would compile both twice, minutes at 7B); a first untimed round warms them up."""
  settings = sampling.SamplingConfig(eos_ids=(), pad_id=0)
  prompt = jnp.ones((batch, cache_tokens), jnp.int32)
  prompt_mask = jnp.ones(prompt.shape, bool)
  rounds = []
  for _ in range(1 + repeats):  # the first round compiles and warms up
    # Both programs donate the cache: every round starts from a new one, made untimed.
    cache = jax.block_until_ready(init_cache(config, batch, cache_tokens + steps))
    (logits, cache), t_prefill = timed(
        lambda: sampling.prefill(params, config, cache, prompt, prompt_mask))
    _, t_loop = timed(lambda: sampling.sample_loop(params, config, cache, logits,
                                                   jax.random.key(0), max_new_tokens=steps,
                                                   sampling=settings))
    rounds.append((t_prefill, t_loop))
  t_prefill = min(prefill for prefill, _ in rounds[1:])
  per_token = min(loop for _, loop in rounds[1:]) / steps
  kv = batch * cache_bytes(config, cache_tokens + steps / 2)
  weights = step_weight_bytes(params, config)
  return {"batch": batch, "prefill_s": t_prefill,
          "prefill_flops": batch * forward_flops(config, cache_tokens, cache_tokens / 2, 1),
          "seconds_per_token": per_token, "bytes_per_token": weights + kv,
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
  shared_document: bool = False  # one document for every question (compressed once)

  def __post_init__(self):
    """A zero here ran as a default, divided by zero or timed nothing: refused by name."""
    counts = ("questions", "memory_size", "answer_tokens", "repeats", "group_size")
    bad = [f"{name}={getattr(self, name)}" for name in counts if getattr(self, name) < 1]
    bad += [f"lengths={list(self.lengths)}"] if not self.lengths or min(self.lengths) < 1 else []
    bad += [f"memagent_chunk={self.memagent_chunk}"] if self.memagent_chunk < 0 else []
    if not 0 < self.selected_fraction <= 1:
      bad.append(f"selected_fraction={self.selected_fraction} (the share read, in (0, 1])")
    if bad:
      raise ValueError(f"benchmark settings out of range: {', '.join(bad)}")


def run_benchmark(params, config: ModelConfig, compressor: CompressorConfig, prompts: Prompts,
                  settings: BenchSettings, modes: Sequence[str],
                  ceilings: Ceilings | None = None, log=print) -> list[dict]:
  """Rows {"mode", "context_tokens", "compress_s", "gate_s", "reason_s", "total_s", "peak_bytes",
  "read_fraction"} (gate_s: the gated loop reading nothing, which still writes the answer;
  reason_s: the rest of the loop; read_fraction: the chunks read, round(f * N) of N),
  and with `ceilings` also "floor_s" (`mode_floor`), "floor_ratio" (total / floor) and
  "compress_efficiency" (compression's achieved FLOP/s over the matmul ceiling).  Runs in the
  inference layout (`qwen2.inference_params`), as evaluation does.  modes: `mode_reader`'s."""
  params, config = inference_params(params, config)
  reasoner = ReasonerConfig(memory_size=settings.memory_size, answer_tokens=settings.answer_tokens)
  greedy = sampling.SamplingConfig(eos_ids=(), pad_id=0)  # no EOS: every update decodes fully
  chunk = settings.memagent_chunk or compressor.chunk_size  # a raw reader's sections
  setup = RecallSetup(config, prompts, reasoner, RecallConfig(group_size=settings.group_size),
                      greedy)
  by_mode = {mode: mode_reader(mode, setup, compressor,
                               readers.BaselineConfig(memagent_chunk=chunk)) for mode in modes}
  shortest = max((compressor.chunk_size if r.compressed else chunk for r in by_mode.values()),
                 default=0)
  if min(settings.lengths) < shortest:  # no chunk (or raw section) to time: a bogus row
    raise ValueError(f"context length {min(settings.lengths)} is shorter than one chunk of "
                     f"{shortest} tokens")
  rows = []
  weights = step_weight_bytes(params, config)  # what a generation step reads: the floors'
  b = settings.questions
  question, question_mask = pad_ids([[3 + i % 200 for i in range(16)]] * b)
  rng = np.random.default_rng(0)
  tokens = lambda shape: jnp.asarray(rng.integers(3, min(config.vocab_size, 30000), shape),
                                     jnp.int32)
  for length in settings.lengths:
    n = max(1, length // compressor.chunk_size)
    docs = 1 if settings.shared_document else b
    ids = tokens((docs, n, compressor.chunk_size))  # [Bd, N, C]: each question's own, or one
    mask = jnp.ones(ids.shape, bool)
    # round(f * n) chunks read, spread evenly over the document.
    selected = np.unique(np.round(np.linspace(0, n - 1, max(1, round(
        settings.selected_fraction * n)))).astype(int))
    compress_args = (params, config, compressor, ids.reshape(docs * n, -1),
                     mask.reshape(docs * n, -1))
    # Compression is the same work in every compressed mode: compiled once, timed once,
    # banked once (its compiled program's output: calling `compress` would compile it again).
    compress_program = functools.cache(lambda: compile_ahead(compress, *compress_args))
    compress_timed = functools.cache(lambda: (
        best_seconds(compress_program()[1], settings.repeats),
        planned_bytes(compress_program()[0], compress_args, params)))
    bank = functools.cache(lambda: _bank(compress_program()[1](), docs, n))
    for mode, reader in by_mode.items():
      picks = np.zeros((b, n), bool)
      picks[:, selected if reader.gated else slice(None)] = True
      key = jax.random.key(0)
      if not reader.compressed:  # raw sections: the whole loop is the reasoning
        raw = tokens((b, length // chunk, chunk))
        total, peak = _timed(time_compiled, settings.repeats, reader.call(
            params, (raw, jnp.ones(raw.shape, bool), question, question_mask), key),
            weights=params)
        rows.append({"mode": mode, "context_tokens": length, "compress_s": 0.0, "gate_s": 0.0,
                     "reason_s": total, "total_s": total, "peak_bytes": peak})
        picks = np.ones((b, length // chunk), bool)  # every raw section it runs, for the floor
      elif reader.placement == "stream":
        # Chunk-major [N', Bd, C], padded to whole groups with empty chunks (never read);
        # compression happens inside the loop, so the parts are: compression alone, the loop
        # reading nothing (+ gate and answer), the loop as selected.
        padded = -(-n // settings.group_size) * settings.group_size
        chunk_major = lambda x: jnp.swapaxes(jnp.pad(x, ((0, 0), (0, padded - n), (0, 0))), 0, 1)
        stream = lambda read: reader.call(
            params, (chunk_major(ids), chunk_major(mask), question, question_mask), key,
            jnp.asarray(np.pad(read, ((0, 0), (0, padded - n)))))
        t_compress = compress_timed()[0]
        t_none = _timed(best_time, settings.repeats, stream(np.zeros_like(picks)))
        t_loop, peak = _timed(time_compiled, settings.repeats, stream(picks), weights=params)
        # Parts of separately timed programs: with --repeats=1 (first runs) they may not add
        # up, and are shown as they are.
        rows.append({"mode": mode, "context_tokens": length, "compress_s": t_compress,
                     "gate_s": t_none - t_compress, "reason_s": t_loop - t_none,
                     "total_s": t_loop, "peak_bytes": peak})
      else:
        t_compress, compress_peak = compress_timed()
        loop = lambda read: reader.call(params, (bank(), question, question_mask), key,
                                        jnp.asarray(read))
        t_loop, recall_peak = _timed(time_compiled, settings.repeats, loop(picks),
                                     weights=params)
        t_gate = 0.0
        if reader.gated:  # the loop reading nothing: the gate's forwards (and the answer)
          t_gate = _timed(best_time, settings.repeats, loop(np.zeros((b, n), bool)))
        rows.append({"mode": mode, "context_tokens": length, "compress_s": t_compress,
                     "gate_s": t_gate, "reason_s": t_loop - t_gate,
                     "total_s": t_compress + t_loop,
                     "peak_bytes": max(compress_peak, recall_peak)})
      row = rows[-1]
      row["read_fraction"] = float(picks[0].mean())
      if ceilings is not None:
        row["floor_s"] = mode_floor(mode, config, compressor, reader.setup, ceilings, weights,
                                    picks, chunk, question.shape[1], documents=docs)
        row["floor_ratio"] = row["total_s"] / row["floor_s"]
        row["compress_efficiency"] = (
            docs * compression_flops(config, compressor, n) / row["compress_s"]
            / ceilings.matmul_flops if row["compress_s"] else None)
      log(f"  {mode:<11} {length:>9} tokens: {row['total_s']:.3f} s")
  return rows


def _bank(memory: ChunkMemory, documents: int, chunks: int) -> DocumentBank:
  """The bank of `documents` documents of `chunks` chunks each, compressed document-major."""
  part = lambda i: ChunkMemory(k=memory.k[:, i * chunks:(i + 1) * chunks],
                               v=memory.v[:, i * chunks:(i + 1) * chunks],
                               slot_mask=memory.slot_mask[i * chunks:(i + 1) * chunks])
  return DocumentBank.from_chunks([part(i) for i in range(documents)])


def _timed(timer, repeats: int, program_and_args, **kwargs):
  """timer(program, repeats, *arguments, **kwargs) of a reader's `call`."""
  program, args = program_and_args
  return timer(program, repeats, *args, **kwargs)


def compression_scaling(params, config: ModelConfig, compressor: CompressorConfig,
                        chunk_counts: Sequence[int], group_sizes: Sequence[int],
                        repeats: int = 3) -> list[dict]:
  """Seconds to compress each count of random chunks with each group size (0: one call), the
  measurement behind a config's `compressor.group_size`: {"chunks", "group_size", "seconds"}."""
  rng = np.random.default_rng(0)
  rows = []
  for chunks in chunk_counts:
    ids = jnp.asarray(rng.integers(3, config.vocab_size, (chunks, compressor.chunk_size)),
                      jnp.int32)
    mask = jnp.ones(ids.shape, bool)
    for group in group_sizes:
      settings = dataclasses.replace(compressor, group_size=group)
      rows.append({"chunks": chunks, "group_size": group, "seconds": best_time(
          compress, repeats, params, config, settings, ids, mask)})
  return rows


def scaling_table(rows: Sequence[dict]) -> str:
  """Milliseconds per chunk count (columns) and group size (rows), and largest / smallest."""
  counts = sorted({r["chunks"] for r in rows})
  by = {(r["group_size"], r["chunks"]): r["seconds"] for r in rows}
  header = f"{'group':>8}" + "".join(f"{str(n) + ' chunks':>14}" for n in counts) + (
      f"{'ratio':>8}{'(work ratio)':>14}")
  lines = [header, "-" * len(header)]
  for group in sorted({r["group_size"] for r in rows}):
    times = [by[(group, n)] for n in counts]
    lines.append(f"{group or 'all':>8}" + "".join(f"{1e3 * t:>11.1f} ms" for t in times)
                 + f"{times[-1] / times[0]:>8.2f}{counts[-1] / counts[0]:>14.1f}")
  return "\n".join(lines)


def table(rows: Sequence[dict]) -> str:
  """One line per row; speed-up, memory ratio and floor speed-up are against the row of the
  same length whose reader reads raw chunks (memagent's)."""
  raw = lambda mode: not readers.reader_class(mode.removesuffix(STREAM)).compressed
  reference = {r["context_tokens"]: r for r in rows if raw(r["mode"])}
  header = (f"{'mode':<12}{'tokens':>9}{'compress s':>12}{'gate+ans s':>11}{'reason s':>10}"
            f"{'total s':>10}{'peak MiB':>10}{'speed-up':>9}{'mem ratio':>10}{'compress %':>11}"
            f"{'floor s':>10}{'x floor':>8}{'floor speed-up':>15}")
  lines = [header, "-" * len(header)]
  for r in rows:
    ref = reference.get(r["context_tokens"])
    speed = ref["total_s"] / r["total_s"] if ref else float("nan")
    memory = r["peak_bytes"] / ref["peak_bytes"] if ref and ref["peak_bytes"] else float("nan")
    # The speed-up both modes would show at their floors: what the work itself allows.
    floor_speed = ref["floor_s"] / r["floor_s"] if ref and "floor_s" in r else float("nan")
    lines.append(f"{r['mode']:<12}{r['context_tokens']:>9}{r['compress_s']:>12.4f}{r['gate_s']:>11.4f}"
                 f"{r['reason_s']:>10.4f}{r['total_s']:>10.4f}{r['peak_bytes'] / 2**20:>10.1f}"
                 f"{speed:>9.2f}{memory:>10.2f}"
                 f"{100 * (r.get('compress_efficiency') or float('nan')):>11.0f}"
                 f"{r.get('floor_s', float('nan')):>10.4f}{r.get('floor_ratio', float('nan')):>8.2f}"
                 f"{floor_speed:>15.2f}")
  return "\n".join(lines)
