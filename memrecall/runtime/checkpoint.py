"""Orbax checkpoints of a run: train state, config and data position, restorable on any mesh.

A checkpoint is `WORKDIR/checkpoints/<step>/` with three items: `state` (the
TrainState pytree), `config` (the run's config as JSON) and `data` (the data
iterator's position as JSON).  Saves are asynchronous and keep the last K.
Restoring takes the *target* shardings, so a state written on 8 devices loads
onto 1 (or any other mesh).  `load_params` is the notebook entry point.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import sys
import tempfile
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from memrecall.runtime import paths


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read."""


_SETTLE_S = 1.0  # after a failed restore: long enough for tensorstore's stragglers on a busy host


@contextlib.contextmanager
def _stderr_kept_unless_failed():
  """Holds back what is written to stderr (file descriptor 2) inside; passes it on unless the
  block raises.  A failed orbax restore leaves tensorstore callbacks that print tracebacks
  about a closed event loop from C++ threads: noise around the CheckpointError naming the
  damaged checkpoint, which says all there is to say."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    failed = False
    try:
      yield
    except BaseException:
      failed = True
      time.sleep(_SETTLE_S)  # the callbacks fire as the failed reads wind down
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))
        sys.stderr.flush()


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(paths.local_path(workdir, "workdir")), "checkpoints")


class Checkpointer:
  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    # Every `save_every` steps and at a preemption orbax detects; not orbax's default first
    # step too (a whole state's write after step 1, counted against `keep`).
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]),
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        # A save killed mid-write leaves `<step>.orbax-checkpoint-tmp-*` (never read as a
        # step): removed when the next run opens the directory, not kept forever.
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "config", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def saved_json(self, step: int, item: str = "config") -> dict:
    """A JSON item saved with `step`, the run's `config` or its `data` (no arrays are read)."""
    try:
      with _stderr_kept_unless_failed():
        return self.manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.JsonRestore()}))[item]
    except Exception as e:  # orbax raises many types for damaged files
      first = (str(e).strip().splitlines() or [""])[0][:200]
      raise CheckpointError(f"checkpoint {os.path.join(self.directory, str(step))} has no "
                            f"readable {item} ({type(e).__name__}: {first}); "
                            + _advice(e, "it may be truncated or corrupted — delete it to resume "
                                      "from an earlier one")) from e

  def save(self, step: int, state, config: dict, data: dict, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
        data=ocp.args.JsonSave(data)), force=force)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
    """(state, config, data) of `step`, the state placed as `abstract_state`'s shardings say."""
    try:
      with _stderr_kept_unless_failed():
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged files
      first = (str(e).strip().splitlines() or [""])[0][:200]
      raise CheckpointError(f"checkpoint {os.path.join(self.directory, str(step))} cannot be "
                            f"restored ({type(e).__name__}: {first}); " + _advice(
                                e, "if its structure differs, it was made by another version or "
                                "other settings (a resume keeps the trainable subset and the "
                                "model); else it may be truncated or corrupted — then delete it "
                                "to resume from an earlier one")) from e
    return restored.state, restored.config, restored.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def step_folder(path: str, step: int | None) -> tuple[str, int | None]:
  """(workdir, step) of one checkpoint's folder, WORKDIR/checkpoints/STEP (`load_params` and
  `run_builder.from_workdir` take one, for analysis); any other path as it is."""
  if step is not None:
    try:
      step = operator.index(step)  # numpy's integers too
    except TypeError:
      raise TypeError(f"step {step!r} is not a step number (an integer)") from None
  full = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(full)
  if (name.isdigit() and os.path.basename(parent) == "checkpoints"
      and not os.path.isdir(os.path.join(full, "checkpoints"))):
    if step is not None and step != int(name):
      raise ValueError(f"{path} is step {name}'s checkpoint, not step {step}'s")
    return os.path.dirname(parent), int(name)
  return path, step


