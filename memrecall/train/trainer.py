"""The training driver shared by every stage: init or resume, the step loop, logging, checkpoints.

Stages (docs/architecture.md#training-stages): `compressor` (beacon
pre-training), `sft` (teacher-forced warm start on oracle memory traces), `rl`
(multi-conversation GRPO with rollouts from the recall loop) and `gate` (the
BCE relevance classifier).
Rerunning the same command on the same workdir resumes exactly: the state,
the RNG and the data position all come back from the latest checkpoint.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from memrecall.data import synthetic
from memrecall.method.recall import abstract_inference_layout, inference_layout
from memrecall.models import qwen2 as model_lib
from memrecall.models.placement import Placement, placement
from memrecall.models.config import ConfigError
from memrecall.run_builder import TRAINING_STAGES, Run, build_run
from memrecall.runtime import checkpoint, distributed, fingerprint, sharding as sharding_lib
from memrecall.runtime.paths import local_path
from memrecall.runtime.checkpoint import Checkpointer
from memrecall.train import batches, grpo, objectives, state as state_lib
from memrecall.train.metrics_writer import MetricsWriter



class TrainingError(RuntimeError):
  """A run that must stop (non-finite loss or gradients)."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: launchers (and schedulers' requeue hooks) rerun the command


class Preempted(RuntimeError):
  """SIGTERM or SIGINT arrived: the run saved its step and stopped; the same command resumes."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: saved step {step} in {directory}; rerun the same command to "
                     "resume from it")
    self.step = step


class _StopSignals:
  """Records SIGTERM / SIGINT instead of dying, so the loop can finish its step and save.

  `requested()` is every process's answer at once (any process signalled -> all stop at the
  same step), so the checkpoint they write together is complete."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.flag, self.previous = False, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self.previous[sig] = signal.signal(sig, self._record)
    return self

  def _record(self, signum, frame):
    del frame
    self.flag = True
    print(f"[memrecall] {signal.Signals(signum).name}: stopping after this step", file=sys.stderr,
          flush=True)

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.flag))))

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def check_workdir(workdir: str) -> None:
  """Fails early, with the path, when the workdir cannot be written."""
  local_path(workdir, "workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    # A uniquely named probe: every process of a multi-host run checks the same shared workdir.
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
      pass
  except OSError as e:
    raise OSError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def _batch_shardings(local_batch, mesh):
  """Shardings of the global batch whose rows this process holds a 1/process_count share of."""
  def global_rows(x):  # rows over the batch axes, the rest replicated
    return sharding_lib.rows_sharding((np.shape(x)[0] * jax.process_count(),) + np.shape(x)[1:],
                                      mesh)
  return jax.tree.map(global_rows, local_batch)


def abstract_batch(shapes, mesh):
  """A global batch's ShapeDtypeStructs (`_Stage.batch_shapes`) with the shardings `to_global`
  gives the real one: what a step is compiled for without data (launch/compile.py)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding_lib.rows_sharding(x.shape, mesh)), shapes)


def to_global(local_batch, mesh):
  """Host-local rows -> global jax.Arrays sharded over the batch axes (every process calls it)."""
  return distributed.global_batch(local_batch, _batch_shardings(local_batch, mesh))


class _WindowMeans:
  """Each metric's mean over the steps since the last logged one: a logged loss or reward is
  the window's, not one step's sample of it (an RL step's reward is a few groups' mean)."""

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._counts: dict[str, int] = {}

  def add(self, metrics: dict) -> None:
    for key, value in metrics.items():
      self._sums[key] = self._sums.get(key, 0.0) + value
      self._counts[key] = self._counts.get(key, 0) + 1

  def pop(self) -> dict:
    means = {key: total / self._counts[key] for key, total in self._sums.items()}
    self._sums, self._counts = {}, {}
    return means


class _Console:
  def __init__(self, total_steps: int, start_step: int):
    self.total, self.start_step, self.start = total_steps, start_step, time.perf_counter()

  def line(self, step: int, metrics: dict) -> str:
    elapsed = time.perf_counter() - self.start
    done = step - self.start_step
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate else float("nan")
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "finite")
    return f"step {step}/{self.total} {rate:.2f} steps/s ETA {eta:.0f}s | {shown}"


# Config keys (or whole blocks) a resumed run may change: the step budget, logging and
# checkpointing, microbatches (the same step in fewer or more parts), the optimizer's settings,
# the mesh (a checkpoint restores onto any), the demo's evaluation sizes, and leaving overlong
# rows out (a run stopped at one goes on past it).  Not train.batch_size (a step's rows are
# `step * batch_size` on in the data) nor train.trainable (the optimizer state holds the
# trainable leaves).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep",
                     "train.async_checkpoint", "train.microbatches", "optimizer", "mesh", "demo",
                     "data.overlong",
                     # How values are computed or placed, not which: recomputation, chunking,
                     # the rollout's weights (a run out of memory resumes with smaller chunks).
                     "model.remat", "model.remat_blocks", "model.mlp_chunk_tokens",
                     "model.head_chunk_tokens", "compressor.group_size", "rl.rollout_weights")
# The same, among the model's settings (`_model_settings`).
_RESUMABLE_MODEL_FIELDS = ("remat", "remat_blocks", "mlp_chunk_tokens", "head_chunk_tokens")


def _resumable(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


# Settings added after runs were saved without them: what those runs trained with, by key, and
# the stage that reads it (elsewhere the missing key takes the new default).
_SAVED_BEFORE_THE_KEY = {"rl.old_logprobs": ("rollout", "rl"), "rl.updates_per_batch": (1, "rl")}


def _check_same_run(saved: dict, config: dict, workdir: str) -> None:
  """A workdir resumes only the run that wrote it: another model, data, stage or objective
  would continue someone else's checkpoint as if it were this run's (a ConfigError names
  the keys)."""
  keep = lambda tree: {k: v for k, v in _flat(tree).items() if not _resumable(k)}
  old, new = keep(saved), keep(config)
  for key, (value, stage) in _SAVED_BEFORE_THE_KEY.items():
    old.setdefault(key, value if config.get("stage") == stage else new.get(key))
  diffs = [f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k)]
  if diffs:
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    raise ConfigError(f"{workdir} holds another run's checkpoints ({shown}): use another "
                      "--workdir, or the config it was trained with to resume it")


def _check_same_data(saved: list[dict], now: list[dict], workdir: str) -> None:
  """A resumed run reads the data its checkpoints were trained on: a file rewritten in place
  (same name, other rows) would silently change the stream from the resumed step on."""
  if saved != now:
    # Matched by source, not position: a source added or dropped is named (its keys None).
    there, here = ({entry["file"]: entry for entry in entries} for entries in (saved, now))
    changed = []
    for name in dict.fromkeys([*here, *there]):
      old, new = there.get(name, {}), here.get(name, {})
      changed += [f"{name}: {k} {old.get(k)} there, {new.get(k)} now"
                  for k in sorted(set(old) | set(new)) if k != "file" and old.get(k) != new.get(k)]
    changed = changed or [f"{len(saved)} sources there, {len(now)} now: the same ones, in "
                          "another order or repeated"]
    raise ConfigError(f"{workdir}'s checkpoints were trained on other data.train content "
                      f"({'; '.join(changed)}): restore the data (or the code that wrote it), "
                      "or train in another --workdir")


def _model_settings(run) -> dict:
  """The backbone's and compressor's settings as built, JSON-normal: with an HF backbone they
  come from its config.json and generation_config.json, which the run's config does not hold."""
  model = {k: v for k, v in dataclasses.asdict(run.model).items()
           if k not in _RESUMABLE_MODEL_FIELDS}
  settings = {**model, "compressor.window": run.compressor.window,
              "compressor.ratio": run.compressor.ratio}
  return json.loads(json.dumps(settings, default=str))


def _check_same_model(saved: dict | None, now: dict, workdir: str) -> None:
  """A resumed run has the backbone its checkpoints were trained with: an HF config.json or
  generation_config.json edited in place (another rope_theta, EOS or beacon ratio) would
  silently change every step from the resumed one.  (None: a checkpoint from before the
  record.)"""
  if saved is None or saved == now:
    return
  diffs = [f"{k} {saved.get(k)!r} there, {now.get(k)!r} now"
           for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
  raise ConfigError(f"{workdir}'s checkpoints were trained with other model settings "
                    f"({'; '.join(diffs[:4])}): restore the backbone's config.json and "
                    "generation_config.json, or train in another --workdir")


def _unboxed(boxed):
  """A `model_lib.abstract_params` tree as plain ShapeDtypeStructs."""
  return jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: hasattr(x, "names"))


def _warn_undivided(run, boxed, log) -> None:
  """Says, before any weight is read, when the mesh leaves much of the model whole on every
  device (an fsdp size that does not divide the hidden size): otherwise the first sign is an
  out-of-memory error that names no setting.  boxed: `model_lib.abstract_params(run.model)`."""
  whole = sharding_lib.undivided(boxed, run.mesh)
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(boxed))
  held = sum(size for *_, size in whole)
  if whole and held > 0.01 * total:
    path, shape, _ = max(whole, key=lambda w: w[2])
    log(f"warning: {len(whole)} parameters ({held / 2**30:.2f} of {total / 2**30:.2f} GiB) are "
        f"kept whole on every device of mesh {dict(run.mesh.shape)}, whose axes do not divide "
        f"them (the largest: {path} {shape}); choose mesh sizes that divide the model's "
        f"dimensions (hidden size {run.model.hidden_size})")


