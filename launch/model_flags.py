"""The model flags of the launchers that load a checkpoint to answer with (eval.py, answer.py)."""

from typing import Any, Callable

from absl import flags

GATE_LORA_RANK = flags.DEFINE_integer(
    "gate_lora_rank", None, "HF checkpoints: rank of the gate's adapters, a fresh gate for a "
    "checkpoint without one (0: no gate; default: the checkpoint's own, which a gate exported "
    "by launch/export.py records, else none).", lower_bound=0)
MATMUL_PRECISION = flags.DEFINE_enum(
    "matmul_precision", None, ["default", "high", "highest"],
    "Precision of every matmul (ModelConfig.matmul_precision): `highest` for float32 results "
    "that are compared with a reference (on NVIDIA GPUs `default` runs float32 in TF32).  "
    "Default: the run's own model.matmul_precision (`default` for a HF checkpoint).")

MESH = flags.DEFINE_string(
    "mesh", None, "Axis sizes of the mesh each process runs on, over its own devices, e.g. "
    "fsdp=4,tensor=2: the weights placed on it as --weights says, a batch's questions split over "
    "data x fsdp (default: the run's mesh, or every device on fsdp where the run's does not "
    "fit this process's devices; every device on fsdp for a HF checkpoint).")


WEIGHTS = flags.DEFINE_enum(
    "weights", "auto", ["auto", "sharded", "tensor", "replicated"],
    "Where the weights live on a mesh of several devices (sharding.INFERENCE_WEIGHTS): "
    "`sharded` by training's rules (an fsdp axis then gathers every layer's weights at every "
    "decode step), `replicated` (a whole bfloat16 copy on each device, each reading its own "
    "questions), `tensor` (the devices formed into data x tensor, the weights split over heads "
    "and MLP columns on the fewest devices whose share fits a third of one, and kept there), "
    "`auto`: replicated when a whole copy takes at most a third of a device's memory, else "
    "tensor where a share does, else sharded (CPUs, whose memory JAX does not report: "
    "sharded).")


def mesh_shape() -> dict | None:
  """--mesh as axis sizes (None: the run's own); a one-line error when malformed."""
  from launch import cli  # pylint: disable=g-import-not-at-top
  return cli.mesh_shape("mesh", MESH.value)


def on_own_devices(load: Callable[[dict | None], Any], devices: int) -> Any:
  """`cli.on_own_devices` with --mesh."""
  from launch import cli  # pylint: disable=g-import-not-at-top
  return cli.on_own_devices(load, devices, mesh_shape())


def hf_model_settings() -> dict:
  """The `model` settings of `run_builder.from_hf_checkpoint` these flags give (a flag left out
  leaves the run's own)."""
  settings = {}
  if GATE_LORA_RANK.value is not None:
    settings["gate_lora_rank"] = GATE_LORA_RANK.value
  if MATMUL_PRECISION.value is not None:
    settings["matmul_precision"] = MATMUL_PRECISION.value
  return settings
