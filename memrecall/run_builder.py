"""One place that turns a config into a run: every launcher, the demo and the benchmarks start here.

A run config (`configs/*.py`) names the model and where its parameters come
from (`init`), the compressor / reasoner / recall settings, the prompts, the
training data (`data.train` as `KIND:PATH[,PATH...]`, see
`memrecall.data.specs`) and the reward.  `build_run` reads it once into a
`Run`; `Run` answers every later question (the tokenizer, the prompts, the
recall setup, the training examples of a step, the score of an answer), so no
caller assembles those pieces by hand.

Where things come from:
* `init.hf_checkpoint` set: shapes from its `config.json` (the config's
  `model` block then only sets numerics and the gate: see `MODEL_RUN_KEYS`),
  the tokenizer from its `tokenizer.json`, the chat template from its
  `tokenizer_config.json`, the compressor's window and ratio from its
  `lychee_memory_*` keys.  Prompts default to the released model's.
* otherwise: shapes from `model`, the byte tokenizer (random models).
* a training workdir (`from_workdir`): the config it saved, and the
  tokenizer and config files it copied at the start (`hf_assets/`), so a run
  stays readable after its source checkpoint moves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import warnings
from typing import Any, Sequence

from absl import logging
import flax.traverse_util
import jax
import ml_collections
import numpy as np

from memrecall.data import example as example_lib, metrics as metrics_lib, specs, synthetic
from memrecall.method.compressor import CompressorConfig
from memrecall.method.prompts import (CONTEXT_TEMPLATE, FINAL_TEMPLATE, GATE_TEMPLATE,
                                      INITIAL_MEMORY, MEMAGENT_TEMPLATE, Prompts,
                                      QWEN2_CHAT_TEMPLATE, UPDATE_TEMPLATE)
from memrecall.method.reasoner import ReasonerConfig, memory_capacity
from memrecall.method.recall import RecallConfig, RecallSetup
from memrecall.models import hf_checkpoint, qwen2 as model_lib
from memrecall.models.config import ConfigError, ModelConfig, dtype_from_name
from memrecall.models.sampling import SamplingConfig
from memrecall.models.tokenizer import CHAT_TEMPLATE_FILE, ByteTokenizer, HFTokenizer, Tokenizer
from memrecall.readers import BaselineConfig, Reader, get as get_reader, reader_class
from memrecall.runtime import checkpoint, paths, sharding as sharding_lib

# The training stages in order (each starts from the one before), and a run that only evaluates.
TRAINING_STAGES = ("compressor", "sft", "rl", "gate")
ROLLOUT_WEIGHTS = ("sharded", "replicated", "tensor")
STAGES = TRAINING_STAGES + ("eval",)
# `agent` -> the reader (`memrecall.readers`) its runs train and read with; None: the method's,
# in the mode a caller asks for (`rl.mode`, an evaluation's).
AGENTS = {"lychee": None, "memagent": "memagent"}
REWARDS = ("strict_sub_em", "sub_em", "em")
# ModelConfig fields a run config may set over a HF checkpoint's config.json (never shapes).
MODEL_RUN_KEYS = ("compressor", "gate_lora_rank", "gate_lora_alpha", "gate_lora_targets",
                  "param_dtype", "dtype", "attention", "remat", "remat_blocks",
                  "matmul_precision", "mlp_chunk_tokens", "head_chunk_tokens")
HF_ASSETS = "hf_assets"  # a training workdir's copy of the checkpoint's config and tokenizer files
_ASSET_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                CHAT_TEMPLATE_FILE)
_DEFAULT_PROMPTS = {"update_template": UPDATE_TEMPLATE, "final_template": FINAL_TEMPLATE,
                    "gate_template": GATE_TEMPLATE, "memagent_template": MEMAGENT_TEMPLATE,
                    "context_template": CONTEXT_TEMPLATE}


@dataclasses.dataclass
class Run:
  """Everything built from the config once (see the module doc)."""
  config: ml_collections.ConfigDict
  model: ModelConfig
  compressor: CompressorConfig
  reasoner: ReasonerConfig
  prompts: Prompts
  tokenizer: Tokenizer
  mesh: Any
  task: synthetic.TaskConfig | None  # the synthetic task, when the data is synthetic

  # --- settings -------------------------------------------------------------

  @property
  def agent(self) -> str:
    """lychee (reads compressed chunks) or memagent (reads raw chunks: the baseline)."""
    return self.config.get("agent", "lychee")

  @property
  def answers_in_box(self) -> bool:
    """Whether the final prompt asks for the answer in `\\boxed{}` (MemAgent's): answers are
    then scored on the box alone, an answer without one as nothing (`metrics.score_answer`)."""
    return metrics_lib.BOX in (self.config.prompts.get("final_template") or FINAL_TEMPLATE)

  @property
  def answers_after_phrase(self) -> bool:
    """Whether the final prompt asks for "Therefore, the answer is ..." (MemAgent's evaluation
    harness's): answers are then scored on what follows its last "the answer is", an answer
    without it as nothing (`metrics.after_answer_is`)."""
    template = self.config.prompts.get("final_template") or FINAL_TEMPLATE
    return f"Therefore, {metrics_lib.ANSWER_IS}" in template

  def reader_name(self, mode: str = "all") -> str:
    """The reader this run's agent reads with: its own (`AGENTS`), or the method in `mode`."""
    return AGENTS[self.agent] or mode

  @property
  def form(self) -> str:
    """How answers are scored: `ids` (the synthetic small-vocabulary form) or `text`."""
    return self.task.form if self.task is not None else "text"

  @property
  def num_chunks(self) -> int:
    """Chunks per training document (the synthetic task's length, or `data.max_chunks`)."""
    if self.task is not None:
      return -(-self.task.length // self.compressor.chunk_size)
    return int(self.config.data.max_chunks)

  @property
  def question_tokens(self) -> int:
    return int(self.config.reasoner.question_tokens)

  @property
  def memory_capacity(self) -> int:
    return memory_capacity(self.prompts.initial_memory, self.reasoner)

  def recall_setup(self, mode: str = "all", *, threshold: float | None = None, topk: int = 4,
                   gate_group: int = 16, group_size: int = 8, temperature: float = 0.0,
                   top_p: float = 1.0) -> RecallSetup:
    """The static setup of the recall loop (and of the baselines) for this run's model:
    greedy, or sampled at `temperature` (and `top_p`) as RL's rollouts and a sampled
    evaluation are."""
    threshold = self.config.gate.threshold if threshold is None else threshold
    return RecallSetup(
        model=self.model, prompts=self.prompts, reasoner=self.reasoner,
        recall=RecallConfig(mode=mode, threshold=threshold, topk=topk, gate_group=gate_group,
                            group_size=group_size),
        sampling=SamplingConfig(temperature=temperature, top_p=top_p,
                                eos_ids=self.model.eos_token_ids, pad_id=self.model.pad_token_id))

  def reader(self, mode: str = "all", *, baseline: BaselineConfig | None = None,
             placement: str | None = None, **recall) -> Reader:
    """The agent's reader (`reader_name`) on this run's `recall_setup(**recall)`; baseline:
    the baselines' cuts (default: sections of the run's chunk size, as it trains on);
    placement: where the method's compressed blocks live (`readers.method`)."""
    baseline = baseline or BaselineConfig(memagent_chunk=self.compressor.chunk_size,
                                          rag_chunk=self.compressor.chunk_size)
    options = {} if placement is None else {"placement": placement}
    return get_reader(self.reader_name(mode), self.recall_setup("all", **recall),
                      self.compressor, baseline, **options)

  # --- parameters -----------------------------------------------------------

  def param_shardings(self):
    """Where each parameter lives on this run's mesh: the logical-axis rules' NamedShardings
    (stacked layout, as checkpoints and training hold them)."""
    return sharding_lib.param_shardings(model_lib.abstract_params(self.model), self.mesh)

  def params(self, init_step: int | None = None):
    """Initial parameters, placed on the mesh: an earlier stage's workdir (`init.checkpoint`,
    its latest step or `init_step`), the HF checkpoint (`init.hf_checkpoint`; beacons and gate
    initialised where it has none), or random (`init.seed`)."""
    init = self.config.init
    shardings = self.param_shardings()
    if init.checkpoint:
      check_param_shapes(self.model, checkpoint.param_shapes(init.checkpoint, init_step),
                         init.checkpoint)
      # Read onto the run's shardings: whole, a 7B model would first sit on one device.
      params, _ = checkpoint.load_params(init.checkpoint, init_step, shardings)
      return jax.device_put(jax.tree.map(lambda x: x.astype(self.model.jnp_param_dtype), params),
                            shardings)
    if init.hf_checkpoint:
      overrides = {k: getattr(self.model, k) for k in MODEL_RUN_KEYS}
      params, _ = hf_checkpoint.load_hf_checkpoint(init.hf_checkpoint, mesh=self.mesh, **overrides)
      return params
    return model_lib.init_params(self.model, jax.random.key(init.seed), self.mesh)

  # --- data -----------------------------------------------------------------

  def data_options(self, **changes) -> specs.DataOptions:
    d = self.config.data
    return dataclasses.replace(
        specs.DataOptions(num_docs=int(d.num_docs), hotpotqa_dev=d.hotpotqa_dev, seed=int(d.seed),
                          text_tokens=self.compressor.chunk_size * self.num_chunks,
                          task=self.task, size=int(d.synthetic_size)), **changes)

  def sources(self, spec: str, split: str = "test", **changes) -> list[specs.NamedSource]:
    """The named sources of a `KIND:PATH[,PATH...]` spec, read with this run's tokenizer.

    `split` picks the rows of synthetic and tfds sources: "test", held out from training, by
    default (as launch/eval.py's --split), so a notebook's evaluation never scores the training
    stream's own examples; `train_sources` reads "train"."""
    return specs.open_sources(spec, self.data_options(split=split, **changes), self.tokenizer)

  def task_at(self, step: int) -> synthetic.TaskConfig:
    """The synthetic task with the curriculum's distractor density at `step`
    (docs/architecture.md#curriculum): none before `task.curriculum_start`, then a linear ramp
    to full density at `task.curriculum_end`.
    Absolute steps, so extending a run's budget never changes the data already seen."""
    start, end = self.config.task.curriculum_start, self.config.task.curriculum_end
    if end <= 0 or step >= end:
      return self.task
    fraction = max(0.0, (step - start) / max(end - start, 1))
    return dataclasses.replace(self.task, distractor_density=self.task.distractor_density * fraction)

  def examples(self, start: int, count: int, seed_offset: int = 0, step: int | None = None
               ) -> list[example_lib.TokenizedExample]:
    """Examples start..start+count of the training stream; each process asks only for its rows.

    Synthetic data is generated on the fly (`seed_offset` picks another stream, `step` the
    curriculum).  Files are read through `data.train`; position i of the stream is row
    `perm_e[i mod n]` of epoch e = i // n, a fresh permutation per epoch (`data.seed`)."""
    if self.task is not None:
      seed = self.config.task.seed + seed_offset
      task = self.task if step is None else self.task_at(step)
      return [example_lib.tokenize(synthetic.make_example(task, seed, i, self.tokenizer),
                                   self.tokenizer) for i in range(start, start + count)]
    source = self.train_source
    n = len(source)
    skip = self.config.data.get("overlong", "error") == "skip"
    budget = self.num_chunks * self.compressor.chunk_size  # tokens a training document may have
    out = []
    for i in range(start, start + count):
      epoch, position = divmod(i, n)
      order = _epoch_order(int(self.config.data.seed), seed_offset, epoch, n)
      example = example_lib.tokenize(source[int(order[position])], self.tokenizer)
      # data.overlong=skip: the next row of the epoch's order that fits takes an overlong
      # row's place (verl filters such prompts out), the same on every process and resume.
      for tried in range(1, n + 1 if skip else 1):
        if len(example.context) <= budget:
          break
        self._note_overlong(example, budget)
        if tried == n:
          raise ConfigError(f"no row of data.train fits data.max_chunks ({self.num_chunks} "
                            f"chunks of {self.compressor.chunk_size} tokens)")
        example = example_lib.tokenize(source[int(order[(position + tried) % n])],
                                       self.tokenizer)
      out.append(example)
    return out

  @functools.cached_property
  def _overlong_noted(self) -> set[tuple]:
    return set()

  def _note_overlong(self, example: example_lib.TokenizedExample, budget: int) -> None:
    """Logs once per row of this run that `data.overlong=skip` left it out."""
    meta = example.example.metadata
    key = (meta.get("source"), example.example.id)  # ids may repeat across files
    if key not in self._overlong_noted:
      self._overlong_noted.add(key)
      where = f"{meta['source']} row {meta['row']}" if "source" in meta and "row" in meta else ""
      logging.warning("data.overlong=skip: example %s%s (%d tokens, over the %d of "
                      "data.max_chunks) is left out", example.example.id,
                      f" ({where})" if where else "", len(example.context), budget)

  @functools.cached_property
  def train_sources(self) -> list[specs.NamedSource]:
    """The files of `data.train`, each opened once."""
    if not self.config.data.train:
      raise ConfigError("data.train is empty: name the training data as KIND:PATH[,PATH...]")
    return self.sources(self.config.data.train, split="train")

  @functools.cached_property
  def train_source(self) -> specs.ConcatSource:
    """Every file of `data.train` as one source."""
    source = specs.ConcatSource([n.source for n in self.train_sources])
    if not len(source):
      raise ConfigError(f"data.train {self.config.data.train!r} holds no examples")
    return source

  # --- scoring --------------------------------------------------------------

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids: the synthetic ids form's token names (`synthetic.SmallVocab`, which
    the byte tokenizer would decode to nothing), else the tokenizer's."""
    if self.form == "ids":
      return synthetic.SmallVocab(self.task.num_entities).decode(ids)
    return self.tokenizer.decode(ids)

  def score(self, prediction: Sequence[int], example: example_lib.TokenizedExample
            ) -> dict[str, float]:
    """em, sub_em (MemAgent-compatible), strict_sub_em of an answer's ids (its EOS ids are
    dropped here: a sampler's `tokens[:lengths]` counts the EOS).

    The ids form compares token ids exactly (all three equal); text is scored on the
    decoded prediction against the example's own answer strings."""
    eos = set(self.model.eos_token_ids)
    prediction = [int(t) for t in prediction if int(t) not in eos]
    if self.form == "ids":
      hit = float(any(tuple(prediction) == tuple(g) for g in example.answers))
      return {"em": hit, "sub_em": hit, "strict_sub_em": hit}
    return metrics_lib.score_answer(self.tokenizer.decode(prediction), self.answer_texts(example),
                                    boxed=self.answers_in_box,
                                    answer_is=self.answers_after_phrase)

  def answer_texts(self, example: example_lib.TokenizedExample) -> list[str]:
    """The example's accepted answers as text (its own strings; ids decoded by `decode`)."""
    return [a if isinstance(a, str) else self.decode(a) for a in example.example.answers]

  def reward(self, prediction: Sequence[int], example: example_lib.TokenizedExample) -> float:
    """The RL reward: `rl.reward` of `score` (default strict sub-EM: an answer that normalises
    to nothing earns 0, where MemAgent's compatible sub-EM pays 1.0 for "the")."""
    return self.score(prediction, example)[self.config.rl.get("reward", "strict_sub_em")]

  # --- saving ---------------------------------------------------------------

  def save_assets(self, workdir: str) -> None:
    """Copies the HF checkpoint's config and tokenizer files into `workdir/hf_assets` (at each
    start of a stage, after its resume checks)."""
    source = self.config.init.hf_checkpoint
    target = os.path.join(workdir, HF_ASSETS)
    if not source or os.path.abspath(source) == os.path.abspath(target):
      return
    os.makedirs(target, exist_ok=True)
    for name in _ASSET_FILES:
      if os.path.exists(os.path.join(source, name)):
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
  """The rows of epoch `epoch` of a training stream, in the order it reads them."""
  return np.random.default_rng([seed, stream, epoch]).permutation(n)


# --- building ---------------------------------------------------------------------


# config.json's mark of a checkpoint exported from a run on the byte tokenizer (it has no
# tokenizer.json, and needs none).
_BYTES_MARK = {"memrecall_tokenizer": "bytes"}


def _tokenizer(setting: str, hf_dir: str | None, model: ModelConfig,
               raw: dict | None = None) -> Tokenizer:
  """`init.tokenizer`: empty = the HF checkpoint's tokenizer.json (bytes for a random model, or
  a checkpoint `export_hf_checkpoint` marked as trained on bytes); `bytes`; or a directory
  holding a tokenizer.json (e.g. the base model's)."""
  marked = raw is not None and all(raw.get(k) == v for k, v in _BYTES_MARK.items())
  if setting == "bytes" or not (setting or hf_dir) or (not setting and marked):
    return ByteTokenizer()
  directory = setting or hf_dir
  if not os.path.exists(os.path.join(directory, "tokenizer.json")):
    raise ConfigError(f"{directory} has no tokenizer.json: memrecall needs the checkpoint's own "
                      "tokenizer to read text (copy it from the base model, or point "
                      "init.tokenizer at a directory that has one)")
  return HFTokenizer(directory, model.eos_token_ids, model.pad_token_id)


def _pad_from_tokenizer(model: ModelConfig, raw: dict, tokenizer: Tokenizer) -> ModelConfig:
  """A config.json without `pad_token_id` takes the tokenizer's pad token (Qwen2.5's
  `<|endoftext|>`), as the reference code pads with it."""
  if raw.get("pad_token_id") is not None or not isinstance(tokenizer, HFTokenizer):
    return model
  pad = tokenizer.config.get("pad_token")
  pad = pad.get("content") if isinstance(pad, dict) else pad
  pad_id = tokenizer.token_id(pad) if isinstance(pad, str) else None
  return model if pad_id is None else model.replace(pad_token_id=pad_id)


def _chat_template(setting: str, tokenizer: Tokenizer) -> str | None:
  """`auto`: the tokenizer's own, Qwen2.5's for a tokenizer.json without one, none for bytes;
  empty: none; anything else is the template itself."""
  if setting != "auto":
    return setting or None
  if isinstance(tokenizer, HFTokenizer):
    return tokenizer.chat_template or QWEN2_CHAT_TEMPLATE
  return None


def _compressor(config: ml_collections.ConfigDict, raw: dict | None) -> CompressorConfig:
  """The config's settings; a LycheeMemory checkpoint's window and ratio (0 in the config: take
  the checkpoint's, or 2048 and 4 for a plain Qwen2 one)."""
  c = config.compressor
  # MemAgent's sections (no beacons) keep the config's sizes where it gives them all.
  own_sizes = c.get("chunk_size") and c.get("window") and c.get("ratio")
  no_beacons = not config.model.get("compressor", True) and own_sizes
  if raw is None or no_beacons or ("lychee_memory_window" not in raw and c.get("window")
                                   and c.get("ratio")):
    return CompressorConfig(chunk_size=c.chunk_size, window=c.window, ratio=c.ratio,
                            group_size=c.get("group_size"))
  # The checkpoint's own window and ratio first: a chunk size that does not fit them is
  # then named after a window or ratio set against them.
  own = CompressorConfig.from_hf_dict(
      raw, None if "lychee_memory_window" in raw else c.chunk_size or None, c.get("group_size"))
  for key in ("window", "ratio"):
    if c.get(key) and c[key] != getattr(own, key):
      raise ConfigError(f"compressor.{key}={c[key]} differs from the checkpoint's "
                        f"lychee_memory_{key} ({getattr(own, key)}): the beacons were "
                        f"trained with it; set compressor.{key}=0 to take the checkpoint's")
  return CompressorConfig.from_hf_dict(raw, c.chunk_size or None, c.get("group_size"))


def _task(config: ml_collections.ConfigDict) -> synthetic.TaskConfig | None:
  train = config.data.get("train", "") if "data" in config else ""
  if (train and not train.startswith("synthetic:")) or (not train and "task" not in config):
    return None
  if "task" not in config:
    raise ConfigError("the synthetic data needs a `task` block")
  values = {k: v for k, v in config.task.to_dict().items()
            if k not in ("seed", "curriculum_start", "curriculum_end")}
  task = synthetic.TaskConfig(**values)
  if train and train.partition(":")[2] != task.task:
    raise ConfigError(f"data.train {train!r} names another task than task.task={task.task!r}")
  return task


def workdir_assets(workdir: str) -> str | None:
  """The HF assets a training workdir keeps (`Run.save_assets`: the backbone's config.json,
  tokenizer and chat template), or None for a run with no HF backbone."""
  assets = os.path.join(os.fspath(workdir), HF_ASSETS)
  return assets if os.path.exists(os.path.join(assets, "config.json")) else None


def build_run(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Run:
  """Reads a run config (see the module doc); every error names the key at fault.

  devices: the mesh's devices (default: all of this process's job's); launch/compile.py
  passes deviceless TPU devices to compile a recipe for a slice it does not have."""
  config = with_defaults(config)
  if config.stage not in STAGES:
    raise ConfigError(f"unknown stage {config.stage!r}; choose from {STAGES}")
  agent = config.get("agent", "lychee")
  if agent not in AGENTS:
    raise ConfigError(f"unknown agent {agent!r}; choose from {tuple(AGENTS)}")
  reads = reader_class(AGENTS[agent] or "all")
  if config.stage not in reads.stages:
    trained = " and ".join(s for s in reads.stages if s != "eval")
    raise ConfigError(f"the {agent} agent {reads.summary}: it has no {config.stage} stage "
                      f"(train it with {trained})")
  if not reads.has_gate and config.get("sft", {}).get("gate_weight", 0.0):
    raise ConfigError(f"the {agent} agent has no gate: set sft.gate_weight to 0")
  if (config.stage == "sft" and config.sft.gate_weight > 0
      and config.train.trainable not in ("gate", "all")):
    # The relevance head starts at zero: frozen, it passes no gradient to the adapters either.
    raise ConfigError(f"sft.gate_weight={config.sft.gate_weight} trains the gate jointly with "
                      f"SFT, but train.trainable={config.train.trainable!r} freezes the gate's "
                      "relevance head: set train.trainable=all, or sft.gate_weight=0")
  if config.stage == "gate" and config.train.trainable not in ("gate", "all"):
    # The gate's loss reads only the gate's adapters and head: anything else trains nothing.
    raise ConfigError(f"the gate stage trains the gate, but train.trainable="
                      f"{config.train.trainable!r} freezes it: set train.trainable=gate "
                      "(a config's STAGE argument sets it, e.g. configs/tiny.py:gate)")
  if config.stage == "rl" and not config.rl.clip_ratio_c > 1:
    raise ConfigError(f"rl.clip_ratio_c={config.rl.clip_ratio_c}: the dual clip caps a negative "
                      "advantage's ratio, so it must be above 1 (verl's default: 3)")
  if config.stage == "rl" and config.rl.group_size < 2:
    raise ConfigError(f"rl.group_size={config.rl.group_size}: each rollout's advantage is its "
                      "reward against its group's, so a group needs at least 2 rollouts")
  if config.rl.get("reward", "strict_sub_em") not in REWARDS:
    raise ConfigError(f"unknown rl.reward {config.rl.reward!r}; choose from {REWARDS}")
  if config.rl.get("rollout_weights", "sharded") not in ROLLOUT_WEIGHTS:
    raise ConfigError(f"unknown rl.rollout_weights {config.rl.rollout_weights!r}; choose from "
                      f"{ROLLOUT_WEIGHTS}")
  if config.data.get("overlong", "error") not in ("error", "skip"):
    raise ConfigError(f"unknown data.overlong {config.data.overlong!r}; choose from error, skip")
  if config.init.checkpoint and not config.init.hf_checkpoint:
    # An earlier stage's workdir: its backbone's config, tokenizer and chat template come too
    # (without them a Qwen2.5 run would read byte ids with another EOS, and say nothing).
    config.init.hf_checkpoint = workdir_assets(config.init.checkpoint) or ""
  hf_dir = config.init.hf_checkpoint or None
  model_values = config.model.to_dict()
  if hf_dir:
    model, raw = hf_checkpoint.read_config(
        hf_dir, **{k: model_values[k] for k in MODEL_RUN_KEYS if k in model_values})
  else:
    model, raw = ModelConfig.from_dict(model_values), None
  tokenizer = _tokenizer(config.init.tokenizer, hf_dir, model, raw)
  if raw is not None:
    model = _pad_from_tokenizer(model, raw, tokenizer)
    tokenizer.pad_id = model.pad_token_id
  compressor = _compressor(config, raw)
  reasoner = ReasonerConfig(memory_size=config.reasoner.memory_size,
                            answer_tokens=config.reasoner.answer_tokens)
  task = _task(config)
  p = config.prompts
  templates = {k: p.get(k) or default for k, default in _DEFAULT_PROMPTS.items()}
  if task is not None and p.get("initial_memory"):
    raise ConfigError("prompts.initial_memory does not apply to a synthetic task, whose memory "
                      "starts as the task says (synthetic.initial_memory): drop it")
  initial = synthetic.initial_memory(task) if task is not None else (
      p.get("initial_memory") or INITIAL_MEMORY)
  prompts = Prompts.build(tokenizer, _chat_template(p.get("chat_template", "auto"), tokenizer),
                          initial_memory=initial, **templates)
  if task is not None and model.vocab_size < synthetic.SmallVocab(task.num_entities).size:
    raise ConfigError(f"vocab_size {model.vocab_size} is too small for the task's tokens")
  if isinstance(tokenizer, HFTokenizer) and model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
                      f"only {model.vocab_size}")
  mesh = sharding_lib.make_mesh(config.mesh.to_dict(), devices)
  return Run(config, model, compressor, reasoner, prompts, tokenizer, mesh, task)


def default_config() -> ml_collections.ConfigDict:
  """Every block and key a run reads, at its default: the one base every recipe extends
  (configs/*.py start here), and what fills the gaps of a config saved by an older memrecall.

  The `model` block is empty: shapes and numerics come from configs/models.py or a HF
  checkpoint's config.json.  Compressor sizes of 0 take the checkpoint's (two windows per
  chunk, see `_compressor`).  The training blocks hold the paper's recipe (configs/lychee.py).
  """
  return ml_collections.ConfigDict({
      "stage": "eval", "seed": 0, "agent": "lychee",
      "model": {},
      "init": {"checkpoint": "", "hf_checkpoint": "", "seed": 0, "tokenizer": ""},
      # group_size: chunks compressed per device at a time (None: GROUP_TOKENS' worth).
      "compressor": {"chunk_size": 0, "window": 0, "ratio": 0,
                     "group_size": ml_collections.config_dict.placeholder(int)},
      "reasoner": {"memory_size": 1024, "answer_tokens": 256, "question_tokens": 1024},
      # Empty templates take the released model's (memrecall/method/prompts.py); `auto` wraps
      # them in the checkpoint's chat template.
      "prompts": {"chat_template": "auto", "update_template": "", "final_template": "",
                  "gate_template": "", "memagent_template": "", "context_template": "",
                  "initial_memory": ""},
      # KIND:PATH[,PATH...] (memrecall/data/specs.py).  hotpotqa: documents per question (200 ~
      # 28K tokens, MemAgent's RL length); max_chunks: chunks per training document.
      # overlong: a training row over max_chunks chunks stops the run naming it ("error"), or
      # the epoch's next row that fits takes its place ("skip", logged once per row).
      "data": {"train": "", "num_docs": 200, "hotpotqa_dev": "", "seed": 0,
               "max_chunks": 8, "overlong": "error", "synthetic_size": 1024},
      # microbatches: rows of a step run in k parts one after another.
      "train": {"steps": 500, "batch_size": 128, "microbatches": 1, "trainable": "backbone",
                "log_every": 1, "checkpoint_every": 25, "keep": 3, "async_checkpoint": True},
      "optimizer": {"learning_rate": 1e-6, "warmup_steps": 10, "decay_steps": 500,
                    "final_fraction": 1.0, "b1": 0.9, "b2": 0.999, "weight_decay": 0.01,
                    "grad_clip": 1.0},
      "rl": {"group_size": 16, "advantage": "grpo_no_std", "temperature": 1.0, "eps_low": 0.2,
             "eps_high": 0.2, "clip_ratio_c": 3.0, "kl_coef": 1e-3, "kl_estimator": "low_var_kl",
             "aggregation": "token_mean", "mode": "all", "reward": "strict_sub_em",
             # The ratio's denominator: "policy" (the training pass's own, as verl recomputes
             # them; every ratio 1) or "rollout" (the sampler's recorded log-probs).
             "old_logprobs": "policy",
             # Optimizer updates per rollout batch, each on 1/u of its questions (whole groups)
             # in turn: verl's mini-batches (train_batch_size / ppo_mini_batch_size).  With
             # "policy", u > 1 scores the old log-probs in a pass before the first update.
             "updates_per_batch": 1,
             # The rollout's weights: "sharded" as training shards them (an fsdp mesh gathers
             # each layer's at every decode step), or "replicated": gathered once per rollout,
             # one more bfloat16 copy of the model per device.
             "rollout_weights": "sharded"},
      "gate": {"threshold": 0.5, "positive_weight": 1.0},
      "sft": {"gate_weight": 0.0},
      "pretrain": {"recall": False},
      # data x fsdp x tensor; -1: every remaining device.  dcn: each axis's factor across TPU
      # slices or GPU hosts (`--config.mesh.dcn.data=2`; sharding.make_mesh).
      "mesh": {"data": 1, "fsdp": -1, "tensor": 1, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}},
  })


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` over `default_config()`: every block a run reads exists (configs saved by older
  versions lack some); a synthetic task with no `data.train` names itself there."""
  merged = default_config()
  for block, values in config.to_dict().items():
    if isinstance(values, dict) and isinstance(merged.get(block), ml_collections.ConfigDict):
      merged[block].update(values)
    else:
      merged[block] = values
  if "task" in merged and not merged.data.train:
    merged.data.train = f"synthetic:{merged.task.task}"
  return merged


# config.json's key for what an export of a memrecall run carries besides its weights
# (`exported_run`): the settings that decide its answers, read back by `eval_config`.
EXPORTED_RUN = "memrecall_run"


def exported_run(run: Run) -> dict:
  """The run's prompts, reasoner budgets, chunk size, gate threshold and synthetic task (when it
  has one), as an export records them: without them a tiny run read back with --hf_checkpoint
  took the released model's prompts and 1024-token budgets and answered nothing."""
  c = run.config
  out = {"prompts": c.prompts.to_dict(), "reasoner": c.reasoner.to_dict(),
         "gate": {"threshold": float(c.gate.threshold)}}
  if run.model.compressor:  # a raw-chunk reader's sections are not compressor chunks
    out["compressor"] = {"chunk_size": run.compressor.chunk_size}
  if run.task is not None:
    out["task"] = c.task.to_dict()
  return out


def _exported_settings(hf_checkpoint_dir: str) -> dict:
  """`exported_run`'s record in a checkpoint's config.json ({} for one memrecall did not export,
  e.g. a released LycheeMemory checkpoint)."""
  path = os.path.join(hf_checkpoint_dir, "config.json") if hf_checkpoint_dir else ""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f).get(EXPORTED_RUN, {})


def eval_config(hf_checkpoint_dir: str = "", *, chunk_size: int = 0,
                memory_size: int | None = None, answer_tokens: int | None = None,
                question_tokens: int | None = None, model: dict | None = None,
                tokenizer: str = "", prompts: dict | None = None,
                mesh: dict | None = None) -> ml_collections.ConfigDict:
  """The run config of using a HF checkpoint as it is (launch/eval.py and launch/answer.py with
  --hf_checkpoint).  An export of a memrecall run brings its own prompts, budgets, chunk size,
  gate threshold and synthetic task (`exported_run`); the arguments replace them.  Otherwise:
  chunk_size 0 is two compressor windows, budgets of 1024 tokens (the `max_new_tokens` of
  LycheeMemory's example and of MemAgent's evaluation: an answer cut short has no closing box
  to score) and the released model's prompts.  model: `MODEL_RUN_KEYS` to set; tokenizer: as
  `init.tokenizer`; prompts: templates to replace (`prompts` block keys); mesh: axis sizes
  (default: every device on fsdp)."""
  c = default_config()
  c.model = ml_collections.ConfigDict({"compressor": True, **(model or {})})
  c.init.hf_checkpoint = hf_checkpoint_dir
  c.init.tokenizer = tokenizer
  c.reasoner.update({"memory_size": 1024, "answer_tokens": 1024, "question_tokens": 1024})
  for block, values in _exported_settings(hf_checkpoint_dir).items():
    if block == "task":
      c.task = ml_collections.ConfigDict(values)
    else:
      c[block].update(values)
  c.compressor.chunk_size = chunk_size or c.compressor.chunk_size
  sizes = {"memory_size": memory_size, "answer_tokens": answer_tokens,
           "question_tokens": question_tokens}
  c.reasoner.update({k: v for k, v in sizes.items() if v is not None})
  c.prompts.update(prompts or {})
  if mesh:
    c.mesh = ml_collections.ConfigDict(dict(mesh))
  return c


def from_hf_checkpoint(directory: str, devices: Sequence[Any] | None = None, **settings) -> Run:
  """The run of evaluating (or answering with) a HF checkpoint; `settings` as in `eval_config`,
  devices as in `build_run` (an evaluation process passes its own: `jax.local_devices()`)."""
  return build_run(eval_config(directory, **settings), devices)


# The run settings evaluation may change, by key: the config block each lives in.
SIZE_OVERRIDES = {"chunk_size": "compressor", "memory_size": "reasoner",
                  "answer_tokens": "reasoner", "question_tokens": "reasoner"}


def apply_overrides(config: ml_collections.ConfigDict, *, matmul_precision: str | None = None,
                    mesh: dict | None = None, **sizes) -> ml_collections.ConfigDict:
  """`config` with the settings an evaluation asks for (each None or 0: the config's own):
  matmul_precision, mesh axis sizes and the `SIZE_OVERRIDES`.  Changes `config` and returns it."""
  unknown = sorted(set(sizes) - set(SIZE_OVERRIDES))
  if unknown:
    raise TypeError(f"unknown overrides {unknown}; choose from {sorted(SIZE_OVERRIDES)}")
  if matmul_precision:
    config.model.matmul_precision = matmul_precision
  if mesh:
    config.mesh = ml_collections.ConfigDict(dict(mesh))
  for key, value in sizes.items():
    if value:
      config[SIZE_OVERRIDES[key]][key] = value
  return config


def check_param_shapes(model: ModelConfig, shapes: Any, source: str) -> None:
  """`model`'s parameter shapes against `shapes` (a tree of tuples, e.g. a checkpoint's
  `checkpoint.param_shapes`), naming the first parameter that differs: weights of other shapes
  would fail deep inside a restore, or be read into a config they do not belong to."""
  want = flax.traverse_util.flatten_dict(jax.tree.map(
      lambda x: tuple(x.value.shape), model_lib.abstract_params(model),
      is_leaf=lambda x: hasattr(x, "names")))
  got = flax.traverse_util.flatten_dict(shapes)
  for path in sorted(set(want) | set(got)):
    if want.get(path) != got.get(path):
      raise ConfigError(f"the parameters in {source} do not match this model config: "
                        f"{'/'.join(path)} is {got.get(path, 'missing')} there, "
                        f"{want.get(path, 'absent')} in the config")


def workdir_run(workdir: str, matmul_precision: str | None = None, *, step: int | None = None,
                devices: Sequence[Any] | None = None, mesh: dict | None = None,
                config: ml_collections.ConfigDict | None = None, **sizes) -> tuple[Run, int]:
  """(run, step) of a memrecall training run's checkpoint, built from the config it saved; no
  weight is read (what a trace's plot or a look at the config needs).

  workdir: a training workdir, or one checkpoint's folder WORKDIR/checkpoints/STEP.  step: which
  checkpoint (None: that folder's, else the latest).  matmul_precision:
  `ModelConfig.matmul_precision` to evaluate with (None: the run's own).  devices, mesh: the
  mesh's devices (`build_run`) and axis sizes; mesh None is the saved run's where these devices
  can form it, else every device on fsdp, with a warning (a pod's run read on one host).
  config: a config to build the run from instead of the saved one (its model must have the
  checkpoint's parameter shapes).  sizes: `SIZE_OVERRIDES` to evaluate with other settings
  (None or 0: the run's own).
  """
  workdir, step = checkpoint.step_folder(os.fspath(workdir), step)
  saved, step = checkpoint.load_config(workdir, step)
  if config is None:
    config = with_defaults(ml_collections.ConfigDict(saved))
    # The workdir's own copy of its backbone's config, tokenizer and chat template, also where
    # they came through `init.checkpoint` alone (the saved config then names no HF checkpoint).
    if workdir_assets(workdir):
      config.init.hf_checkpoint = workdir_assets(workdir)
  else:
    config = with_defaults(config)
  # The weights come from this checkpoint, not from the stage's initial one (which may be gone).
  config.init.checkpoint = ""
  apply_overrides(config, matmul_precision=matmul_precision, mesh=mesh, **sizes)
  try:
    return build_run(config, devices), step
  except sharding_lib.MeshError as e:
    if mesh is not None:
      raise
    devices = jax.devices() if devices is None else devices
    warnings.warn(f"the run's mesh does not fit this process ({e}): its {len(devices)} "
                  "device(s) on fsdp instead (pass mesh=, or a launcher's --mesh, to choose)",
                  stacklevel=2)
    return build_run(apply_overrides(config, mesh={"fsdp": -1}), devices), step


def from_workdir(workdir: str, matmul_precision: str | None = None, *, step: int | None = None,
                 devices: Sequence[Any] | None = None, mesh: dict | None = None,
                 config: ml_collections.ConfigDict | None = None,
                 **sizes) -> tuple[Run, Any]:
  """(run, params) of a memrecall training run's checkpoint (the latest, or `step`; a
  WORKDIR/checkpoints/STEP folder names its own), the parameters read straight onto the run's
  mesh (sharded by the rules, as in training).  The other arguments: `workdir_run`'s.
  """
  run, step = workdir_run(workdir, matmul_precision, step=step, devices=devices, mesh=mesh,
                          config=config, **sizes)
  workdir, _ = checkpoint.step_folder(os.fspath(workdir), step)
  check_param_shapes(run.model, checkpoint.param_shapes(workdir, step), workdir)
  params, _ = checkpoint.load_params(workdir, step, run.param_shardings())
  return run, params


# What an exported checkpoint takes from the backbone's files, besides its weights and
# config.json (which `export_hf_checkpoint` writes from the run's model).
_EXPORTED_ASSETS = tuple(name for name in _ASSET_FILES if name != "config.json")


def export_hf_checkpoint(run: Run, params, directory: str, *, dtype: str = "bfloat16",
                         max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes a trained run as a HF checkpoint in LycheeMemory's layout: the weights in `dtype`
  (Qwen2's names, the beacons' `lychee_memory_*`, the gate's `similarity_head` and its adapters
  under memrecall's names), config.json with the compressor's and gate's keys and the run's
  answering settings (`exported_run`, under `memrecall_run`), and the
  backbone's tokenizer, chat template and generation config where the run has them (a run on
  the byte tokenizer is marked so in config.json, and reads back with it).  Returns the files
  written.  `directory` must be new or empty: nothing already there is replaced."""
  directory = paths.local_path(os.fspath(directory), "export directory")
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} is not empty: export into a new directory (nothing "
                          "there is replaced)")
  model = run.model.replace(param_dtype=dtype, dtype=dtype)
  cast = jax.tree.map(lambda x: x.astype(dtype_from_name(dtype)), params)
  extra = {**(run.compressor.to_hf_dict() if model.compressor else {}),
           **(_BYTES_MARK if isinstance(run.tokenizer, ByteTokenizer) else {}),
           EXPORTED_RUN: exported_run(run)}
  hf_checkpoint.save_hf_checkpoint(cast, model, directory, max_shard_bytes=max_shard_bytes,
                                   extra_config=extra)
  source = run.config.init.hf_checkpoint
  for name in _EXPORTED_ASSETS if source else ():
    if os.path.exists(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
  return sorted(os.listdir(directory))


def load_hf_checkpoint(directory: str | os.PathLike, *, chunk_size: int = 0, mesh=None,
                       **model_settings) -> tuple[Run, Any]:
  """(run, params) of a LycheeMemory (or plain Qwen2: beacons initialised from q/k/v) HF
  checkpoint, ready to recall, as `from_workdir` gives a training run's.

  The prompts and budgets are an export's own (`exported_run`), else the released model's, the
  prompts wrapped in the tokenizer's chat template; `mesh` None puts every parameter on the
  first device.  model_settings: `MODEL_RUN_KEYS`.
  A checkpoint without a tokenizer.json gets the byte tokenizer (for work on token ids).
  """
  directory = os.fspath(directory)
  has_tokenizer = os.path.exists(os.path.join(directory, "tokenizer.json"))
  run = from_hf_checkpoint(directory, chunk_size=chunk_size, model=model_settings,
                           tokenizer="" if has_tokenizer else "bytes")
  params, _ = hf_checkpoint.load_hf_checkpoint(
      directory, mesh=mesh, **{k: getattr(run.model, k) for k in MODEL_RUN_KEYS})
  return run, params