def _check_same_tokenizer(saved: str | None, tokenizer, workdir: str) -> None:
  """A resumed run reads text with the tokenizer its checkpoints were trained with: one edited
  in place (same directory, other ids) would silently change every row from the resumed step.
  (None: a checkpoint from before the record.)"""
  if saved is not None and saved != tokenizer.fingerprint:
    where = getattr(tokenizer, "directory", None) or "the byte tokenizer"
    raise ConfigError(f"{workdir}'s checkpoints were trained with another tokenizer (tokenizer "
                      f"{saved} there, {tokenizer.fingerprint} now, from {where}): restore its "
                      "tokenizer.json and tokenizer_config.json, or train in another --workdir")


def _init_source(config: ml_collections.ConfigDict) -> str:
  init = config.init
  return (f"init.checkpoint {init.checkpoint}" if init.checkpoint else
          f"init.hf_checkpoint {init.hf_checkpoint}" if init.hf_checkpoint else
          f"init.seed {init.seed}")


def _init_step(config: ml_collections.ConfigDict, recorded: int | None, workdir: str
               ) -> int | None:
  """The step of `init.checkpoint` the run starts from: its latest, or on a resume that needs
  the initial parameters the one recorded when the run started (refused if it is gone)."""
  if not config.init.checkpoint:
    return None
  steps = checkpoint.steps(config.init.checkpoint)
  if recorded is None:
    return max(steps)
  if recorded not in steps:
    raise ConfigError(f"{workdir} holds an RL run that started from step {recorded} of "
                      f"init.checkpoint {config.init.checkpoint}, which holds steps {steps} now: "
                      "its KL reference (the policy it started from) cannot be rebuilt; start "
                      "the run again in another --workdir")
  return recorded


# Settings no program of a stage reads: a `train` that differs from an earlier one only in these
# (a resume to more steps, a rerun in a notebook, the same stage from another checkpoint of the
# same model) runs that call's jitted programs again (`_kept_programs`).
_NOT_TRACED = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep",
               "train.async_checkpoint", "init", "demo")
# The jitted programs of the last few runs, with their compiled executables.
_KEPT_RUNS = 4
_KEPT: collections.OrderedDict = collections.OrderedDict()


def clear_kept_programs() -> None:
  """Forgets the programs `train` keeps (`jax.clear_caches()` does not): after editing the
  model's or the objectives' code in a running notebook, whose configs did not change."""
  _KEPT.clear()


