r"""Where a decode step's time goes: ms per step against the HBM floor, and a kernel profile.

  python launch/profile_decode.py --model=qwen2.5-7b --batches=1,8 --trace  # one GPU
  python launch/profile_decode.py --model=tiny --batches=1,2 --steps=8      # CPU smoke

For each batch size, the sampling loop (`sampling.sample_loop`, the loop every memory update,
answer and RL rollout runs) decodes `--steps` tokens after a cache of `--cache_tokens` filled
slots, random bfloat16 weights in inference's per-layer layout.  The floor of one step is its
bytes (every weight once, the filled cache once) at the read bandwidth measured in the same run
(`benchmark.measure_ceilings`; the embedding table is not counted, since a step gathers only
B rows of it).  `--trace` records one loop with `jax.profiler` and sums the
device's kernel time by kernel name (the top rows, and the kernels per step), which says
whether the time goes to the weights' matrix-vector products, attention, or launch-bound small
kernels.  `--variants` adds side-by-side loops that change one thing: `scanned` (the stacked
layer layout of training), `xla_attention` (no cuDNN even for prompts).
"""

import collections
import glob
import gzip
import json
import os
import sys
import tempfile

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODEL = flags.DEFINE_string("model", "qwen2.5-7b", "A shape from configs/models.py.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Rows decoded at once.")
_CACHE = flags.DEFINE_integer("cache_tokens", 4096, "Filled cache slots before decoding "
                              "(a memory update's compressed chunk and prompt: about 1024 + 1.5K).",
                              lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 64, "Decode steps timed per loop.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed loops per setting (fastest kept).",
                                lower_bound=1)
_VARIANTS = flags.DEFINE_list("variants", [], "Also time: scanned, xla_attention.")
_TRACE = flags.DEFINE_bool("trace", False, "Profile one loop per batch and sum kernel time by name.")
_TOP = flags.DEFINE_integer("top", 12, "Kernel names listed per profile.", lower_bound=1)
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the rows here.")
from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help


def _filled_cache(model_lib, config, batch, filled, room, rng):
  """A cache whose first `filled` slots hold random keys/values (never time on zeros)."""
  import jax
  import jax.numpy as jnp
  cache = model_lib.init_cache(config, batch, filled + room)
  keys = jax.random.split(rng, 2)
  fill = lambda x, key: jax.random.normal(key, x.shape, x.dtype)
  return cache.replace(
      k=jax.tree.map(lambda x: fill(x, keys[0]), cache.k),
      v=jax.tree.map(lambda x: fill(x, keys[1]), cache.v),
      key_mask=cache.key_mask.at[:, :filled].set(True),
      index=jnp.asarray(filled, jnp.int32), next_position=jnp.full((batch,), filled, jnp.int32))


def _kernel_profile(run, top: int) -> dict:
  """Device kernel time by name over one call of `run`, from a jax.profiler perfetto trace."""
  import jax
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      jax.block_until_ready(run())
    files = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
      return {"error": "no perfetto trace written"}
    with gzip.open(files[0], "rt", encoding="utf-8") as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e["args"].get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in names.items() if "/device:" in name}
  by_name, count, total = collections.Counter(), collections.Counter(), 0.0
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
      by_name[e["name"]] += e["dur"]
      count[e["name"]] += 1
      total += e["dur"]
  rows = [{"kernel": n, "us": by_name[n], "share": by_name[n] / total if total else 0.0,
           "calls": count[n]} for n, _ in by_name.most_common(top)]
  return {"device_us": total, "kernels": sum(count.values()), "top": rows,
          "device_names": sorted(names[p] for p in device_pids)}


