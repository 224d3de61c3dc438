"""The trainer: sharded steps, restoring on another mesh, and bad input (exact resume after a
SIGTERM: tests/train/test_preemption.py)."""

import dataclasses
import gc
import glob
import json
import os
import shutil

import flax.traverse_util
import numpy as np
import pytest

from memrecall import run_builder
from memrecall.runtime import checkpoint, jsonl
from memrecall.train import trainer
from tests import forked_launchers
from tests.conftest import LYCHEE_TEXT, xla_defaults_env
from tests.train.conftest import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
quiet = lambda *a: None


def _leaves(params):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def test_sharded_steps_match_one_device_and_restore_on_one_device(tmp_path):
  # Adam turns a near-zero gradient into a step of about +-lr, so summation-order noise
  # between the layouts can reach lr-sized differences on single elements; a smaller
  # learning rate keeps that noise under the 1e-5 bar while every parameter still moves.
  one = small_config("sft", steps=3)
  eight = small_config("sft", steps=3)
  one.optimizer.learning_rate = eight.optimizer.learning_rate = 5e-4
  eight.mesh.data, eight.mesh.fsdp, eight.mesh.tensor = 2, 2, 2
  eight.train.log_every = 3
  trainer.train(one, str(tmp_path / "one"), log=quiet)
  returned = trainer.train(eight, str(tmp_path / "eight"), log=quiet)
  # A logged value is its window's mean: logged every 3 steps, the three steps logged one by one.
  logged = lambda run: jsonl.read(tmp_path / run / "logs" / "sft" / "metrics.jsonl")
  each, window = logged("one"), logged("eight")
  assert [r["step"] for r in each] == [1, 2, 3] and [r["step"] for r in window] == [3]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(window[0][key], np.mean([r[key] for r in each]), rtol=1e-4)
    # What `train` returns is that logged line (the demo's stages.json), not the last step's.
    assert returned[key] == pytest.approx(window[0][key], rel=1e-6)
  # Saved every checkpoint_every steps and at the last, not also after the first (orbax's
  # default policy's).
  every = one.train.checkpoint_every
  assert sorted(map(int, os.listdir(tmp_path / "one" / "checkpoints"))) == sorted(
      {s for s in range(1, 4) if s % every == 0} | {3})
  a, _ = checkpoint.load_params(str(tmp_path / "one"))
  # One checkpoint's folder reads as its workdir at that step.
  folder, _ = checkpoint.load_params(str(tmp_path / "one" / "checkpoints" / "3"))
  for key, value in _leaves(a).items():
    np.testing.assert_array_equal(_leaves(folder)[key], value, err_msg=str(key))
  b, _ = checkpoint.load_params(str(tmp_path / "eight"))  # written on 8 devices, read on 1
  for key, value in _leaves(a).items():
    np.testing.assert_allclose(_leaves(b)[key], value, atol=1e-5, err_msg=str(key))
  # The 8-device checkpoint also resumes a 1-device run.
  resumed = small_config("sft", steps=4)
  lines = []
  trainer.train(resumed, str(tmp_path / "eight"), log=lines.append)
  assert any("resumed from" in line for line in lines)
  assert not any("nothing to train" in line for line in lines)
  lines = []  # a budget already reached is said, not passed over in silence
  trainer.train(small_config("sft", steps=2), str(tmp_path / "eight"), log=lines.append)
  assert any("nothing to train: the run is at step 4 and train.steps is 2" in line
             for line in lines), lines


def _lowerings(run):
  """How many programs `run()` lowered to MLIR (traced anew, not a jit's earlier program)."""
  from jax import monitoring
  lowered = []
  def count(event, duration, **kw):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(duration)
  monitoring.register_event_duration_secs_listener(count)
  try:
    run()
  finally:
    monitoring.unregister_event_duration_listener(count)
  return len(lowered)


def test_a_run_that_traces_the_same_reuses_the_earlier_runs_programs():
  """`train` keeps its jitted programs by every setting a program reads: a config that differs
  in untraced settings only (steps, logging, checkpointing, init) gets the earlier programs,
  one with another learning rate (or model, or mesh) programs of its own.  (The RL resume test
  below checks that a kept run lowers nothing and resumes bit for bit.)"""
  # pylint: disable=protected-access
  trainer.clear_kept_programs()
  made = []
  def kept(config):  # which call of `make` made the programs `train` would run
    make = lambda: made.append(config) or len(made)
    return trainer._kept_programs(json.loads(config.to_json_best_effort()),
                                  run_builder.build_run(config), make)
  assert kept(small_config("rl", steps=2)) == 1
  untraced = small_config("rl", steps=5, log_every=5, checkpoint_every=5, keep=2)
  untraced.init.checkpoint = "/elsewhere"
  assert kept(untraced) == 1
  for change in ("optimizer.learning_rate", "rl.kl_coef", "model.num_layers", "mesh.fsdp"):
    other = small_config("rl", steps=2)
    section, name = change.split(".")
    other[section][name] = other[section][name] * 2
    assert kept(other) == len(made) > 1 and made[-1] is other, change
  assert len(made) == 5 and len(trainer._KEPT) == trainer._KEPT_RUNS