def _kept_programs(config_json: dict, run: Run, make: Callable[[], dict],
                   rollout: Placement | None = None) -> dict:
  """`make()`'s jitted programs, or those it made for an earlier run that traces the same.

  Each `jax.jit` made anew traces, lowers and fetches its program again, even when the
  compilation cache has it: a repeated `train` of the tests' tiny model took 2.0 s (SFT) and
  3.3 s (RL) with new jits, 0.8 and 0.9 s with these (2-core machine); more with a real model.
  The key is every setting of `config_json` (the config as `train` saves it) but `_NOT_TRACED`,
  with what the run built from files (the model's and compressor's settings, the prompts' ids,
  the tokenizer), the mesh and `rollout` (where RL's rollout puts its weights, which a device's
  memory decides)."""
  settings = {k: v for k, v in _flat(config_json).items()
              if not any(k == n or k.startswith(n + ".") for n in _NOT_TRACED)}
  key = (json.dumps(settings, sort_keys=True), run.model, run.compressor, run.reasoner,
         run.prompts, run.tokenizer.fingerprint, run.mesh, rollout)
  if key in _KEPT:
    _KEPT.move_to_end(key)
    return _KEPT[key]
  programs = _KEPT[key] = make()
  while len(_KEPT) > _KEPT_RUNS:
    _KEPT.popitem(last=False)
  return programs


def check_config(config: ml_collections.ConfigDict) -> None:
  """The stage, the train block's counts and RL's choices, before any work: `train`'s, and
  launch/compile.py's for the same step (a batch of 0 rows ended there in a ZeroDivisionError)."""
  if config.stage not in TRAINING_STAGES:
    raise ConfigError(f"unknown stage {config.stage!r}; choose from {TRAINING_STAGES}")
  for key in ("steps", "batch_size", "checkpoint_every", "log_every", "keep"):
    value = config.train.get(key, 1)
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"train.{key} must be a positive integer, got {value!r}")
  # The objective's choices, here rather than at the first step's trace after a whole rollout.
  rl = config.get("rl", {})
  for key, choices in (("advantage", grpo.ADVANTAGES), ("kl_estimator", grpo.KL_ESTIMATORS),
                       ("aggregation", grpo.AGGREGATIONS), ("old_logprobs", grpo.OLD_LOGPROBS)):
    if key in rl and rl[key] not in choices:
      raise ConfigError(f"unknown rl.{key} {rl[key]!r}; choose from {choices}")
  updates = rl.get("updates_per_batch", 1)
  if not isinstance(updates, int) or updates < 1:
    raise ConfigError(f"rl.updates_per_batch must be a positive integer, got {updates!r}")
  if config.stage == "rl" and updates > 1:
    questions, group = config.train.batch_size // max(rl.group_size, 1), rl.group_size
    if questions % updates:
      raise ConfigError(f"rl.updates_per_batch={updates} must divide the step's {questions} "
                        f"questions (train.batch_size {config.train.batch_size} / rl.group_size "
                        f"{group}): each update takes whole groups")


