"""The MemAgent baseline (raw-chunk recurrent reading): `--config configs/memagent.py:STAGE[,SIZE[,MESH]]`.

STAGE `rl` (default) is the same GRPO recipe as configs/lychee.py:rl, but each memory update
reads a raw 5000-token section in MemAgent's prompt (no compressor, no gate); `sft` warm-starts
it on oracle traces as lychee.py:sft does.  Sizes and meshes as in lychee.py.
"""

import ml_collections

from configs import lychee
from memrecall.method.prompts import MEMAGENT_FINAL_TEMPLATE


def get_config(arg: str = "rl") -> ml_collections.ConfigDict:
  stage, size, mesh = lychee.parse(arg, stages=("sft", "rl"))
  c = lychee.base_config(stage, size, mesh)
  c.agent = "memagent"
  c.model.compressor = False
  c.model.gate_lora_rank = 0
  # Raw sections of 5000 tokens (the window and ratio are unused without beacons).
  c.compressor.update({"chunk_size": 5000, "window": 5000, "ratio": 4})
  c.data.max_chunks = 6  # 28K-token documents
  c.prompts.final_template = MEMAGENT_FINAL_TEMPLATE  # its answers come in a box
  if stage == "rl":
    c.train.batch_size = 16 * c.rl.group_size
  else:
    c.train.steps, c.train.batch_size = 300, 32
    c.optimizer.learning_rate = 1e-5
  return lychee.with_microbatches(c)