def test_non_finite_loss_stops_without_saving(tmp_path):
  config = small_config("sft", steps=6, checkpoint_every=1)
  trainer.train(small_config("sft", steps=2, checkpoint_every=1), str(tmp_path), log=quiet)
  config.optimizer.learning_rate = 1e30  # the parameters blow up, then the loss is NaN
  config.optimizer.grad_clip = 1e30
  with pytest.raises(trainer.TrainingError, match="non-finite loss or gradient at step"):
    trainer.train(config, str(tmp_path), log=quiet)
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "*"))
                 if os.path.basename(p).isdigit())
  params, _ = checkpoint.load_params(str(tmp_path), steps[-1])
  assert all(np.isfinite(v).all() for v in _leaves(params).values())


def test_bad_input_gives_clear_errors(tmp_path):
  with pytest.raises(OSError, match="is not writable"):
    trainer.train(small_config("sft"), "/proc/memrecall_cannot_write_here", log=quiet)
  bad = small_config("sft")
  bad.stage = "pretrain"
  with pytest.raises(Exception, match="unknown stage 'pretrain'"):
    trainer.train(bad, str(tmp_path / "x"), log=quiet)
  memory = small_config("sft")
  memory.prompts.initial_memory = "Nothing yet"
  with pytest.raises(trainer.ConfigError, match="does not apply to a synthetic task"):
    trainer.train(memory, str(tmp_path / "m"), log=quiet)
  low = small_config("sft")
  low.model.param_dtype = "bfloat16"
  with pytest.raises(trainer.ConfigError, match="training needs float32 master weights"):
    trainer.train(low, str(tmp_path / "b"), log=quiet)
  # The objective's choices are checked before any work, not at the first step's trace after
  # a whole rollout.
  for key, value in (("advantage", "gae"), ("kl_estimator", "k4"), ("aggregation", "seq_sum"),
                     ("old_logprobs", "reference")):
    rl = small_config("rl")
    rl.rl[key] = value
    with pytest.raises(trainer.ConfigError, match=f"unknown rl.{key} '{value}'; choose from"):
      trainer.train(rl, str(tmp_path / f"rl_{key}"), log=quiet)
    assert not os.path.exists(tmp_path / f"rl_{key}" / "checkpoints")
  unsharded = small_config("sft", batch_size=16, microbatches=4)
  unsharded.mesh.data, unsharded.mesh.fsdp = 2, 4  # 4 rows a microbatch on 8 batch shards
  with pytest.raises(trainer.ConfigError, match="do not split over the mesh's 8 batch shards"):
    trainer.train(unsharded, str(tmp_path / "z"), log=quiet)
  proc = forked_launchers.run(os.path.join(ROOT, "launch", "train.py"),
                              ["--config=configs/tiny.py:sft", f"--workdir={tmp_path / 'y'}",
                               "--config.train.no_such_key=3"], xla_defaults_env(), cwd=ROOT)
  assert proc.returncode != 0 and "no_such_key" in proc.stderr


def test_corrupted_checkpoint_is_reported_and_kept(tmp_path):
  trainer.train(small_config("sft", steps=2, checkpoint_every=1), str(tmp_path), log=quiet)
  latest = tmp_path / "checkpoints" / "2"
  data_files = [p for p in glob.glob(str(latest / "state" / "**" / "*"), recursive=True)
                if os.path.isfile(p) and os.path.getsize(p) > 1000]
  for path in data_files:  # truncate the array data
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  snapshot = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2 cannot be restored"):
    trainer.train(small_config("sft", steps=4), str(tmp_path), log=quiet)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == snapshot  # nothing deleted
  # The earlier checkpoint is intact and loads.
  params, _ = checkpoint.load_params(str(tmp_path), 1)
  assert params["embedding"].shape[0] == 512


