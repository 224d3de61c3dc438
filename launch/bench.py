r"""Times compress / gate / reason / total per mode and context length, side by side in one run.

  python launch/bench.py                                # tiny model on CPU, a few minutes
  python launch/bench.py --model=qwen2.5-7b --lengths=131072,1048576 --questions=8 \
      --selected_fraction=0.1 --output_json=bench.json  # one H100, random bf16 weights

Prints a table with the speed-up and peak-memory ratio of every mode against
`memagent` (MemAgent's raw-chunk loop on the same weights), and on GPU the
achieved model TFLOP/s of compression and the GB/s of batch-1 decoding beside
the machine's measured bf16 matmul and HBM ceilings.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODEL = flags.DEFINE_string("model", "tiny", "A shape from configs/models.py (random weights).")
_LENGTHS = flags.DEFINE_list("lengths", None, "Context lengths in tokens (default per model).")
_MODES = flags.DEFINE_list("modes", ["gate", "gate_stream", "all", "memagent"],
                           "Modes to time: gate, gate_stream (compression fused into the loop, "
                           "flat memory), all, memagent.")
_GROUP = flags.DEFINE_integer("group_size", 8, "gate_stream: chunks compressed per loop step.")
_QUESTIONS = flags.DEFINE_integer("questions", None, "Questions per batch (default per model).")
_SELECTED = flags.DEFINE_float("selected_fraction", 0.1, "Share of chunks the gate lets through.")
_MEMORY_SIZE = flags.DEFINE_integer("memory_size", None, "Tokens per memory update.")
_CHUNK = flags.DEFINE_integer("chunk_size", None, "Compressor chunk (default 4096; tiny 256).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per setting (best kept).")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the rows here.")


def main(argv):
  del argv
  import jax
  import ml_collections
  from configs import models, tiny as tiny_config
  from memrecall import benchmark, model, runs
  from memrecall.prompts import QWEN2_CHAT_TEMPLATE

  tiny = _MODEL.value == "tiny"
  chunk = _CHUNK.value or (256 if tiny else 4096)
  lengths = [int(x) for x in (_LENGTHS.value or ([2048, 16384] if tiny else [131072, 1048576]))]
  # The run of a random model of this shape (byte tokenizer): the tiny model's own short
  # prompts, or the released model's in Qwen2.5's chat template, as a real run sends them.
  c = runs.with_defaults(ml_collections.ConfigDict({
      "stage": "eval", "model": models.model_config(_MODEL.value),
      "compressor": {"chunk_size": chunk, "window": chunk // 2, "ratio": 4},
      "reasoner": {"memory_size": 1, "answer_tokens": 1, "question_tokens": 16},
      "prompts": (tiny_config.get_config().prompts.to_dict() if tiny
                  else {"chat_template": QWEN2_CHAT_TEMPLATE})}))
  c.model.compressor, c.model.gate_lora_rank = True, 8
  run = runs.build_run(c)
  config, compressor, prompts = run.model, run.compressor, run.prompts
  params = model.init_params(config, jax.random.key(0))
  settings = benchmark.BenchSettings(
      lengths=lengths, questions=_QUESTIONS.value or (4 if tiny else 8),
      selected_fraction=_SELECTED.value, memory_size=_MEMORY_SIZE.value or (16 if tiny else 1024),
      answer_tokens=8 if tiny else 64, repeats=_REPEATS.value, group_size=_GROUP.value)
  device = jax.devices()[0]
  machine = f"{device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, jax {jax.__version__}"
  print(f"bench: {_MODEL.value} ({config.param_dtype}), chunk {chunk}, {settings.questions} "
        f"questions, selected fraction {settings.selected_fraction}, on {machine}")
  rows = benchmark.run_benchmark(params, config, compressor, prompts, settings, _MODES.value)
  print(benchmark.table(rows))
  extra = {}
  if jax.default_backend() == "gpu":
    ceilings = benchmark.machine_ceilings()
    n = 16
    import jax.numpy as jnp
    import numpy as np
    ids = jnp.ones((n, chunk), jnp.int32)
    from memrecall.compressor import compress
    t = benchmark.best_time(lambda: compress(params, config, compressor, ids, ids > 0).k, 3)
    tflops = benchmark.compression_flops(config, compressor, n) / t / 1e12
    decode = benchmark.decode_rate(params, config, cache_tokens=2048, steps=64, repeats=3)
    floor = decode["bytes_per_token"] / (ceilings["hbm_gbps"] * 1e9)
    print(f"compression: {tflops:.0f} TFLOP/s = {100 * tflops / ceilings['matmul_tflops']:.0f}% "
          f"of the measured bf16 matmul ceiling ({ceilings['matmul_tflops']:.0f} TFLOP/s)")
    print(f"decoding (batch 1, 2048-token cache): {1e3 * decode['seconds_per_token']:.2f} ms/token, "
          f"{decode['gbps']:.0f} GB/s = {100 * floor / decode['seconds_per_token']:.0f}% of the "
          f"HBM floor ({1e3 * floor:.2f} ms at {ceilings['hbm_gbps']:.0f} GB/s)")
    extra = {"ceilings": ceilings, "compression_tflops": tflops, "decode": decode}
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)
    if extra:  # GPU efficiency figures beside the rows
      with open(os.path.splitext(_OUTPUT_JSON.value)[0] + "_gpu.json", "w") as f:
        json.dump(extra, f, indent=1)


if __name__ == "__main__":
  app.run(main)
