r"""Prints per-device memory of a setup before launching it.

  python launch/plan.py --model=qwen2.5-7b --mesh=fsdp=8 --batch=16 --turn_tokens=2560
  python launch/plan.py --config=configs/tiny.py:rl --mesh=data=2,fsdp=4

Parameters and AdamW moments (for the trainable subset) come from the model's
shapes and the logical-axis rules; activations are a stated estimate (see
memrecall/plan.py); the memory bank is --bank_chunks compressed chunks.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "A training config (its model).")
_MODEL = flags.DEFINE_string("model", None, "Or a shape from configs/models.py.")
_MESH = flags.DEFINE_string("mesh", "fsdp=8", "Axis sizes, e.g. data=2,fsdp=4,tensor=1.")
_TRAINABLE = flags.DEFINE_string("trainable", "backbone", "beacon | lora | gate | backbone | all.")
_BATCH = flags.DEFINE_integer("batch", 16, "Rows per step.")
_TURN_TOKENS = flags.DEFINE_integer("turn_tokens", 2560, "Tokens of one turn (slots + prompt + update).")
_BANK_CHUNKS = flags.DEFINE_integer("bank_chunks", 0, "Compressed chunks held on device.")
_SLOTS = flags.DEFINE_integer("slots", 1024, "Compressed slots per chunk (C / r).")
_DEVICE_GIB = flags.DEFINE_float("device_gib", 80.0, "Device memory to compare with.")


def main(argv):
  del argv
  from configs import models
  from memrecall import plan
  from memrecall.config import ModelConfig

  if _CONFIG.value is not None:
    model = ModelConfig.from_dict(_CONFIG.value.model.to_dict())
  elif _MODEL.value:
    model = ModelConfig.from_dict(models.model_config(_MODEL.value).to_dict()).replace(
        compressor=True)
  else:
    raise app.UsageError("give --config or --model")
  try:
    sizes = {k.strip(): int(v) for k, v in (i.split("=") for i in _MESH.value.split(","))}
  except ValueError:
    raise app.UsageError(f"--mesh must look like 'data=2,fsdp=4', got {_MESH.value!r}") from None
  result = plan.plan(model, sizes, trainable=_TRAINABLE.value, batch=_BATCH.value,
                     turn_tokens=_TURN_TOKENS.value, bank_chunks=_BANK_CHUNKS.value,
                     slots=_SLOTS.value)
  gib = lambda b: b / 2**30
  print(f"mesh {sizes} ({result.devices} devices), per device:")
  for name in ("params", "optimizer", "activations", "memory_bank"):
    print(f"  {name:<12}{gib(getattr(result, name)):10.2f} GiB")
  print(f"  {'total':<12}{gib(result.total):10.2f} GiB of {_DEVICE_GIB.value:.0f} GiB: "
        f"{'fits' if gib(result.total) <= _DEVICE_GIB.value else 'does NOT fit'}")


if __name__ == "__main__":
  app.run(main)