@pytest.mark.parametrize("task", ["multihop", "vartrack", "hotpot"])
def test_every_tiny_task_makes_oracle_turns_that_fit(task):
  """Each TASK of configs/tiny.py builds a run whose oracle traces fit its memory and answer."""
  from configs import tiny
  config = tiny.get_config(f"sft,full,{task}")
  run = run_builder.build_run(config)
  assert run.task.task == task
  turns = trainer.oracle_turns(run, run.examples(0, 4))  # raises if a trace does not fit
  assert turns.target_mask.any(-1).all()  # every block rewrites the memory
  assert turns.answer_mask.sum(-1).min() >= 2  # an answer token and EOS
  with pytest.raises(ValueError, match="unknown task 'sudoku'"):
    tiny.get_config("sft,full,sudoku")


def test_rl_resumed_mid_run_keeps_the_initial_policy_as_its_kl_reference(tmp_path):
  # Stopped at step 2 and resumed, RL must end bit for bit where an uninterrupted run ends: its
  # KL term is measured against the initial policy, not the policy it resumed with (with the
  # resumed one as reference the KL gradient vanishes at step 3 and the parameters differ), nor
  # the later checkpoint its init.checkpoint (an SFT workdir) has reached in the meantime.
  sft = str(tmp_path / "sft")
  trainer.train(small_config("sft", steps=2), sft, log=quiet)
  config = small_config("rl", steps=4)
  config.init.checkpoint = sft
  config.rl.kl_coef = 0.5  # large enough that the reference moves the parameters visibly
  trainer.train(config, str(tmp_path / "straight"), log=quiet)
  # The same run again in this process runs the programs the first compiled (`_kept_programs`):
  # nothing is traced and lowered anew.
  assert _lowerings(lambda: trainer.train(config, str(tmp_path / "resumed"), log=quiet,
                                          stop_at=lambda step, p: step == 2)) == 0
  assert max(map(int, os.listdir(tmp_path / "resumed" / "checkpoints"))) == 2
  trainer.train(small_config("sft", steps=4), sft, log=quiet)  # the SFT run goes on to step 4
  assert _lowerings(lambda: trainer.train(config, str(tmp_path / "resumed"), log=quiet)) == 0
  straight, _ = checkpoint.load_params(str(tmp_path / "straight"))
  resumed, _ = checkpoint.load_params(str(tmp_path / "resumed"))
  for key, value in _leaves(straight).items():
    np.testing.assert_array_equal(_leaves(resumed)[key], value, err_msg=str(key))
  before = sorted(os.listdir(tmp_path / "resumed" / "checkpoints"))
  # The step it started from gone, the reference cannot be rebuilt: refused, nothing changed.
  shutil.rmtree(os.path.join(sft, "checkpoints", "2"))
  config.train.steps = 6
  with pytest.raises(trainer.ConfigError, match=r"started from step 2 of init.checkpoint"):
    trainer.train(config, str(tmp_path / "resumed"), log=quiet)
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == before
  # The kept programs close over settings, not over a stage (its run's data sources, RL's
  # reference weights on device): none outlives its `train`.
  gc.collect()
  assert not [o for o in gc.get_objects() if isinstance(o, trainer.RLStage)]