def train(config: ml_collections.ConfigDict, workdir: str, log=print,
          stop_at: Callable[[int, Any], bool] | None = None) -> dict:
  """Runs (or resumes) one stage; returns the last logged metrics (means over their logging
  window, as metrics.jsonl's last line).

  stop_at(step, params): asked at every checkpoint step (`train.checkpoint_every`);
  True saves that step and returns early (a later call resumes from it).
  SIGTERM / SIGINT (a preemption notice): the current step finishes, every process saves it,
  the save completes, and `Preempted` is raised (launch/train.py exits with
  PREEMPTED_EXIT_CODE); rerunning the command resumes exactly.
  """
  check_workdir(workdir)
  distributed.check_shared_directory(workdir, "workdir")
  check_config(config)
  run = build_run(config)
  if run.model.param_dtype != "float32":
    raise ConfigError(
        f"model.param_dtype is {run.model.param_dtype}: training needs float32 master weights "
        "(an update of ~1e-6 is lost in a 16-bit weight, whose spacing near 0.02 is ~1e-4); "
        "set --config.model.param_dtype=float32 (products still run in model.dtype)")
  updates, microbatches = update_parts(config, sharding_lib.batch_shards(run.mesh))
  stage = _STAGES[config.stage](run)
  stage.check_data()
  optimizer = make_optimizer(config)
  checkpointer = Checkpointer(workdir, save_every=config.train.checkpoint_every,
                              keep=config.train.keep, async_save=config.train.async_checkpoint)
  config_json = json.loads(config.to_json_best_effort())
  latest = checkpointer.latest_step()
  saved_inputs = None
  if latest is not None:  # before any parameter is built
    _check_same_run(checkpointer.saved_json(latest, "config"), config_json, workdir)
    saved_inputs = checkpointer.saved_json(latest, "data").get("inputs")
  if run.task is None:
    data_keys = [{"file": named.path, **named.key()} for named in run.train_sources]
  else:  # a task's examples follow its settings (the config's) and how its text form is written
    key = synthetic.task_key(run.task)
    data_keys = ([{"file": f"synthetic:{run.task.task}", "text_form": key["text_form"]}]
                 if "text_form" in key else [])
  if saved_inputs is not None:
    _check_same_data(saved_inputs["data"], data_keys, workdir)
    _check_same_tokenizer(saved_inputs.get("tokenizer"), run.tokenizer, workdir)
    _check_same_model(saved_inputs.get("model"), _model_settings(run), workdir)
  # A resumed RL run rebuilds its KL reference from the step of `init.checkpoint` it started
  # from, not from whatever that workdir has reached since.
  keeps_reference = saved_inputs is not None and stage.reads_initial_params
  # Other stages resume from their own checkpoint alone: the initial parameters are not read
  # again (a whole model's load), and the record of where the run started stays as it was.
  reads_initial = saved_inputs is None or keeps_reference
  if reads_initial:
    init_step = _init_step(config, saved_inputs["init_step"] if keeps_reference else None,
                           workdir)
  else:
    init_step = saved_inputs.get("init_step")
  if reads_initial and init_step is not None:
    # Every process: orbax's restore synchronises them (process 0 alone had waited on the
    # others' next barrier, and called the good checkpoint corrupted).
    earlier, at = checkpoint.load_config(config.init.checkpoint, init_step)
    planned = earlier.get("train", {}).get("steps")
    if distributed.is_primary():
      log(f"starting from {config.init.checkpoint} at step {at}"
          + (f" of its {planned}: that stage did not finish" if planned and at < planned else ""))
  boxed = model_lib.abstract_params(run.model)
  _warn_undivided(run, boxed, log)
  with jax.set_mesh(run.mesh):
    # Shapes only on a resume that reads no initial parameters: the restore fills the state.
    params = run.params(init_step) if reads_initial else _unboxed(boxed)
    # Recorded only where a resume needs the initial parameters again.
    initial = fingerprint.params_fingerprint(params) if stage.reads_initial_params else None
    if keeps_reference and saved_inputs["initial_params"] != initial:
      raise ConfigError(
          f"{workdir} holds an RL run whose KL reference is the policy it started from "
          f"(parameters {saved_inputs['initial_params']}), and {_init_source(config)} now "
          f"holds other weights (parameters {initial}): restore them, or start the run in "
          "another --workdir")
    inputs = {"data": data_keys, "init_step": init_step, "initial_params": initial,
              "tokenizer": run.tokenizer.fingerprint, "model": _model_settings(run)}
    if distributed.is_primary():  # after every check: a refused run changes nothing
      run.save_assets(workdir)
    paths = state_lib.trainable_paths(params, config.train.trainable)
    trainable, seed = config.train.trainable, config.seed
    create = lambda p: state_lib.create_train_state(p, trainable, optimizer, seed)
    shape = jax.eval_shape(create, params)
    shardings = state_lib.state_shardings(run.model, shape, run.mesh)
    programs = _kept_programs(config_json, run, lambda: {
        "create": jax.jit(create, out_shardings=shardings),
        "step": jit_train_step(stage, optimizer, paths, microbatches, updates),
        **stage.jitted()}, stage.rollout_weights)
    stage.use(programs)
    data = {"step": 0, "inputs": inputs}
    if latest is None:
      state = programs["create"](params)
    else:
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              shape, shardings)
      state, _, data = checkpointer.restore(latest, abstract)
      if distributed.is_primary():
        log(f"resumed from {checkpointer.directory}/{latest}")
        if latest >= config.train.steps:
          log(f"nothing to train: the run is at step {latest} and train.steps is "
              f"{config.train.steps} (raise --config.train.steps to go on)")
    # The run's initial parameters, also on a resume: RL's KL reference is the policy the
    # stage started from, not the one it resumed with.  (Other stages read none.)
    if reads_initial:
      stage.start(params)
    if stage.rollout_weights is not None and run.mesh.size > 1 and distributed.is_primary():
      log(stage.rollout_weights.line)
    del params  # the state holds its own copy; this one would double the weights' memory
    step_fn = programs["step"]
    writer = MetricsWriter(os.path.join(workdir, "logs", config.stage), resumed_at=int(state.step))
    console = _Console(config.train.steps, int(state.step))
    window = _WindowMeans()
    last: dict = {}
    try:
      with _StopSignals() as signals:
        while int(state.step) < config.train.steps:
          step = int(state.step)
          local, extra = stage.batch(step, state, distributed.local_rows(stage.batch_size))
          batch = to_global(local, run.mesh)
          state, metrics = step_fn(state, batch)
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          metrics.update(extra)
          if not metrics["finite"]:
            raise TrainingError(
                f"non-finite loss or gradient at step {step} ({config.stage} stage): loss="
                f"{metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}; no checkpoint was "
                "written (the last one saved is where a rerun resumes) — lower the learning rate "
                "or check the data")
          data = {"step": step + 1, "inputs": inputs}
          done = step + 1
          window.add(metrics)
          if done % config.train.log_every == 0 or done == config.train.steps:
            last = window.pop()
            writer.write(done, last)
            if distributed.is_primary():
              log(console.line(done, last))
          stop = (stop_at is not None and done % config.train.checkpoint_every == 0
                  and stop_at(done, state.params))
          preempted = signals.requested()
          checkpointer.save(done, state, config_json, data,
                            force=done == config.train.steps or stop or preempted)
          if preempted:
            checkpointer.wait()
            raise Preempted(done, checkpointer.directory)
          if stop:
            break
    finally:
      checkpointer.close()
      writer.close()
  return last