def main(argv):
  del argv
  batches = cli.int_list("batches", _BATCHES.value, empty=False)
  cli.known("variants", _VARIANTS.value, ("scanned", "xla_attention"))
  cli.model_name("model", _MODEL.value)
  cli.writable("output_json", _OUTPUT_JSON.value)
  import jax
  import jax.numpy as jnp
  from configs import models
  from memrecall.evaluate import benchmark, timing
  from memrecall.models import qwen2 as model_lib, sampling
  from memrecall.models.config import ModelConfig

  config = ModelConfig.from_dict(models.model_config(_MODEL.value).to_dict())
  params = model_lib.init_params(config, jax.random.key(0))
  layouts = {"per_layer": model_lib.unstack_layers(params, config)}
  if "scanned" in _VARIANTS.value:
    layouts["scanned"] = (params, config)
  else:
    del params
  if "xla_attention" in _VARIANTS.value:
    split, split_config = layouts["per_layer"]
    layouts["xla_attention"] = (split, split_config.replace(attention="xla"))
  ceilings = benchmark.measure_ceilings(config.jnp_dtype)
  # A step reads every weight once, except the embedding table, of which it gathers B rows
  # (unless the LM head is the same table).
  split = layouts["per_layer"][0]
  weight_bytes = benchmark.param_bytes(split) - (
      0 if config.tie_word_embeddings else split["embedding"].nbytes)
  device = jax.devices()[0]
  print(f"profile_decode: {_MODEL.value} ({config.param_dtype}, {weight_bytes / 1e9:.2f} GB of "
        f"weights) on {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; read "
        f"ceiling {ceilings.read_bytes / 1e9:.0f} GB/s, matmul {ceilings.matmul_flops / 1e12:.1f} "
        f"TFLOP/s", flush=True)
  greedy = sampling.SamplingConfig(eos_ids=(), pad_id=0)  # no EOS: every step runs
  steps, filled = _STEPS.value, _CACHE.value
  rows = []
  for batch in batches:
    for name, (params, config) in layouts.items():
      cache = _filled_cache(model_lib, config, batch, filled, steps, jax.random.key(1))
      logits = jax.random.normal(jax.random.key(2), (batch, config.vocab_size), jnp.float32)
      compiled, compile_s = timing.timed(
          lambda: sampling.sample_loop.lower(params, config, cache, logits, jax.random.key(3),
                                             max_new_tokens=steps, sampling=greedy).compile(),
          wait=lambda compiled: compiled)

      def run(fresh):  # the loop donates its cache: each run gets a copy, made untimed
        return lambda: compiled(params, fresh, logits, jax.random.key(3))[0].tokens

      fresh = lambda: jax.block_until_ready(jax.tree.map(jnp.copy, cache))
      jax.block_until_ready(run(fresh())())
      # The fastest of the repeats, each on a fresh copy made before its clock starts.
      per_step = min(timing.timed(run(fresh()))[1] for _ in range(_REPEATS.value)) / steps
      step_bytes = weight_bytes + benchmark.cache_bytes(config, batch * (filled + steps / 2))
      floor = step_bytes / ceilings.read_bytes
      row = {"variant": name, "batch": batch, "cache_tokens": filled, "steps": steps,
             "ms_per_step": 1e3 * per_step, "floor_ms": 1e3 * floor,
             "floor_fraction": floor / per_step, "gbps": step_bytes / per_step / 1e9,
             "compile_s": compile_s}
      if _TRACE.value and name == "per_layer":
        try:
          row["profile"] = _kernel_profile(run(fresh()), _TOP.value)
        except Exception as e:  # a profiler that cannot start must not cost the timings
          row["profile"] = {"error": f"{type(e).__name__}: {e}"}
      rows.append(row)
      print(f"  {name:<14} batch {batch:>2}: {row['ms_per_step']:7.2f} ms/step, floor "
            f"{row['floor_ms']:6.2f} ms -> {row['floor_fraction']:.2f} of the floor "
            f"({row['gbps']:.0f} GB/s; compiled in {compile_s:.0f} s)", flush=True)
      if "profile" in row and "top" in row["profile"]:
        p = row["profile"]
        print(f"    kernel time {p['device_us'] / 1e3:.1f} ms over {steps} steps "
              f"({p['device_us'] / 1e3 / steps:.2f} ms/step, {p['kernels'] / steps:.0f} kernels "
              f"per step); top kernels:")
        for k in p["top"]:
          print(f"      {100 * k['share']:5.1f}%  {k['us'] / steps:8.1f} us/step  "
                f"{k['calls'] // steps:4d}/step  {k['kernel'][:90]}")
      elif "profile" in row:
        print(f"    profile: {row['profile']}")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"machine": f"{device.device_kind} ({jax.default_backend()})",
                 "read_bytes": ceilings.read_bytes, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