def test_a_resume_refuses_training_data_rewritten_in_place(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("alpha beta gamma delta " * 400)
  config = small_config("compressor", steps=2)
  config.data.train = f"text:{corpus}"
  trainer.train(config, str(tmp_path / "run"), log=quiet)
  corpus.write_text("zeta eta theta iota " * 400)  # the same name, other rows
  config.train.steps = 4
  with pytest.raises(trainer.ConfigError, match=r"corpus.txt: data \w+ there, \w+ now"):
    trainer.train(config, str(tmp_path / "run"), log=quiet)
  corpus.write_text("alpha beta gamma delta " * 400)  # restored: it resumes
  trainer.train(config, str(tmp_path / "run"), log=quiet)
  assert checkpoint.steps(str(tmp_path / "run"))[-1] == 4


def test_a_text_form_resume_refuses_text_written_another_way(tmp_path, monkeypatch):
  """A text-form task's run records how its text is written (synthetic.TEXT_FORM): a run
  started before the text changed (its checkpoints record no text_form) is refused by name;
  the ids form records nothing, so its runs resume as before."""
  from memrecall.data import synthetic
  config = small_config("compressor", steps=2)
  config.task.form, config.task.length = "text", 128  # room for two facts as text
  with monkeypatch.context() as m:  # the code before: keys without the text's writing
    m.setattr(synthetic, "task_key", lambda task: dataclasses.asdict(task))
    trainer.train(config, str(tmp_path / "text"), log=quiet)
  config.train.steps = 4
  with pytest.raises(trainer.ConfigError, match=r"synthetic:multihop: text_form None there, "
                                                r"leading-spaces now"):
    trainer.train(config, str(tmp_path / "text"), log=quiet)
  assert checkpoint.steps(str(tmp_path / "text")) == [2]
  ids = small_config("compressor", steps=2)
  trainer.train(ids, str(tmp_path / "ids"), log=quiet)
  ids.train.steps = 4
  trainer.train(ids, str(tmp_path / "ids"), log=quiet)
  assert checkpoint.steps(str(tmp_path / "ids"))[-1] == 4


def test_a_data_refusal_names_the_source_added_or_dropped():
  """Sources are matched by name, not position: dropping the first of two names it."""
  a, b = {"file": "a.jsonl", "data": "h1"}, {"file": "b.jsonl", "data": "h2"}
  with pytest.raises(trainer.ConfigError, match=r"\(a.jsonl: data h1 there, None now\)"):
    trainer._check_same_data([a, b], [b], "run")
  with pytest.raises(trainer.ConfigError, match=r"\(b.jsonl: data None there, h2 now\)"):
    trainer._check_same_data([a], [a, b], "run")
  with pytest.raises(trainer.ConfigError, match="the same ones, in another order"):
    trainer._check_same_data([a, b], [b, a], "run")
  trainer._check_same_data([a, b], [a, b], "run")


def test_a_resume_refuses_a_tokenizer_edited_in_place(tmp_path):
  shutil.copytree(os.path.join(LYCHEE_TEXT, "hf"), tmp_path / "tok")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("alpha beta gamma delta " * 400)
  config = small_config("compressor", steps=2)
  config.data.train = f"text:{corpus}"
  config.init.tokenizer = str(tmp_path / "tok")
  trainer.train(config, str(tmp_path / "run"), log=quiet)
  saved = checkpoint.steps(str(tmp_path / "run"))
  original = (tmp_path / "tok" / "tokenizer.json").read_text()
  tokens = json.loads(original)
  vocab = tokens["model"]["vocab"]
  vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # the same files, other ids
  (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tokens))
  config.train.steps = 4
  with pytest.raises(trainer.ConfigError,
                     match=r"tokenizer [0-9a-f]{16} there, [0-9a-f]{16} now, from .*tok\)"):
    trainer.train(config, str(tmp_path / "run"), log=quiet)
  assert checkpoint.steps(str(tmp_path / "run")) == saved  # nothing written
  (tmp_path / "tok" / "tokenizer.json").write_text(original)  # restored: it resumes
  trainer.train(config, str(tmp_path / "run"), log=quiet)
  assert checkpoint.steps(str(tmp_path / "run"))[-1] == 4


def test_a_resume_may_change_the_budget_and_layout_but_not_the_rows_or_the_trainable_set():
  assert trainer._resumable("data.overlong")  # a run stopped at an overlong row goes on past it
  saved = json.loads(small_config("sft").to_json_best_effort())
  def resume_with(**changes):
    config = small_config("sft")
    for key, value in changes.items():
      block, name = key.split("__")
      setattr(config[block], name, value)
    trainer._check_same_run(saved, json.loads(config.to_json_best_effort()), "WORKDIR")
  resume_with(train__steps=40, train__microbatches=2, train__keep=1, optimizer__learning_rate=1.0,
              mesh__fsdp=2, model__remat="full", model__remat_blocks=False)
  with pytest.raises(trainer.ConfigError, match=r"model.num_layers"):
    resume_with(model__num_layers=3)
  with pytest.raises(trainer.ConfigError, match=r"train.batch_size 4 there, 8 now"):
    resume_with(train__batch_size=8)
  with pytest.raises(trainer.ConfigError, match=r"train.trainable 'backbone' there, 'all' now"):
    resume_with(train__trainable="all")


def test_a_resumed_stage_does_not_read_its_initial_checkpoint_again(tmp_path):
  """SFT resumes from its own checkpoint alone: the earlier stage's weights are not loaded
  again (a whole model's read), even after that workdir moved on, and the record of the step
  it started from stays."""
  compressor = small_config("compressor", steps=2)
  trainer.train(compressor, str(tmp_path / "compressor"), log=quiet)
  sft = small_config("sft", steps=2)
  sft.init.checkpoint = str(tmp_path / "compressor")
  lines = []
  trainer.train(sft, str(tmp_path / "sft"), log=lines.append)
  assert f"starting from {tmp_path / 'compressor'} at step 2" in lines
  compressor.train.steps = 4  # the earlier stage goes on: its latest step is 4 now
  trainer.train(compressor, str(tmp_path / "compressor"), log=quiet)
  sft.train.steps = 4
  lines = []
  trainer.train(sft, str(tmp_path / "sft"), log=lines.append)
  assert not any(line.startswith("starting from") for line in lines), lines
  assert any("resumed from" in line for line in lines)
  saved = trainer.Checkpointer(str(tmp_path / "sft"), save_every=2, keep=3, async_save=False)
  assert saved.saved_json(4, "data")["inputs"]["init_step"] == 2


