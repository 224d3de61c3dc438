r"""Prints per-device memory of a setup before launching it.

  python launch/plan.py --config=configs/lychee.py:rl,7b,gpu8
  python launch/plan.py --model=qwen2.5-7b --mesh=fsdp=8 --batch=16 --turn_tokens=2560

With --config, the mesh, trainable subset, batch, microbatches, compressed slots and the
turn length (slots + question + memory in and out + ~300 template tokens) come from the
recipe; any flag given explicitly overrides it.

Parameters and AdamW moments (for the trainable subset) come from the model's
shapes and the logical-axis rules; activations are a stated estimate (see
memrecall/plan.py); the memory bank is --bank_chunks compressed chunks.  Bad flags are
one-line errors (sizes are positive; leave a flag out for its default).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "A training config (its model).")
_MODEL = flags.DEFINE_string("model", None, "Or a shape from configs/models.py.")
_MESH = flags.DEFINE_string("mesh", None, "Axis sizes, e.g. data=2,fsdp=4,tensor=1 (default: "
                            "the config's, or fsdp=8).")
_TRAINABLE = flags.DEFINE_string("trainable", None, "beacon | lora | gate | backbone | all "
                                 "(default: the config's, or backbone).")
_BATCH = flags.DEFINE_integer("batch", None, "Rows per step (default: the config's, or 16).",
                              lower_bound=1)
_MICROBATCHES = flags.DEFINE_integer("microbatches", None, "Parts of a step (default: the "
                                     "config's, or 1).", lower_bound=1)
_TURN_TOKENS = flags.DEFINE_integer("turn_tokens", None, "Tokens of one turn (slots + prompt + "
                                    "update; default: from the config, or 2560).", lower_bound=1)
_BANK_CHUNKS = flags.DEFINE_integer("bank_chunks", None, "Compressed chunks held on device "
                                    "(default: an RL recipe's rollout bank, batch x max_chunks; "
                                    "else 0).", lower_bound=0)
_SLOTS = flags.DEFINE_integer("slots", None, "Compressed slots per chunk (C / r; default: the "
                              "config's, or 1024).", lower_bound=1)
_TEMPLATE_TOKENS = 300  # the released update prompt and chat markup, about
_DEVICE_GIB = flags.DEFINE_float("device_gib", 80.0, "Device memory to compare with.",
                                 lower_bound=0.001)
from launch import cli  # noqa: E402  (--verbose and one-line errors)


def main(argv):
  del argv
  from configs import models
  from memrecall import plan
  from memrecall.config import ModelConfig
  from memrecall.train.state import SUBSETS

  defaults = {"mesh": "fsdp=8", "trainable": "backbone", "batch": 16, "microbatches": 1,
              "turn_tokens": 2560, "slots": 1024, "bank_chunks": 0}
  c = _CONFIG.value
  if c is not None:
    model = ModelConfig.from_dict(c.model.to_dict())
    slots = c.compressor.chunk_size // c.compressor.ratio
    question, memory = c.reasoner.question_tokens, c.reasoner.memory_size
    raw = c.compressor.chunk_size if c.get("agent") == "memagent" else 0
    defaults.update(
        mesh=",".join(f"{k}={v}" for k, v in c.mesh.to_dict().items() if k != "dcn"),
        trainable=c.train.trainable, batch=c.train.batch_size,
        microbatches=c.train.get("microbatches", 1), slots=slots,
        turn_tokens=(0 if raw else slots) + raw + question + 2 * memory + _TEMPLATE_TOKENS)
    if c.stage == "compressor":  # a chunk with its beacons
      defaults["turn_tokens"] = c.compressor.chunk_size + slots
    if c.stage == "rl" and not raw:  # the rollout compresses every row's document at once
      defaults["bank_chunks"] = c.train.batch_size * c.data.max_chunks
  elif _MODEL.value:
    try:
      shape = models.model_config(_MODEL.value)
    except ValueError as e:
      raise app.UsageError(f"--model: {e}") from None
    model = ModelConfig.from_dict(shape.to_dict()).replace(compressor=True)
  else:
    raise app.UsageError("give --config or --model")
  value = lambda flag, key: defaults[key] if flag.value is None else flag.value
  mesh = value(_MESH, "mesh")
  try:
    sizes = {k.strip(): int(v) for k, v in (i.split("=") for i in mesh.split(","))}
  except ValueError:
    raise app.UsageError(f"--mesh must look like 'data=2,fsdp=4', got {mesh!r}") from None
  if any(v < 1 for v in sizes.values()):
    raise app.UsageError(f"--mesh={mesh}: planning needs explicit positive axis sizes (no 0 or -1)")
  unknown = set(sizes) - {"data", "fsdp", "tensor"}
  if unknown:
    raise app.UsageError(f"--mesh={mesh}: unknown axes {sorted(unknown)}; use data, fsdp, tensor")
  trainable = value(_TRAINABLE, "trainable")
  if trainable not in SUBSETS:
    raise app.UsageError(f"--trainable={trainable}: choose from {', '.join(SUBSETS)}")
  result = plan.plan(model, sizes, trainable=trainable,
                     batch=value(_BATCH, "batch"), turn_tokens=value(_TURN_TOKENS, "turn_tokens"),
                     bank_chunks=value(_BANK_CHUNKS, "bank_chunks"), slots=value(_SLOTS, "slots"),
                     microbatches=value(_MICROBATCHES, "microbatches"))
  gib = lambda b: b / 2**30
  print(f"mesh {sizes} ({result.devices} devices), per device:")
  for name in ("params", "optimizer", "activations", "memory_bank"):
    print(f"  {name:<12}{gib(getattr(result, name)):10.2f} GiB")
  print(f"  {'total':<12}{gib(result.total):10.2f} GiB of {_DEVICE_GIB.value:.0f} GiB: "
        f"{'fits' if gib(result.total) <= _DEVICE_GIB.value else 'does NOT fit'}")


if __name__ == "__main__":
  cli.run(main)
