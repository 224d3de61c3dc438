r"""Compiles a recipe for its TPU slice or GPU hosts on any machine, and prints what each
device must hold.

  python launch/compile.py --config=configs/lychee.py:rl,7b,v5p-64
  python launch/compile.py --config=configs/lychee.py:rl,7b,gpu8 --topology=h100:8
  python launch/compile.py --config=configs/lychee.py:sft,1.5b,auto --topology=v5e:4x4
  python launch/compile.py --config=configs/tiny.py:sft --topology=v5e:2x2 --output_json=plan.json

Every jitted program the stage runs (the train step with its microbatches; for RL the
rollout and the reference log-prob pass; evaluation's recall loop over a device bank and
answer.py's streaming loop) is lowered with abstract inputs at the recipe's shapes (nothing
is allocated) and compiled for devices that exist only for the compiler: deviceless TPUs
(`libtpu` installed: the `tpu` extra) or deviceless GPUs (jax's CUDA plugin installed: the
`gpu-aot` extra; XLA's GPU compiler then needs the card's target config, which jax 0.12's
plugin carries for the cards named h100, h100-pcie, h200, b200, a100 (80 GB SXM4), a100-40gb
and a100-80gb-pcie, or --gpu_target_config gives).  No TPU or GPU is needed.  One row per
program: per-device arguments, temporaries, outputs from the compiler's memory plan, what the
trainer holds on device besides them meanwhile (RL: the optimizer state during the rollout,
the KL reference's copy), their total, the share of the device's memory, and the compile time.
A program over 90% of it says by how much it does not fit and what would make it fit, and
the command exits with status 3 once every program is compiled.  On a GPU that memory is the
whole card's; JAX preallocates 75% of it, and a program between 75% and 90% says which
XLA_PYTHON_CLIENT_MEM_FRACTION it needs (jax 0.11 and 0.12 read it), and above 85% that it is
marginal (cuBLAS and NCCL workspaces are outside the plan) and to give it fewer rows.  The
last column is the most any loop of the program all-gathers per iteration
(`memrecall/capacity/hlo_report.py`): on an fsdp mesh an inference loop gathers the weights at
every decode step.

--topology defaults to the recipe's mesh when it names a TPU slice (`v5p-64` -> v5p:2x4x4,
32 chips, hosts of 4; an 8-chip v5e or v6e is one host of 8); a GPU recipe's mesh (`gpu8`)
names no card, so --topology names the hosts (`h100:8`: one host of 8; `h200:2x8`: two).  The
mesh must use every device (a mesh axis of -1 fills it).  A 7B recipe takes minutes of CPU per
program.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Compiling needs no backend but the CPU; never let jax probe for a TPU runtime.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py recipe and its "
                                          "argument, e.g. configs/lychee.py:rl,7b,v5p-64.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice (v5p-64, v5e-4) or topology "
                                "(v5p:2x4x4, v5e:2x2), or GPU hosts (h100:8, h200:2x8); "
                                "default: the recipe's mesh name.")
_GPU_TARGET_CONFIG = flags.DEFINE_string("gpu_target_config", None, "GPU hosts: the card's "
                                         "GpuTargetConfigProto as a text file (default: the "
                                         "one the CUDA plugin carries).")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 16, "Questions per evaluation batch (eval.py's "
                                   "default).", lower_bound=1)
_EVAL_TOKENS = flags.DEFINE_integer("eval_tokens", None, "Document tokens per evaluation question "
                                    "(default: the recipe's training documents, "
                                    "max_chunks x chunk_size).", lower_bound=1)
_EVAL_MODES = flags.DEFINE_list("eval_modes", ["gate", "stream"], "Evaluation loops to compile: "
                                "recall modes over a device bank (gate, all, topk; eval.py's) "
                                "and stream (answer.py --stream's, one question); empty: none.")
_WEIGHTS = flags.DEFINE_enum(
    "weights", "auto", ["auto", "sharded", "tensor", "replicated"], "Evaluation's weight "
    "placement, as launch/eval.py --weights: auto decides with the target's memory per device "
    "(on a GPU, JAX's default pool of it); tensor compiles evaluation on the devices formed "
    "into data x tensor.")
_ONLY = flags.DEFINE_list("programs", [], "Compile only these programs (train_step, rollout, "
                          "reference_logprobs, policy_logprobs (RL with rl.updates_per_batch > 1), "
                          "eval_recall_MODE, answer_stream); default: all.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the rows here as JSON too.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Write each compiled program's HLO text here "
                               "(PROGRAM.hlo; memrecall.capacity.hlo_report reads it).")
from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help
flags.mark_flags_as_required(["config"])


def _recipe_slice_name() -> str:
  """The MESH part of `--config=FILE:STAGE,SIZE,MESH` (empty when absent)."""
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  arg = spec.partition(":")[2]
  parts = arg.split(",")
  return parts[2] if len(parts) > 2 else ""


def _target():
  from memrecall.capacity import targets
  if _TOPOLOGY.value:
    return targets.parse_target(_TOPOLOGY.value)
  name = _recipe_slice_name()
  try:
    return targets.parse_target(name)
  except targets.TopologyError:
    raise app.UsageError(f"--topology: the recipe's mesh {name or '(default)'!r} names no TPU "
                         "slice or GPU card; give one, e.g. --topology=v5p-8, v5e:2x2 or "
                         "h100:8") from None


# The training recipes (`--config=FILE:ARG`); configs/models.py holds model shapes alone.
RECIPES = ("configs/tiny.py:STAGE", "configs/lychee.py:STAGE,SIZE,MESH",
           "configs/memagent.py:STAGE,SIZE,MESH")


def _check_recipe(config) -> None:
  """A config without a stage or mesh (configs/models.py's shapes) is not something to compile:
  said here, not as an AttributeError on `mesh`."""
  missing = [key for key in ("stage", "mesh", "train") if key not in config]
  if missing:
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    raise app.UsageError(f"--config={spec} is not a training recipe (it has no "
                         f"{', '.join(missing)}); give one of {', '.join(RECIPES)}")
  shape = _mesh(config)
  cli.mesh_axes(f"the recipe's mesh {shape} (--config.mesh)", shape)


def _mesh(config) -> dict[str, int]:
  return {k: int(v) for k, v in config.mesh.to_dict().items() if k != "dcn"}


def _fit_mesh(config, devices: int) -> None:
  """The recipe's mesh must cover the slice exactly: a mesh for another slice is a bad input."""
  import math
  shape = _mesh(config)
  known = math.prod(v for v in shape.values() if v != -1)
  if -1 in shape.values():
    if devices % known:
      raise app.UsageError(f"mesh {shape} cannot fill the slice's {devices} devices")
  elif known != devices:
    raise app.UsageError(f"mesh {shape} has {known} devices, the slice {devices}: pick the "
                         "recipe's mesh for this slice, or --config.mesh.fsdp=-1 to fill it")


def main(argv):
  del argv
  import jax
  from memrecall.capacity import aot, targets, tpu_slices
  from memrecall.models.config import ConfigError
  from memrecall.run_builder import build_run
  from memrecall.train import trainer

  from memrecall.method.recall import MODES
  cli.writable("output_json", _OUTPUT_JSON.value)
  cli.writable("hlo_dir", _HLO_DIR.value, directory=True)
  modes = [m for m in _EVAL_MODES.value if m]
  bad = sorted(set(modes) - set(MODES + ("stream",)))
  if bad:
    raise app.UsageError(f"--eval_modes: unknown {bad}; choose from {MODES + ('stream',)}")
  _check_recipe(_CONFIG.value)
  try:
    trainer.check_config(_CONFIG.value)  # train.py's own check of the stage and train.*
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  target = _target()
  if _GPU_TARGET_CONFIG.value and not targets.is_gpu(target):
    raise app.UsageError(f"--gpu_target_config is for GPU hosts; {target.topology} is a TPU")
  deviceless = targets.deviceless(target, _GPU_TARGET_CONFIG.value)
  devices = deviceless.devices
  config = _CONFIG.value
  _fit_mesh(config, len(devices))
  try:
    run = build_run(config, devices)
    tokens = _EVAL_TOKENS.value or run.num_chunks * run.compressor.chunk_size
    placement = aot.eval_weights(run, _WEIGHTS.value, deviceless.pool_bytes)
    programs = aot.recipe_programs(run, eval_batch=_EVAL_BATCH.value, eval_tokens=tokens,
                                   eval_modes=modes, eval_placement=placement,
                                   device_memory=deviceless.pool_bytes)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  names = [p.name for p in programs]
  unknown = sorted(set(_ONLY.value) - set(names))
  if unknown:
    raise app.UsageError(f"--programs: {unknown} are not programs of this stage; it has {names}")
  if _ONLY.value:
    programs = [p for p in programs if p.name in _ONLY.value]
  hbm = deviceless.memory_bytes_per_device
  own = (" on one process's devices, as launch/eval.py runs it"
         if placement.mesh.size < len(devices) else "")
  print(f"{target.topology} ({target.accelerator_type}, {target.chips} chips, {len(devices)} "
        f"devices, {hbm / tpu_slices.GiB:.1f} GiB each), mesh {dict(run.mesh.shape)}, stage "
        f"{config.stage}, jax {jax.__version__}, {deviceless.compiler}"
        + (f", evaluation{own}: {placement.line}" if any(aot.is_eval(n) for n in names) else "")
        + "".join(f", {p.inference.line}" for p in programs if p.name == "rollout"),
        flush=True)
  print(aot.HEADER, flush=True)
  if _HLO_DIR.value:
    os.makedirs(_HLO_DIR.value, exist_ok=True)
  rows = aot.compile_rows(programs, run.mesh, hbm, log=lambda line: print(line, flush=True),
                          pool_fraction=deviceless.pool_fraction, hlo_dir=_HLO_DIR.value)
  if _OUTPUT_JSON.value:
    report = {"config": config_flags.get_config_filename(flags.FLAGS["config"]),
              "overrides": config_overrides(sys.argv[1:]), "stage": config.stage,
              "topology": target.topology, "accelerator_type": target.accelerator_type,
              "chips": target.chips,
              "devices": len(devices), "mesh": dict(run.mesh.shape),
              "hbm_gib_per_device": hbm / tpu_slices.GiB, "jax": jax.__version__,
              "compiler": deviceless.compiler, "eval_modes": modes, "eval_batch": _EVAL_BATCH.value,
              "eval_tokens": tokens, "eval_weights": placement.weights,
              "eval_mesh": dict(placement.mesh.shape), "programs": _ONLY.value,
              **aot.rollout_fields(programs),
              "rows": [r.to_json() for r in rows]}
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  over = [r for r in rows if not r.fits]
  if over:
    cli.fail(f"{len(over)} of {len(rows)} programs do not fit: "
             + "; ".join(f"{r.program} by {r.total_gib - aot.FIT_FRACTION * r.hbm_gib:.2f} GiB"
                         for r in over), code=NO_FIT_EXIT)


NO_FIT_EXIT = 3  # compiled, but some program does not fit the chip (its row says by how much)


def config_overrides(argv) -> list[str]:
  """The --config.KEY=VALUE flags given: a record names the recipe as it was compiled."""
  return [a for a in argv if a.startswith("--config.")]


if __name__ == "__main__":
  cli.run(main)
