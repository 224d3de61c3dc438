r"""Times compress / gate / reason / total per mode and context length, side by side in one run.

  python launch/bench.py                                # tiny model on CPU, under a minute
  python launch/bench.py --model=qwen2.5-7b --lengths=131072,1048576 --questions=8 \
      --selected_fraction=0.1 --output_json=bench.json  # one H100, random bf16 weights

  python launch/bench.py --model=mid                    # hidden 512 x 8 layers, CPU-sized
  python launch/bench.py --model=qwen2.5-7b --modes= --decode_batches=1,8 \
      --nodecode_scanned                                # decode alone, at batch 1 and 8

Prints a table with the speed-up and peak-memory ratio of every mode against
`memagent` (MemAgent's raw-chunk loop on the same weights), and, against the
machine's matmul FLOP/s and read bandwidth measured in the same run, each
mode's floor and time / floor, compression's achieved share of the matmul
ceiling, the Reasoner's prefill FLOP/s and decoding's bytes/s at each of
--decode_batches.  Each jitted program is compiled ahead of time, so
--repeats=1 runs it once.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODEL = flags.DEFINE_string("model", "tiny", "A shape from configs/models.py, or `demo` (the "
                             "demo's model and chunks, configs/tiny.py); random weights.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Context lengths in tokens (default per model).")
_MODES = flags.DEFINE_list("modes", ["gate", "gate_stream", "all", "memagent"],
                           "Modes to time: gate, gate_stream (compression fused into the loop, "
                           "flat memory), all, memagent.")
_GROUP = flags.DEFINE_integer("group_size", 8, "gate_stream: chunks compressed per loop step.",
                              lower_bound=1)
_COMPRESS_GROUP = flags.DEFINE_integer("compress_group", None,
                                       "Chunks per compression call (default: 4096 tokens' worth, "
                                       "memrecall.method.compressor.GROUP_TOKENS; 0: all at once).",
                                       lower_bound=0)
_SCALING_CHUNKS = flags.DEFINE_list("scaling_chunks", [],
                                    "Also time compressing this many chunks (e.g. 512,2048) ...")
_SCALING_GROUPS = flags.DEFINE_list("scaling_groups", ["0", "32", "64", "128", "256"],
                                    "... with each of these group sizes (0: one call).")
_QUESTIONS = flags.DEFINE_integer("questions", None, "Questions per batch (default per model).",
                                  lower_bound=1)
_SELECTED = flags.DEFINE_float("selected_fraction", 0.1, "Share of chunks the gate lets through, "
                               "in (0, 1].")
_MEMORY_SIZE = flags.DEFINE_integer("memory_size", None, "Tokens per memory update.",
                                    lower_bound=1)
_CHUNK = flags.DEFINE_integer("chunk_size", None, "Compressor chunk (default 4096; tiny 256).",
                              lower_bound=1)
_MEMAGENT_CHUNK = flags.DEFINE_integer(
    "memagent_chunk", None, "Raw tokens per MemAgent section (default: the compressor's chunk; "
    "MemAgent's own recipe reads 5000).", lower_bound=1)
_SHARED = flags.DEFINE_bool(
    "shared_document", False, "Every question reads one shared document, compressed once (many "
    "questions about one text); default: each its own document, as evaluation reads them.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "auto", ["auto", "xla", "cudnn"], "Attention kernels (`model.attention`): auto "
    "takes cuDNN's on a GPU where it applies; xla avoids it (if cuDNN fails on a card).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per setting (best kept).",
                                lower_bound=1)
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1"],
                                    "Time decoding (per-layer layout) at each of these batches, "
                                    "against its floor; empty: no decode timing.")
_DECODE_SCANNED = flags.DEFINE_bool("decode_scanned", True,
                                    "Also time decoding in the scanned layer stack (training's "
                                    "layout) at the first of --decode_batches.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the rows here (and the machine's "
                                    "numbers beside them, in NAME_machine.json).")
from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help


def _defaults() -> dict:
  return _DEFAULTS.get(_MODEL.value, _DEFAULTS["qwen2.5"])


def _chunking() -> tuple[int, int]:
  """(chunk, window): --chunk_size or the shape's default, and the window that goes with it."""
  chunk = _CHUNK.value or _defaults()["chunk"]
  return chunk, _defaults().get("window", chunk // 2)


def _lengths() -> list[int]:
  return cli.int_list("lengths", _LENGTHS.value or [str(n) for n in _defaults()["lengths"]])


def _check_flags() -> dict[str, list[int]]:
  """Every flag, before the model is built (see launch/cli.py); returns the integer lists."""
  from memrecall.evaluate import benchmark
  from memrecall.method.compressor import CompressorConfig
  from memrecall.models.config import ConfigError
  cli.model_name("model", _MODEL.value, extra=("demo",))
  if not 0 < _SELECTED.value <= 1:
    raise app.UsageError(f"--selected_fraction={_SELECTED.value}: the share of chunks read is in "
                         "(0, 1]")
  chunk, window = _chunking()
  try:  # the library's own check of the chunking: one rule, named by the flag here
    CompressorConfig(chunk_size=chunk, window=window, ratio=4, group_size=_COMPRESS_GROUP.value)
  except ConfigError as e:
    raise app.UsageError(f"--chunk_size={chunk}: {e}") from None
  lengths = _lengths()
  if min(lengths) < chunk:
    raise app.UsageError(f"--lengths: {min(lengths)} tokens is shorter than one chunk of {chunk} "
                         "(--chunk_size)")
  if "memagent" in _MODES.value and min(lengths) < (_MEMAGENT_CHUNK.value or chunk):
    raise app.UsageError(f"--lengths: {min(lengths)} tokens is shorter than one MemAgent section "
                         f"of {_MEMAGENT_CHUNK.value or chunk} (--memagent_chunk)")
  cli.known("modes", _MODES.value, benchmark.mode_names())
  cli.writable("output_json", _OUTPUT_JSON.value)
  cli.writable("output_json", _machine_json(_OUTPUT_JSON.value))
  return {"lengths": lengths,
          "decode_batches": cli.int_list("decode_batches", _DECODE_BATCHES.value),
          "scaling_chunks": cli.int_list("scaling_chunks", _SCALING_CHUNKS.value),
          "scaling_groups": cli.int_list("scaling_groups", _SCALING_GROUPS.value, minimum=0)}


def _machine_json(path: str | None) -> str | None:
  return path and os.path.splitext(path)[0] + "_machine.json"


def main(argv):
  del argv
  lists = _check_flags()
  import jax
  import ml_collections
  from configs import models, tiny as tiny_config
  from memrecall.evaluate import benchmark
  from memrecall.models import qwen2 as model
  from memrecall import run_builder
  from memrecall.method.prompts import QWEN2_CHAT_TEMPLATE

  tiny = _MODEL.value in ("tiny", "mid", "demo")  # CPU shapes: short prompts, small budgets
  defaults = _defaults()
  chunk, window = _chunking()
  lengths = lists["lengths"]
  # The run of a random model of this shape (byte tokenizer): the tiny model's own short
  # prompts, or the released model's in Qwen2.5's chat template, as a real run sends them.
  demo = tiny_config.get_config()
  c = run_builder.with_defaults(ml_collections.ConfigDict({
      "stage": "eval",
      "model": demo.model if _MODEL.value == "demo" else models.model_config(_MODEL.value),
      "compressor": {"chunk_size": chunk, "window": window, "ratio": 4,
                     "group_size": _COMPRESS_GROUP.value},
      "reasoner": {"memory_size": 1, "answer_tokens": 1, "question_tokens": 16},
      "prompts": (demo.prompts.to_dict() if tiny
                  else {"chat_template": QWEN2_CHAT_TEMPLATE})}))
  c.model.compressor, c.model.gate_lora_rank = True, 8
  c.model.attention = _ATTENTION.value
  run = run_builder.build_run(c)
  config, compressor, prompts = run.model, run.compressor, run.prompts
  params = model.init_params(config, jax.random.key(0))
  settings = benchmark.BenchSettings(
      lengths=lengths, questions=_QUESTIONS.value or defaults["questions"],
      selected_fraction=_SELECTED.value, memory_size=_MEMORY_SIZE.value or defaults["memory"],
      answer_tokens=defaults["answer"], repeats=_REPEATS.value, group_size=_GROUP.value,
      memagent_chunk=_MEMAGENT_CHUNK.value or 0, shared_document=_SHARED.value)
  device = jax.devices()[0]
  machine = f"{device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, jax {jax.__version__}"
  print(f"bench: {_MODEL.value} ({config.param_dtype}), chunk {chunk} in groups of "
        f"{compressor.chunks_per_group or 'all'}, {settings.questions} questions "
        f"({'one shared document' if settings.shared_document else 'a document each'}), "
        f"selected fraction {settings.selected_fraction}, on {machine}")
  ceilings = benchmark.measure_ceilings(config.jnp_dtype)
  print(f"measured ceilings: matmul {ceilings.matmul_flops / 1e9:.0f} GFLOP/s, read "
        f"{ceilings.read_bytes / 1e9:.1f} GB/s ({config.param_dtype})")
  if not lists["decode_batches"] and not _SCALING_CHUNKS.value:
    # Only the inference layout is read from here on: the stacked copy goes (at 7B the two
    # would be 32 GB of an H100's 60 GB default pool; the device check's rows run so).
    params, config = model.inference_params(params, config)
  rows = (benchmark.run_benchmark(params, config, compressor, prompts, settings, _MODES.value,
                                  ceilings) if _MODES.value else [])
  if rows:
    print(benchmark.table(rows))
  if _SCALING_CHUNKS.value:
    scaling = benchmark.compression_scaling(params, config, compressor, lists["scaling_chunks"],
                                            lists["scaling_groups"])
    print("compression time by chunk count and group size (random chunks):")
    print(benchmark.scaling_table(scaling))
  efficiency = {
      "ceilings": {"matmul_flops": ceilings.matmul_flops, "read_bytes": ceilings.read_bytes}}
  if rows:
    efficiency["compress_efficiency"] = max((r["compress_efficiency"] or 0.0) for r in rows)
    print(f"compression: {100 * efficiency['compress_efficiency']:.0f}% of the matmul ceiling "
          f"(best row)")
  if lists["decode_batches"]:
    efficiency.update(_decode(params, config, ceilings, defaults["decode_cache"],
                              lists["decode_batches"]))
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
    with open(_machine_json(_OUTPUT_JSON.value), "w", encoding="utf-8") as f:
      json.dump({"machine": machine, **efficiency}, f, indent=1)


def _decode(params, config, ceilings, cache_tokens: int, batches: list[int]) -> dict:
  """Decode in the per-layer layout inference runs on, at each batch, and (--decode_scanned)
  in training's scanned layer stack at the first; each against its floor, the bytes a step
  reads at the measured read bandwidth.  The machine JSON's entries: "decode" and its
  "decode_floor_fraction" are the first batch's, "decode_by_batch" holds every batch."""
  from memrecall.evaluate import benchmark
  from memrecall.models import qwen2 as model
  per_layer = model.unstack_layers(params, config)
  by_batch = {}
  for batch in batches:
    decode = benchmark.decode_rate(*per_layer, cache_tokens=cache_tokens, steps=32, repeats=3,
                                   batch=batch)
    floor = decode["bytes_per_token"] / ceilings.read_bytes
    by_batch[str(batch)] = {**decode, "floor_s": floor,
                            "floor_fraction": floor / decode["seconds_per_token"]}
    print(f"decode (batch {batch}, {cache_tokens}-token prompt): "
          f"{1e3 * decode['seconds_per_token']:.2f} ms/step, {decode['gbps']:.1f} GB/s = "
          f"{floor / decode['seconds_per_token']:.2f} of the floor ({1e3 * floor:.2f} ms: "
          f"{decode['bytes_per_token'] / 1e6:.1f} MB of weights and cache at the read bandwidth)")
  first = by_batch[str(batches[0])]
  prefill = first["prefill_flops"] / first["prefill_s"]
  result = {"prefill_efficiency": prefill / ceilings.matmul_flops,
            "decode_floor_fraction": first["floor_fraction"], "decode": first,
            "decode_by_batch": by_batch}
  print(f"prefill ({cache_tokens} tokens, batch {batches[0]}): {prefill / 1e9:.1f} GFLOP/s = "
        f"{100 * result['prefill_efficiency']:.0f}% of the matmul ceiling (one token decoded)")
  if _DECODE_SCANNED.value:
    scanned = benchmark.decode_rate(params, config, cache_tokens=cache_tokens, steps=32,
                                    repeats=3, batch=batches[0])
    result["decode_scanned"] = scanned
    result["decode_scanned_floor_fraction"] = first["floor_s"] / scanned["seconds_per_token"]
    print(f"decode in the scanned layer stack (batch {batches[0]}): "
          f"{1e3 * scanned['seconds_per_token']:.2f} ms/step = "
          f"{result['decode_scanned_floor_fraction']:.2f} of the floor")
  return result


# Per shape: chunk (and window), lengths, questions, memory-update and answer tokens, and the
# prompt before the timed decode.
_DEFAULTS = {
    "demo": dict(chunk=16, window=16, lengths=[8192, 32768], questions=1, memory=3, answer=2,
                 decode_cache=128),
    "tiny": dict(chunk=256, lengths=[2048, 16384], questions=4, memory=16, answer=8,
                 decode_cache=256),
    "mid": dict(chunk=2048, lengths=[8192, 32768], questions=1, memory=32, answer=16,
                decode_cache=512),
    "qwen2.5": dict(chunk=4096, lengths=[131072, 1048576], questions=8, memory=1024, answer=64,
                    decode_cache=2048),
}


if __name__ == "__main__":
  cli.run(main)
