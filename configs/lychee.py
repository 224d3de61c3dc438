"""LycheeMemory from a Qwen2.5-Instruct backbone: `--config configs/lychee.py:STAGE[,SIZE[,MESH]]`.

STAGE (in order; docs/architecture.md#training-stages):
  compressor  beacon pre-training: language modelling through the beacons on `text` data.
  sft         optional warm start on oracle memory traces (`hotpotqa` data builds them).
  rl          end-to-end GRPO of compressor + reasoner on `rows` (MemAgent's RL file) or
              `hotpotqa`, the gradient flowing through the compressed K/V into the beacons.
  gate        the BCE relevance classifier on `hotpotqa`'s supporting-fact labels.
SIZE: 0.5b, 1.5b, 3b, 7b (default; the paper's).  MESH: gpu8 (one host of 8 GPUs, default),
v5p-64 (32 chips), or auto (every device on fsdp).

Set the backbone and the data on the command line, e.g.
  --config.init.hf_checkpoint=/ckpt/Qwen2.5-7B-Instruct
  --config.data.train=rows:/data/hotpotqa_train_32k.parquet
Shapes, tokenizer and chat template then come from the checkpoint; the `model` block below
only sets numerics and the gate (and the shapes of a random init, e.g. for launch/plan.py).
Each later stage starts from the one before: --config.init.checkpoint=WORKDIR_OF_IT.
The paper's settings: chunks of 4096 tokens, windows of 2048, ratio 4 (1024 slots per chunk),
memory updates of up to 1024 tokens, G = 16 rollouts per question, lr 1e-6, KL 1e-3 (k3),
clip 0.2, AdamW, gradient clip 1.0.
"""

import ml_collections

from configs import models
from memrecall import run_builder

SIZES = {"0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "3b": "qwen2.5-3b", "7b": "qwen2.5-7b"}
# data x fsdp x tensor.  One 8-GPU host: parameters and optimizer state sharded 8 ways.
# A v5p-64 slice is 32 chips: 4 data-parallel groups of 8-way fsdp.
MESHES = {"gpu8": {"data": 1, "fsdp": 8, "tensor": 1}, "v5p-64": {"data": 4, "fsdp": 8, "tensor": 1},
          "auto": {"data": 1, "fsdp": -1, "tensor": 1}}


def parse(arg: str, stages=run_builder.TRAINING_STAGES) -> tuple[str, str, str]:
  fields = arg.split(",")
  if len(fields) > 3:
    raise ValueError(f"{arg!r} has {len(fields)} fields; expected STAGE[,SIZE[,MESH]]")
  stage, size, mesh = (fields + ["", ""])[:3]
  size, mesh = size or "7b", mesh or "gpu8"
  if stage not in stages:
    raise ValueError(f"unknown stage {stage!r}; choose from {stages}")
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {tuple(SIZES)}")
  if mesh not in MESHES:
    raise ValueError(f"unknown mesh {mesh!r}; choose from {tuple(MESHES)}")
  return stage, size, mesh


def base_config(stage: str, size: str, mesh: str) -> ml_collections.ConfigDict:
  """The settings every stage (and configs/memagent.py) shares: `run_builder.default_config()`
  (which holds the paper's training recipe) with this backbone, its gate and the paper's
  compressor, reasoner and mesh."""
  c = run_builder.default_config()
  c.stage = stage
  c.model = models.model_config(SIZES[size])
  # float32 master weights (and so Adam's moments); products run in bfloat16 (`model.dtype`).
  # Evaluation and RL's rollouts read a bfloat16 copy (`qwen2.inference_params`).
  c.model.param_dtype = "float32"
  c.model.compressor = True
  # The gate's adapters exist from the first stage, so every stage's checkpoint has one tree.
  c.model.gate_lora_rank = 16
  c.model.gate_lora_alpha = 32.0
  c.model.gate_lora_targets = ("q", "k", "v", "o")
  c.model.remat = "full"
  c.compressor.update({"chunk_size": 4096, "window": 2048, "ratio": 4})
  c.reasoner.question_tokens = 256
  c.mesh.update(MESHES[mesh])
  return c


def with_microbatches(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """One row per device per microbatch (`train.microbatches=0`, resolved on the run's mesh, so
  `auto` meshes and overridden batch sizes keep it): a step's activations are one turn's (the
  parts are weighted by their tokens: the whole batch's token-mean step)."""
  c.train.microbatches = 0
  return c


def get_config(arg: str = "rl") -> ml_collections.ConfigDict:
  stage, size, mesh = parse(arg)
  c = base_config(stage, size, mesh)
  if stage == "compressor":
    # Beacons only, one chunk per row of `text` data.
    c.train.trainable = "beacon"
    c.train.steps, c.train.batch_size = 2000, 64
    c.data.max_chunks = 1
    c.optimizer.learning_rate = 5e-5
    c.optimizer.final_fraction = 0.1
    c.optimizer.decay_steps = 2000
  elif stage == "sft":
    c.train.steps, c.train.batch_size = 300, 32
    c.optimizer.learning_rate = 1e-5
  elif stage == "rl":
    c.train.batch_size = 16 * c.rl.group_size  # 16 questions x G rollouts
  elif stage == "gate":
    c.train.trainable = "gate"
    c.train.steps, c.train.batch_size = 1000, 32
    c.optimizer.learning_rate = 1e-4
    c.optimizer.final_fraction = 0.1
    c.optimizer.decay_steps = 1000
    # About 2 of every 7 chunks of a 200-document question hold a gold paragraph (estimated;
    # labels stop at its last supporting sentence, so a few fewer are positive).
    c.gate.positive_weight = 2.0
  return with_microbatches(c)