def test_the_recipes_microbatches_follow_the_mesh_the_run_gets():
  """One row per device per part on whatever mesh: an `auto` recipe (fsdp=-1) had run its
  whole batch at once (the 7B RL step 69.7 GiB a device on 8 against 32.4 in parts)."""
  from configs import lychee
  from memrecall.models.config import ConfigError
  config = lychee.get_config("rl,7b,auto")
  assert config.mesh.fsdp == -1 and config.train.microbatches == 0
  assert trainer.microbatches_of(config, 8) == config.train.batch_size // 8
  config.train.batch_size = 24
  with pytest.raises(ConfigError, match="does not split over the mesh's 16"):
    trainer.microbatches_of(config, 16)


def test_a_read_the_processes_disagreed_on_is_not_called_damage():
  """orbax's barrier-name mismatch (processes making different reads) says nothing about the
  files: the advice is to keep the checkpoint, not to delete it."""
  mismatch = AssertionError("sync_global_devices name mismatch ('_Checkpointer:restore', "
                            "'CheckpointManager:create_directory')")
  assert "keep the checkpoint" in checkpoint._advice(mismatch, "delete it")
  assert checkpoint._advice(ValueError("bad header"), "delete it") == "delete it"


def test_a_run_saved_before_a_setting_existed_resumes_with_what_it_trained_with():
  """rl.old_logprobs came after runs were saved without it: an RL run of then trained against
  the rollout's log-probs, so resuming it asks for that (not silently the new default), and
  other stages, which do not read it, resume as they are."""
  for stage in ("sft", "rl"):
    config = json.loads(small_config(stage).to_json_best_effort())
    saved = json.loads(json.dumps(config))
    del saved["rl"]["old_logprobs"]
    if stage == "sft":
      trainer._check_same_run(saved, config, "wd")
      continue
    with pytest.raises(trainer.ConfigError, match="rl.old_logprobs 'rollout' there, 'policy' now"):
      trainer._check_same_run(saved, config, "wd")
    config["rl"]["old_logprobs"] = "rollout"
    trainer._check_same_run(saved, config, "wd")


def test_rl_with_updates_per_batch_scores_the_old_policy_once_and_updates_on_each_part(tmp_path):
  """rl.updates_per_batch=2: a step's rollout feeds two updates of one question's group each,
  against the policy's log-probs scored before the first (a program of its own); the
  rollout/training gap is still logged; a count that splits no whole groups is refused before
  any work."""
  config = small_config("rl", steps=2, batch_size=8)  # 4 questions of 2 rollouts
  config.rl.updates_per_batch = 2
  run = run_builder.build_run(config)
  names = [p.name for p in trainer.stage_programs(run)]
  assert names == ["train_step", "rollout", "reference_logprobs", "policy_logprobs"]
  last = trainer.train(config, str(tmp_path / "two"), log=quiet)
  assert 0 <= last["rollout_logprob_gap"] < 1e-4  # float32 on CPU: the same numbers
  assert "ppo_kl" in last and last["clip_fraction"] >= 0
  logged = jsonl.read(tmp_path / "two" / "logs" / "rl" / "metrics.jsonl")
  assert [row["step"] for row in logged] == [1, 2]
  assert trainer.update_parts(config, 1) == (2, 1)
  config.train.microbatches = 4
  assert trainer.update_parts(config, 1) == (2, 2)
  thirds = small_config("rl", batch_size=12, microbatches=4)  # 6 questions, 3 updates
  thirds.rl.updates_per_batch = 3
  with pytest.raises(trainer.ConfigError, match="4 microbatches do not split evenly over its 3"):
    trainer.update_parts(thirds, 1)
  thirds.train.microbatches = 1  # each update's 4 rows in one part, on at most 4 shards
  assert trainer.update_parts(thirds, 4) == (3, 1)
  with pytest.raises(trainer.ConfigError, match="update's 4 rows .* over the mesh's 6 batch"):
    trainer.update_parts(thirds, 6)  # the step's 12 rows split over 6, an update's 4 do not
  uneven = small_config("rl", steps=2, batch_size=8)
  uneven.rl.updates_per_batch = 3
  with pytest.raises(trainer.ConfigError, match="must divide the step's 4 questions"):
    trainer.train(uneven, str(tmp_path / "three"), log=quiet)
  assert not os.path.exists(tmp_path / "three" / "checkpoints")
