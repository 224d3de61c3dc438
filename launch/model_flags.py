"""The model flags of the launchers that load a checkpoint to answer with (eval.py, answer.py)."""

from absl import flags

GATE_LORA_RANK = flags.DEFINE_integer(
    "gate_lora_rank", 0, "HF checkpoints: rank of the gate's adapters, a fresh gate for a "
    "checkpoint without one (0: no gate).", lower_bound=0)
MATMUL_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "default", ["default", "high", "highest"],
    "Precision of every matmul (ModelConfig.matmul_precision): `highest` for float32 results "
    "that are compared with a reference (on NVIDIA GPUs `default` runs float32 in TF32).")


def hf_model_settings() -> dict:
  """The `model` settings of `runs.from_hf_checkpoint` these flags give."""
  return {"gate_lora_rank": GATE_LORA_RANK.value, "matmul_precision": MATMUL_PRECISION.value}
