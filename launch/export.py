r"""Exports a trained memrecall run as a Hugging Face checkpoint in LycheeMemory's layout.

  python launch/export.py --checkpoint=workdir/rl --output=exported/lychee-rl
  python launch/export.py --checkpoint=workdir/rl/checkpoints/50 --output=exported/rl-50 \
      --dtype=float32

Writes config.json (Qwen2's keys, the compressor's `lychee_memory_*`, a gate's
`memrecall_gate_lora_*` and the run's prompts, budgets, chunk size, gate threshold and synthetic
task under `memrecall_run`, which --hf_checkpoint reads back), the weights as safetensors shards
(`--shard_gib` each) and the backbone's tokenizer, chat template and generation config where the
run kept them (`WORKDIR/hf_assets`), then reads the export back and checks every tensor against
the run's weights in --dtype.  The result loads with `--hf_checkpoint` in every launcher, and its
backbone and compressor in LycheeMemory's released code (the gate's adapters are memrecall's
own).  --output must be new or empty.  Errors are one line (--verbose: tracebacks).
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training workdir (its latest "
                                  "checkpoint), or one checkpoint's folder "
                                  "WORKDIR/checkpoints/STEP.")
_OUTPUT = flags.DEFINE_string("output", None, "The new checkpoint's directory (new or empty).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "The exported weights' dtype (training keeps float32 masters; Qwen2.5's "
                           "releases are bfloat16).")
_SHARD_GIB = flags.DEFINE_float("shard_gib", 4.0, "Largest safetensors shard, in GiB.",
                                lower_bound=1e-6)
_VERIFY = flags.DEFINE_bool("verify", True, "Read the export back and compare every tensor.")
flags.mark_flags_as_required(["checkpoint", "output"])
from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help


def _verify(run, params, directory: str, dtype: str) -> int:
  """Every parameter read back from `directory` equals the run's in `dtype`; returns the count."""
  import flax.traverse_util
  import numpy as np
  from memrecall import run_builder
  from memrecall.models import hf_checkpoint
  from memrecall.models.config import dtype_from_name
  settings = {k: getattr(run.model, k) for k in run_builder.MODEL_RUN_KEYS}
  again, _ = hf_checkpoint.load_hf_checkpoint(directory, **{**settings, "param_dtype": dtype,
                                                            "dtype": dtype})
  want = flax.traverse_util.flatten_dict(params)
  got = flax.traverse_util.flatten_dict(again)
  if set(want) != set(got):
    raise RuntimeError(f"the export's parameters differ from the run's: "
                       f"{sorted(set(want) ^ set(got))[:4]}")
  for path, value in want.items():
    expected = np.asarray(value.astype(dtype_from_name(dtype)))
    if not np.array_equal(np.asarray(got[path]), expected):
      raise RuntimeError(f"{'/'.join(path)} read back from {directory} differs from the run's")
  return len(want)


def main(argv):
  del argv
  from memrecall import run_builder
  cli.readable("checkpoint", _CHECKPOINT.value)
  cli.writable("output", _OUTPUT.value, directory=True)
  output = _OUTPUT.value
  if os.path.isdir(output) and os.listdir(output):  # before the weights are read
    raise app.UsageError(f"--output: {output} is not empty: export into a new directory "
                         "(nothing there is replaced)")
  import jax
  run, params = cli.on_own_devices(lambda mesh: run_builder.from_workdir(
      _CHECKPOINT.value, mesh=mesh), len(jax.local_devices()), None)
  files = run_builder.export_hf_checkpoint(run, params, output, dtype=_DTYPE.value,
                                           max_shard_bytes=int(_SHARD_GIB.value * (1 << 30)))
  print(f"exported {', '.join(files)} to {output}")
  if _VERIFY.value:
    print(f"verified: {_verify(run, params, output, _DTYPE.value)} parameters read back equal "
          f"the run's in {_DTYPE.value}")


if __name__ == "__main__":
  cli.run(main)
