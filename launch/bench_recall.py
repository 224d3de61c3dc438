r"""Benchmarks the recall loop on a random tiny model, everything measured side by side in one run.

  python launch/bench_recall.py [--chunks=32] [--memory_size=64] [--output_json=PATH]

Prints (1) the loop's wall time with 1/8 of the blocks read versus all blocks
read (the gate runs on every block in both; skipped blocks must cost only the
gate's forward), and (2) the compiled device memory of streaming recall at 1x
and 64x the document length versus a device-resident bank.
"""

import json
import os
import platform
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHUNKS = flags.DEFINE_integer("chunks", 32, "Blocks in the timed document.", lower_bound=1)
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 256, "Tokens per chunk (a multiple of 8: the "
                                   "window is half a chunk, in whole groups of 4 tokens).",
                                   lower_bound=1)
_MEMORY_SIZE = flags.DEFINE_integer(
    "memory_size", 64, "Tokens per memory update (the released model allows 1024).",
    lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per setting (the best is kept).",
                                lower_bound=1)
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the measurements here.")
from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help


def _check_flags() -> None:
  """Every flag, before the model is built (see launch/cli.py)."""
  from memrecall.method.compressor import CompressorConfig
  from memrecall.models.config import ConfigError
  size = _CHUNK_SIZE.value
  try:  # the library's own check of the chunking, named by the flag here
    CompressorConfig(chunk_size=size, window=size // 2, ratio=4)
  except ConfigError as e:
    raise app.UsageError(f"--chunk_size={size}: {e}") from None
  cli.writable("output_json", _OUTPUT_JSON.value)


def main(argv):
  del argv
  _check_flags()
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from configs import models
  from memrecall import readers, run_builder
  from memrecall.evaluate import timing
  from memrecall.method import prompts, recall
  from memrecall.method.compressor import compress
  from memrecall.models import qwen2 as model, sampling

  # The run of a random tiny model with a gate (byte tokenizer, the default prompts, no chat
  # template), as every launcher builds one.
  config = run_builder.with_defaults(ml_collections.ConfigDict({
      "stage": "eval",
      "model": {**models.model_config("tiny").to_dict(), "compressor": True, "gate_lora_rank": 4},
      "compressor": {"chunk_size": _CHUNK_SIZE.value, "window": _CHUNK_SIZE.value // 2,
                     "ratio": 4},
      "reasoner": {"memory_size": _MEMORY_SIZE.value, "answer_tokens": 8, "question_tokens": 64},
      "prompts": {"chat_template": ""}}))
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0))
  settings, tok = run.compressor, run.tokenizer
  # No EOS: every memory update decodes its full budget, the worst case.
  setup = run.recall_setup("gate", group_size=8).replace(
      sampling=sampling.SamplingConfig(eos_ids=(), pad_id=0))
  bank_reader = readers.get("gate", setup, settings, placement="bank")
  stream_reader = readers.get("gate", setup, settings, placement="stream")
  n = _CHUNKS.value
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 259, (n, settings.chunk_size)).astype(np.int32)
  memory = bank_reader.compress(params, jnp.asarray(ids), jnp.ones(ids.shape, bool))
  bank = recall.DocumentBank.from_chunks([memory])
  question, question_mask = prompts.pad_ids([tok.encode("Where is the key?")])

  def timed(read):
    program, args = bank_reader.call(params, (bank, question, question_mask), jax.random.key(1),
                                     read)
    run_once = lambda: program(*args).answer.tokens
    jax.block_until_ready(run_once())  # compile
    return timing.best_seconds(run_once, _REPEATS.value)

  eighth = jnp.asarray((np.arange(n) % 8 == 0)[None])
  t_eighth = timed(eighth)
  t_all = timed(jnp.ones((1, n), bool))

  def planned(program, *args):
    """(temporaries, bytes beyond the weights) of a program compiled for args (not run)."""
    compiled, _ = timing.compile_ahead(program, *args)
    return (compiled.memory_analysis().temp_size_in_bytes,
            timing.planned_bytes(compiled, args, weights=params))

  group = setup.recall.group_size
  stream, stream_temp, device_bank = {}, {}, {}
  for multiple in (1, 64):
    chunks = group * multiple
    shape = jax.ShapeDtypeStruct((chunks, 1, settings.chunk_size), jnp.int32)
    stream_temp[multiple], stream[multiple] = planned(*_flat(stream_reader.call(
        params, (shape, jax.ShapeDtypeStruct(shape.shape, bool), question, question_mask),
        jax.random.key(0))))
    # The device bank's reader compresses the whole document first, then loops: its peak is
    # the larger of the two programs.
    flat = jax.ShapeDtypeStruct((chunks, settings.chunk_size), jnp.int32)
    _, compressing = planned(compress, params, run.model, settings, flat,
                             jax.ShapeDtypeStruct(flat.shape, bool))
    kv = jax.ShapeDtypeStruct((chunks,) + bank.k.shape[1:], bank.k.dtype)
    abstract_bank = recall.DocumentBank(
        k=kv, v=kv, slot_mask=jax.ShapeDtypeStruct((chunks, 1, settings.slots), bool),
        chunk_valid=jax.ShapeDtypeStruct((chunks, 1), bool))
    _, looping = planned(*_flat(bank_reader.call(
        params, (abstract_bank, question, question_mask), jax.random.key(0))))
    device_bank[multiple] = max(compressing, looping)

  machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
            f"jax {jax.__version__} on {jax.default_backend()}"
  print(f"recall loop, tiny model, {n} blocks of {settings.chunk_size} tokens, "
        f"memory updates of {_MEMORY_SIZE.value} tokens ({machine})")
  print(f"  {'blocks read':<24}{'seconds':>10}")
  print(f"  {'1/8':<24}{t_eighth:>10.3f}")
  print(f"  {'all':<24}{t_all:>10.3f}")
  print(f"  ratio 1/8 : all = {t_eighth / t_all:.3f}  (target <= 0.25)")
  print(f"device bytes beyond the weights (compiled: temporaries + outputs + the other "
        f"arguments; the bank's compression included), groups of {group} chunks")
  print(f"  {'document':<24}{'streaming':>12}{'(temporaries)':>15}{'device bank':>14}")
  for multiple in (1, 64):
    print(f"  {f'{multiple}x ({group * multiple} chunks)':<24}{stream[multiple]:>12,}"
          f"{stream_temp[multiple]:>15,}{device_bank[multiple]:>14,}")
  # The document's tokens and the per-block trace grow with it by nature; what the loop holds
  # while it runs (its temporaries) must not.
  print(f"  streaming 64x : 1x = {stream[64] / stream[1]:.2f}, its temporaries "
        f"{stream_temp[64] / stream_temp[1]:.3f} (target <= 1.10); "
        f"device bank {device_bank[64] / device_bank[1]:.2f}")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"machine": machine, "blocks": n, "seconds_eighth": t_eighth, "seconds_all": t_all,
                 "ratio": t_eighth / t_all, "streaming_bytes": stream,
                 "streaming_temporaries": stream_temp, "bank_bytes": device_bank}, f,
                indent=1)


def _flat(program_and_args) -> tuple:
  """A reader's (program, arguments) as one argument list: (program, *arguments)."""
  program, args = program_and_args
  return (program, *args)


if __name__ == "__main__":
  cli.run(main)