def microbatches_of(config: ml_collections.ConfigDict, batch_shards: int = 1) -> int:
  """train.microbatches on a mesh of `batch_shards` (data x fsdp), checked: a microbatch's rows
  split evenly over them (else the rules replicate them and every device computes more than
  its share, silently).  0 (the recipes'): one row per batch shard per part, whatever mesh the
  run gets (`mesh.fsdp=-1` included; a count fixed in the recipe had been dropped there)."""
  microbatches = config.train.get("microbatches", 1)
  batch = config.train.batch_size
  if microbatches == 0:
    if batch % batch_shards:
      raise ConfigError(f"train.microbatches=0 runs one row per batch shard per part, and "
                        f"train.batch_size ({batch}) does not split over the mesh's "
                        f"{batch_shards} (mesh.data x mesh.fsdp)")
    return max(1, batch // batch_shards)
  if microbatches < 1 or batch % microbatches:
    raise ConfigError(f"train.batch_size ({batch}) must be a multiple of "
                      f"train.microbatches ({microbatches})")
  if (batch // microbatches) % batch_shards:
    raise ConfigError(f"a step's {batch // microbatches} rows (train.batch_size {batch} / "
                      f"train.microbatches {microbatches}) do not split over the mesh's "
                      f"{batch_shards} batch shards (mesh.data x mesh.fsdp): use a multiple of "
                      f"{batch_shards} rows per microbatch")
  return microbatches


def updates_per_step(config: ml_collections.ConfigDict) -> int:
  """Optimizer updates per train step: RL's `rl.updates_per_batch` (its mini-batches), else 1."""
  return config.rl.get("updates_per_batch", 1) if config.stage == "rl" else 1


def update_parts(config: ml_collections.ConfigDict, batch_shards: int = 1) -> tuple[int, int]:
  """(updates, microbatches per update) of a train step, checked: `train.microbatches` counts
  the parts of the whole batch, so an update of 1/u of its rows runs 1/u of them (at least one,
  of rows that still split over the mesh's batch shards)."""
  updates = updates_per_step(config)
  parts = microbatches_of(config, batch_shards)
  if parts >= updates:
    if parts % updates:
      raise ConfigError(f"the step's {parts} microbatches do not split evenly over its "
                        f"{updates} updates (rl.updates_per_batch): make train.microbatches a "
                        f"multiple of {updates}")
    return updates, parts // updates
  rows = config.train.batch_size // updates
  if rows % batch_shards:
    raise ConfigError(f"an update's {rows} rows (train.batch_size {config.train.batch_size} / "
                      f"rl.updates_per_batch {updates}) do not split over the mesh's "
                      f"{batch_shards} batch shards (mesh.data x mesh.fsdp)")
  return updates, 1


def make_optimizer(config: ml_collections.ConfigDict):
  return state_lib.make_optimizer(state_lib.OptimizerConfig(**config.optimizer.to_dict()),
                                  updates_per_step(config))


def jit_train_step(stage: "_Stage", optimizer, paths, microbatches: int, updates: int = 1):
  """The stage's jitted step (state donated): what `train` runs and launch/compile.py compiles."""
  return jax.jit(state_lib.make_train_step(stage.objective(), optimizer, paths, microbatches,
                                           updates), donate_argnums=0)


def abstract_train_state(run: Run, optimizer):
  """The TrainState `train` creates, as sharded ShapeDtypeStructs: nothing allocated."""
  config = run.config
  params = _unboxed(model_lib.abstract_params(run.model))
  create = lambda p: state_lib.create_train_state(p, config.train.trainable, optimizer,
                                                  config.seed)
  shape = jax.eval_shape(create, params)
  shardings = state_lib.state_shardings(run.model, shape, run.mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shape, shardings)


@dataclasses.dataclass
class Program:
  """One jitted program of a stage and the abstract arguments it runs on (launch/compile.py).

  held: abstract arrays the process keeps on device while the program runs, besides its
  arguments (RL: the optimizer state during the rollout, the KL reference's copy): device
  memory the program's own plan does not count but the chip must hold too.  mesh: the mesh
  it runs on where that is not the run's (evaluation's weights split over a tensor axis).
  inference: where a copy the program makes inside itself goes (RL's rollout)."""
  name: str
  jitted: Any
  args: tuple
  kwargs: dict = dataclasses.field(default_factory=dict)
  held: Any = None
  mesh: Any = None
  inference: Placement | None = None


def stage_programs(run: Run, device_memory: int | None = None) -> list[Program]:
  """Every jitted program `train` runs for `run`'s stage, with abstract arguments at the
  recipe's shapes on `run.mesh`: the train step (with its microbatches) and, for RL, the
  rollout and the reference log-prob pass.  The same code as `train`, nothing allocated.
  device_memory: a device's bytes where the devices do not say (`_Stage`)."""
  config = run.config
  stage = _STAGES[config.stage](run, device_memory)
  optimizer = make_optimizer(config)
  state = abstract_train_state(run, optimizer)
  paths = state_lib.trainable_paths(state.params, config.train.trainable)
  batch = abstract_batch(stage.batch_shapes(stage.batch_size), run.mesh)
  step = jit_train_step(stage, optimizer, paths,
                        *update_parts(config, sharding_lib.batch_shards(run.mesh))[::-1])
  if not isinstance(stage, RLStage):
    return [Program("train_step", step, (state, batch))]
  # RL keeps the KL reference's copy of the trainable leaves on device all along (`start`).
  reference = jax.eval_shape(lambda p: reference_leaves(p, paths, run.model), state.params)
  reference = jax.tree.map(lambda r, p: jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=p.sharding),
                           reference, state_lib.split(state.params, paths)[0])
  return [Program("train_step", step, (state, batch), held=reference)] + stage.programs(
      state, batch.turns, reference)


def reference_leaves(params, paths, model_config):
  """RL's KL reference: a copy of the trainable leaves of `params` as the model reads them
  (`qwen2.read_dtype`: float32 master weights held in the compute dtype, half the bytes, the
  same reference log-probs), never an alias of a leaf the train step donates."""
  trainable, _ = state_lib.split(params, paths)  # {path: leaf}
  cast, _ = state_lib.split(model_lib.read_dtype(state_lib.merge(trainable, {}), model_config),
                            paths)
  return {p: jnp.copy(cast[p]) if cast[p] is trainable[p] else cast[p] for p in trainable}


# --- stages -------------------------------------------------------------------


class _Stage(abc.ABC):
  # What the stage's examples must carry: questions (every stage that reads to answer) and
  # supporting facts with their oracle memories (the stages trained on oracle traces/labels).
  needs_questions = True
  needs_oracle = False
  # Examples looked at before training starts (`check_data`).
  DATA_PEEK = 8
  # Where a stage's inference copy goes (RL's rollout: `rl.rollout_weights`); None: no copy.
  rollout_weights: Placement | None = None

  def __init__(self, run: Run, device_memory: int | None = None):
    """device_memory: a device's bytes, where the devices do not say (deviceless compiles):
    what RL's rollout places its inference copy by; the other stages make none."""
    del device_memory
    self.run = run
    self.setup = objectives.TrainSetup.of_run(run)
    self.batch_size = run.config.train.batch_size

  def check_data(self) -> None:
    """Refuses data that cannot train this stage, before any weight is built: `text:` data has
    no questions (any answer would score), and `rows:` data no supporting facts (SFT would
    learn never to update the memory, the gate that no chunk matters)."""
    run = self.run
    examples = [ex.example for ex in run.examples(0, min(self.DATA_PEEK, self.batch_size))]
    where = f"data.train {run.config.data.train!r}"
    stage = run.config.stage
    if self.needs_questions and not any(len(ex.question) for ex in examples):
      raise ConfigError(f"the {stage} stage needs questions and {where} has none (text: data "
                        "trains the compressor stage)")
    if self.needs_oracle and not any(ex.supporting and ex.oracle_memory for ex in examples):
      raise ConfigError(f"the {stage} stage learns from supporting facts and oracle memories, "
                        f"and {where} has none in its first {len(examples)} examples (rows: "
                        "layouts carry none; use hotpotqa: or synthetic: data)")

  # Whether `start`'s parameters matter after a resume (RL's KL reference): a resumed run
  # then rebuilds them exactly as they were (`_init_step`, the recorded fingerprint).
  reads_initial_params = False

  def start(self, params) -> None:
    """Called once with the run's initial parameters (a resumed run's too: not the restored
    ones)."""

  def jitted(self) -> dict:
    """The stage's own jitted programs besides the step, by name (`_kept_programs`)."""
    return {}

  def use(self, programs: dict) -> None:
    """Runs `programs` (`jitted()`'s, perhaps made by an equal stage of an earlier run)."""

  @abc.abstractmethod
  def batch(self, step: int, state, rows: slice) -> tuple[Any, dict]:
    """This process's `rows` of the global batch of `step` (deterministic in step), and extra
    metrics; each process builds only its own rows."""

  @abc.abstractmethod
  def batch_shapes(self, rows: int):
    """ShapeDtypeStructs of a global batch of `rows` rows (what `batch` builds for them), so a
    step can be compiled without data; tests/train/test_batch_shapes.py holds them to `batch`."""

  def examples(self, step: int, rows: slice, per_step: int | None = None):
    per_step = per_step or self.batch_size
    return self.run.examples(step * per_step + rows.start, rows.stop - rows.start, step=step)

  @abc.abstractmethod
  def objective(self) -> Callable:
    """loss(params, batch, rng) -> (loss, metrics) of the trainable parameters on a batch.  It
    closes over settings only, not the stage: the programs traced from it outlive the run
    (`_kept_programs`), which must not keep the run's data and device arrays alive."""


class CompressorStage(_Stage):
  """Language modelling through beacons; with `pretrain.recall`, on chunks whose second half
  repeats the first half's units shuffled (scored on the repeat only)."""
  needs_questions = False

  def batch(self, step, state, rows):
    r = self.run
    examples = self.examples(step, rows)
    c = r.compressor.chunk_size
    if not r.config.get("pretrain", {}).get("recall", False):
      ids, mask = batches.chunked(examples, c, r.num_chunks, r.model.pad_token_id)
      return (ids.reshape(-1, c), mask.reshape(-1, c)), {}
    half = c // 2
    tokens = r.task.length if r.task is not None else r.num_chunks * c
    ids, mask = batches.chunked(examples, half, -(-tokens // half), r.model.pad_token_id)
    # One stream per example by its global row: the same shuffles on any number of processes.
    rngs = [np.random.default_rng([r.config.seed, step, row])
            for row in range(rows.start, rows.stop)]
    return batches.recall_pretraining_chunks(ids.reshape(-1, half), mask.reshape(-1, half),
                                             r.compressor.ratio, rngs), {}

  def batch_shapes(self, rows):
    r = self.run
    c = r.compressor.chunk_size
    if not r.config.get("pretrain", {}).get("recall", False):
      return (_shape((rows * r.num_chunks, c), np.int32), _shape((rows * r.num_chunks, c), bool))
    half = c // 2
    tokens = r.task.length if r.task is not None else r.num_chunks * c
    lines = rows * -(-tokens // half)
    return (_shape((lines, 2 * half), np.int32), _shape((lines, 2 * half), bool),
            _shape((lines, 2 * half), bool))

  def objective(self):
    setup = self.setup
    return lambda params, batch, rng: objectives.compressor_loss(params, setup, *batch)


def oracle_turns(run: Run, examples, oracle: bool = True) -> objectives.TurnBatch:
  """Teacher-forced turns of examples from their oracle traces (oracle=False: chunks and
  questions only, for rollouts of examples that have no trace)."""
  return batches.sft_batch(
      examples, chunk_size=run.compressor.chunk_size, num_chunks=run.num_chunks,
      question_tokens=run.question_tokens, memory_capacity=run.memory_capacity,
      memory_size=run.reasoner.memory_size, answer_tokens=run.reasoner.answer_tokens,
      initial_memory=run.prompts.initial_memory, eos_id=run.model.eos_token_ids[0],
      pad_id=run.model.pad_token_id, oracle=oracle)


def _shape(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def turn_shapes(run: Run, rows: int) -> objectives.TurnBatch:
  """The shapes `oracle_turns` gives `rows` examples (its arrays, labels included)."""
  n, c, mc = run.num_chunks, run.compressor.chunk_size, run.memory_capacity
  m, a, q = run.reasoner.memory_size, run.reasoner.answer_tokens, run.question_tokens
  ids = lambda *shape: _shape((rows,) + shape, np.int32)
  mask = lambda *shape: _shape((rows,) + shape, bool)
  return objectives.TurnBatch(
      chunk_ids=ids(n, c), chunk_mask=mask(n, c), question=ids(q), question_mask=mask(q),
      memory_ids=ids(n, mc), memory_mask=mask(n, mc), targets=ids(n, m), target_mask=mask(n, m),
      final_memory_ids=ids(mc), final_memory_mask=mask(mc), answer=ids(a), answer_mask=mask(a),
      labels=mask(n))


class SFTStage(_Stage):
  needs_oracle = True

  def batch(self, step, state, rows):
    return oracle_turns(self.run, self.examples(step, rows)), {}

  def batch_shapes(self, rows):
    return turn_shapes(self.run, rows)

  def objective(self):
    c, setup = self.run.config, self.setup
    weights = c.sft.gate_weight, c.gate.threshold, c.gate.positive_weight
    return lambda params, batch, rng: objectives.sft_loss(params, setup, batch, *weights)


class GateStage(_Stage):
  needs_oracle = True

  def batch(self, step, state, rows):
    r = self.run
    examples = self.examples(step, rows)
    return batches.gate_batch(
        examples, chunk_size=r.compressor.chunk_size, num_chunks=r.num_chunks,
        question_tokens=r.question_tokens, memory_capacity=r.memory_capacity,
        initial_memory=r.prompts.initial_memory, pad_id=r.model.pad_token_id), {}

  def batch_shapes(self, rows):
    t = turn_shapes(self.run, rows)
    return objectives.GateBatch(
        chunk_ids=t.chunk_ids, chunk_mask=t.chunk_mask, question=t.question,
        question_mask=t.question_mask, memory_ids=t.memory_ids, memory_mask=t.memory_mask,
        labels=t.labels, valid=t.labels)

  def objective(self):
    g, setup = self.run.config.gate, self.setup
    weights = g.threshold, g.positive_weight
    return lambda params, batch, rng: objectives.gate_loss(params, setup, batch, *weights)


def rollout_placement(run: Run, reader=None, device_memory: int | None = None) -> Placement:
  """Where the RL rollout's inference copy goes on the training mesh's devices
  (`rl.rollout_weights`): sharded as training shards it, whole on every device, or split over
  a tensor axis of the same devices re-formed as data x tensor (`placement.placement`: the
  fewest per group whose share fits a third of a device).  reader: the rollout's (None: made
  from the config); device_memory: a device's bytes (None: as the devices report them)."""
  rl = run.config.rl
  reader = reader or run.reader(rl.mode, temperature=rl.temperature)
  layout, setup = abstract_inference_layout(nn.unbox(model_lib.abstract_params(run.model)),
                                            reader.setup)
  chosen = placement(layout, setup.model, run.mesh, rl.get("rollout_weights", "sharded"),
                     device_memory)
  return dataclasses.replace(chosen, line=f"rollout {chosen.line}")


class RLStage(_Stage):
  """Rollouts with the recall loop (G per question), rewards, advantages, then clipped updates:
  one per batch, or one per mini-batch of whole groups (`rl.updates_per_batch`)."""

  reads_initial_params = True  # the KL term's reference

  def __init__(self, run: Run, device_memory: int | None = None):
    super().__init__(run)
    rl = run.config.rl
    self.group = rl.group_size
    self.questions = self.batch_size // self.group
    if self.batch_size % self.group:
      raise ConfigError(f"train.batch_size ({self.batch_size}) must be a multiple of "
                        f"rl.group_size ({self.group})")
    # The rollout's reader: the agent's (the method in `rl.mode`, or MemAgent's), sampling.
    self.reader = run.reader(rl.mode, temperature=rl.temperature)
    self.rollout_weights = rollout_placement(run, self.reader, device_memory)
    # Every output is [rows, ...], on the rows of the mesh the loop ran on (left to the
    # compiler, an output of a data x tensor loop may come back split as training splits rows,
    # which has no name on that mesh).
    # (Closed over the reader and placement, not the stage: see `objective`.)
    self._rollout = jax.jit(
        functools.partial(_read_for_inference, self.reader, self.rollout_weights),
        out_shardings=sharding_lib.rows_sharding((self.batch_size,), self.rollout_weights.mesh))
    # With several updates per batch, the policy's log-probs before the first are scored in a
    # pass of their own (verl's recomputed old log-probs): the later updates' ratios move.
    self.recompute = rl.old_logprobs == "policy" and updates_per_step(run.config) > 1
    self.rl = objectives.RLConfig(eps_low=rl.eps_low, eps_high=rl.eps_high,
                                  clip_ratio_c=rl.clip_ratio_c, kl_coef=rl.kl_coef,
                                  kl_estimator=rl.kl_estimator, aggregation=rl.aggregation,
                                  temperature=self.reader.setup.sampling.logprob_temperature,
                                  old_logprobs="recomputed" if self.recompute else rl.old_logprobs)
    setup, temperature = self.setup, self.rl.temperature
    self._score = jax.jit(lambda p, turns: objectives.trajectory_logprobs(
        p, setup, turns, temperature=temperature))

  def jitted(self):
    return {"rollout": self._rollout, "score": self._score}

  def use(self, programs):
    self._rollout, self._score = programs["rollout"], programs["score"]

  def start(self, params):
    r = self.run
    # The KL term's reference is the initial policy.  Its frozen leaves always
    # equal the current ones (and are donated with the state), so only the
    # trainable leaves are copied, in the compute dtype (`reference_leaves`); the rest is
    # taken from the state each step.
    self.paths = state_lib.trainable_paths(params, r.config.train.trainable)
    self.reference_trainable = reference_leaves(params, self.paths, r.model)

  @staticmethod
  def _inputs(turns) -> tuple:
    """What the reader reads of `turns`: [B, N, C] chunks and [B, Q] questions."""
    return turns.chunk_ids, turns.chunk_mask, turns.question, turns.question_mask

  def rollout(self, params, turns, rng):
    """G rollouts per question, read by the run's reader from the chunks of `turns`."""
    return self._rollout(params, self._inputs(turns), rng)

  def programs(self, state, turns, reference) -> list["Program"]:
    """The rollout and the reference log-prob pass on the abstract `state`, `turns` (the train
    step's batch) and `reference` (the KL reference's trainable leaves): the programs `batch`
    runs besides the step, each with what stays on device meanwhile."""
    rng = jax.eval_shape(lambda: jax.random.key(0))
    replicated = jax.sharding.NamedSharding(self.run.mesh, jax.sharding.PartitionSpec())
    rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)
    params = state.params
    # The reference pass scores the reference's leaves merged with the state's frozen ones
    # (`batch`); the policy's trainable leaves stay on device meanwhile.
    policy, frozen = state_lib.split(params, list(reference))
    programs = [Program("rollout", self._rollout, (params, self._inputs(turns), rng),
                        held=(state.opt_state, reference), inference=self.rollout_weights),
                Program("reference_logprobs", self._score,
                        (state_lib.merge(reference, frozen), turns), held=(state.opt_state, policy))]
    if self.recompute:
      programs.append(Program("policy_logprobs", self._score, (params, turns),
                              held=(state.opt_state, reference)))
    return programs

  def batch_shapes(self, rows):
    r = self.run
    n, m, a = r.num_chunks, r.reasoner.memory_size, r.reasoner.answer_tokens
    logprobs = lambda *shape: _shape((rows,) + shape, np.float32)
    return objectives.RLBatch(
        turns=turn_shapes(r, rows), old_logprobs=logprobs(n, m), old_answer_logprobs=logprobs(a),
        ref_logprobs=logprobs(n, m), ref_answer_logprobs=logprobs(a), advantages=logprobs())

  def batch(self, step, state, rows):
    r = self.run
    if (rows.stop - rows.start) % self.group:
      raise ConfigError(f"each process's {rows.stop - rows.start} rows must hold whole groups of "
                        f"{self.group} rollouts")
    questions = slice(rows.start // self.group, rows.stop // self.group)
    examples = self.examples(step, questions, per_step=self.questions)
    rows = [ex for ex in examples for _ in range(self.group)]
    turns = oracle_turns(r, rows, oracle=False)  # chunks and questions; turns come from the rollout
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
    local = distributed.local_rows(self.batch_size)
    shared = to_global(turns, r.mesh)
    everyone = distributed.to_host(self.rollout(state.params, shared, rng))  # all rows
    out = jax.tree.map(lambda x: x[local], everyone)
    trace, answer = out.trace, out.answer
    m = r.reasoner.memory_size
    steps = np.arange(m)[None, None, :]
    target_mask = steps < trace.update_lengths[:, :, None]
    initial = np.zeros((len(rows), 1) + trace.memory_ids.shape[2:], np.int32)
    init_ids = np.asarray(r.prompts.initial_memory)
    initial[:, 0, :len(init_ids)] = init_ids
    initial_mask = np.zeros(initial.shape, bool)
    initial_mask[:, 0, :len(init_ids)] = True
    memory_ids = np.concatenate([initial, trace.memory_ids[:, :-1]], axis=1)
    memory_mask = np.concatenate([initial_mask, trace.memory_mask[:, :-1]], axis=1)
    answer_mask = np.arange(r.reasoner.answer_tokens)[None] < answer.lengths[:, None]
    turns = dataclasses.replace(
        turns, memory_ids=memory_ids, memory_mask=memory_mask,
        targets=np.where(target_mask, trace.update_tokens, 0).astype(np.int32),
        target_mask=target_mask, final_memory_ids=out.memory.ids, final_memory_mask=out.memory.mask,
        answer=np.asarray(answer.tokens, np.int32), answer_mask=answer_mask)
    rewards = np.asarray([r.reward(answer.tokens[i, :answer.lengths[i]], row)  # EOS dropped there
                          for i, row in enumerate(rows)], np.float32)
    advantages = np.asarray(grpo.group_advantages(jnp.asarray(rewards), self.group,
                                                  r.config.rl.advantage))
    _, frozen = state_lib.split(state.params, self.paths)
    reference = state_lib.merge(self.reference_trainable, frozen)
    scored = to_global(turns, r.mesh)
    score = lambda params: jax.tree.map(
        lambda x: x[local], distributed.to_host(self._score(params, scored)))
    (ref_lp, _), (ref_answer_lp, _) = score(reference)
    old_lp, old_answer_lp = np.asarray(trace.update_logprobs), np.asarray(answer.logprobs)
    extra = {}
    if self.recompute:
      (policy_lp, _), (policy_answer_lp, _) = score(state.params)
      policy_lp, policy_answer_lp = np.asarray(policy_lp), np.asarray(policy_answer_lp)
      # The rollout/training mismatch, which the loss cannot see here: its denominators are
      # these scores, not the sampler's.
      gap = (np.abs(policy_lp - old_lp)[target_mask].sum()
             + np.abs(policy_answer_lp - old_answer_lp)[answer_mask].sum())
      counted = distributed.all_rows(np.asarray([gap, target_mask.sum() + answer_mask.sum()],
                                                np.float64)[None]).sum(0)
      extra["rollout_logprob_gap"] = float(counted[0] / max(counted[1], 1))
      old_lp, old_answer_lp = policy_lp, policy_answer_lp
    batch = objectives.RLBatch(
        turns=turns, old_logprobs=old_lp, old_answer_logprobs=old_answer_lp,
        ref_logprobs=np.asarray(ref_lp), ref_answer_logprobs=np.asarray(ref_answer_lp),
        advantages=advantages)
    # The logged means are over the whole batch: every process's rewards (each scores its own
    # rows) and every row's lengths.
    rewards = distributed.all_rows(rewards)
    lengths = everyone.trace.update_lengths
    read = lengths > 0
    extra.update({"reward": float(rewards.mean()), "accuracy": float(rewards.mean()),
                  "response_length": float(lengths[read].mean()) if read.any() else 0.0,
                  "answer_length": float(everyone.answer.lengths.mean())})
    return batch, extra

  def objective(self):
    setup, rl = self.setup, self.rl
    return lambda params, batch, rng: objectives.rl_loss(params, setup, rl, batch)


def _read_for_inference(reader, placed: Placement, params, inputs, rng):
  """RL's rollout: `reader` reads `inputs` with `params` placed as `placed` says."""
  # The weights in the inference layout first, as evaluation reads them: one array per layer
  # in the compute dtype, so the decode loop reads each in place (the training layout
  # sliced, and under fsdp gathered, the stack at every decode step).
  params, setup = inference_layout(params, reader.setup)
  reader = reader.with_setup(setup)
  if placed.weights == "sharded":
    return reader.read(params, inputs, rng)
  # Moved once here, not gathered layer by layer at every decode step (rl.rollout_weights):
  # whole on every device, or split over `tensor` of the same devices, where the loop then
  # runs (its activations' constraints name that mesh's axes).
  shardings = (sharding_lib.replicated(placed.mesh) if placed.weights == "replicated" else
               sharding_lib.param_shardings(model_lib.abstract_params(setup.model),
                                            placed.mesh))
  params = jax.lax.with_sharding_constraint(params, shardings)
  # The rows too, once: on data x tensor they split over data alone.
  inputs = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, sharding_lib.rows_sharding(x.shape, placed.mesh)), inputs)
  # And the key, which the loop folds with each block's index made on that mesh (jax 0.11
  # refuses operands of two meshes).
  rng = jax.lax.with_sharding_constraint(rng, sharding_lib.replicated(placed.mesh))
  with jax.sharding.use_abstract_mesh(placed.mesh.abstract_mesh):
    return reader.read(params, inputs, rng)


_STAGES: dict[str, Callable[[Run], _Stage]] = {
    "compressor": CompressorStage, "sft": SFTStage, "rl": RLStage, "gate": GateStage}