def _open(workdir_or_checkpoint: str, step: int | None):
  """(manager, directory, step) of a workdir's checkpoint `step` (default: the latest)."""
  directory = checkpoint_dir(workdir_or_checkpoint)
  if not os.path.isdir(directory):
    # A folder of runs (the demo's workdir: one per stage) names them.
    runs = sorted(name for name in (os.listdir(workdir_or_checkpoint)
                                    if os.path.isdir(workdir_or_checkpoint) else [])
                  if os.path.isdir(checkpoint_dir(os.path.join(workdir_or_checkpoint, name))))
    raise FileNotFoundError(f"{workdir_or_checkpoint} has no checkpoints/ directory" + (
        f" (it holds the runs {', '.join(runs)}: name one)" if runs else ""))
  manager = ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler()})
  steps = manager.all_steps()
  if not steps or (step is not None and step not in steps):
    manager.close()
    raise FileNotFoundError(f"no checkpoint in {directory}" if not steps else
                            f"{directory} has no step {step} (it holds {sorted(steps)})")
  return manager, directory, max(steps) if step is None else step


def steps(workdir: str) -> list[int]:
  """The steps a workdir holds checkpoints of, in order (a FileNotFoundError if none)."""
  manager, _, _ = _open(workdir, None)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def load_config(workdir_or_checkpoint: str, step: int | None = None) -> tuple[dict, int]:
  """(the run config a checkpoint saved, its step): what to build the run from before its
  parameters are read onto that run's mesh (`run_builder.from_workdir`)."""
  manager, directory, step = _open(workdir_or_checkpoint, step)
  try:
    with _restore_errors(directory, step):
      return manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore())).config, step
  finally:
    manager.close()


def param_shapes(workdir_or_checkpoint: str, step: int | None = None) -> Any:
  """The shapes of a checkpoint's parameters (a tree of tuples), from its metadata alone: what
  to check a model config against before any weight is read."""
  manager, directory, step = _open(workdir_or_checkpoint, step)
  try:
    with _restore_errors(directory, step):
      metadata = manager.item_metadata(step)["state"]
  finally:
    manager.close()
  return jax.tree.map(lambda m: tuple(m.shape), getattr(metadata, "tree", metadata)["params"])


def load_params(workdir_or_checkpoint: str, step: int | None = None,
                shardings: Any = None) -> tuple[Any, dict]:
  """The parameters alone (no optimizer state is read) and the run config of a checkpoint.

  Accepts a workdir (latest checkpoint, or `step`) or one checkpoint's folder
  (WORKDIR/checkpoints/STEP) for analysis in a notebook.  shardings:
  a tree of Shardings like the parameters, where each goes (`run_builder.from_workdir`: the run's
  mesh, so a model larger than one device is read straight onto its shards); default: this
  process's first device.
  """
  manager, directory, step = _open(*step_folder(workdir_or_checkpoint, step))
  try:
    with _restore_errors(directory, step):
      config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
      metadata = manager.item_metadata(step)["state"]
      stored = getattr(metadata, "tree", metadata)["params"]
      if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, stored)
      # Whatever mesh wrote it, read it onto these shardings; the rest of the state stays on disk.
      target = {"params": jax.tree.map(
          lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), stored, shardings)}
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
  finally:
    manager.close()
  return restored.state["params"], config


@contextlib.contextmanager
def _restore_errors(directory: str, step: int):
  """Any failure inside as one CheckpointError naming the checkpoint (orbax raises many types
  for damaged files), with orbax's stderr noise held back."""
  try:
    with _stderr_kept_unless_failed():
      yield
  except Exception as e:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise CheckpointError(f"checkpoint {directory}/{step} cannot be restored ({type(e).__name__}: "
                          f"{first}); " + _advice(e, "it may be truncated or corrupted — delete "
                                                  "it to use an earlier one, or retrain")) from e


def _advice(error: Exception, damaged: str) -> str:
  """What to do about a failed read: `damaged`'s advice, unless the processes disagreed on
  which reads they made (orbax's barrier names differ), which says nothing about the files."""
  if "sync_global_devices name mismatch" in str(error):
    return ("the processes did not all make the same checkpoint reads (a program error, not "
            "damage): keep the checkpoint, and report the command that failed")
  return damaged
