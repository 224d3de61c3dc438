"""Opening a training workdir as a notebook does: any step, on the devices at hand, decoded and
scored as the launchers do."""

import json
import os
import warnings

import flax.traverse_util
import jax
import numpy as np
import pytest

from memrecall import run_builder
from memrecall.data import synthetic
from memrecall.models import qwen2 as model
from memrecall.runtime import sharding
from memrecall.runtime.checkpoint import Checkpointer
from tests.train.conftest import small_config


def _workdir(directory, config, steps=(2, 4)) -> dict[int, dict]:
  """A workdir holding a checkpoint of other random parameters at each of `steps`."""
  model_config = run_builder.build_run(small_config(config.stage)).model  # on any mesh
  saved = {}
  checkpointer = Checkpointer(str(directory), save_every=1, keep=len(steps), async_save=False)
  for step in steps:
    saved[step] = model.init_params(model_config, jax.random.key(step), None)
    checkpointer.save(step, {"params": saved[step], "step": np.int32(step)},
                      json.loads(config.to_json_best_effort()), {"step": step}, force=True)
  checkpointer.close()
  return saved


def _same(a, b) -> bool:
  a, b = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
  return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_any_step_opens_by_number_or_by_its_folder(tmp_path):
  saved = _workdir(tmp_path / "run", small_config("sft"))
  workdir = str(tmp_path / "run")
  _, latest = run_builder.from_workdir(workdir)
  assert _same(latest, saved[4]) and not _same(latest, saved[2])
  _, by_number = run_builder.from_workdir(workdir, step=2)
  _, by_folder = run_builder.from_workdir(os.path.join(workdir, "checkpoints", "2"))
  assert _same(by_number, saved[2]) and _same(by_folder, saved[2])
  run, step = run_builder.workdir_run(os.path.join(workdir, "checkpoints", "2"))
  assert step == 2 and run.task is not None
  with pytest.raises(FileNotFoundError, match=r"has no step 3 \(it holds \[2, 4\]\)"):
    run_builder.from_workdir(workdir, step=3)
  with pytest.raises(ValueError, match="is step 2's checkpoint, not step 4's"):
    run_builder.from_workdir(os.path.join(workdir, "checkpoints", "2"), step=4)
  with pytest.raises(TypeError, match="step '2' is not a step number"):
    run_builder.from_workdir(workdir, step="2")
  assert run_builder.workdir_run(workdir, step=np.int64(2))[1] == 2
  # A folder of runs (the demo's, one per stage) names them.
  with pytest.raises(FileNotFoundError, match=r"has no checkpoints/ directory \(it holds the "
                     r"runs run: name one\)"):
    run_builder.from_workdir(str(tmp_path))


def test_a_run_whose_mesh_needs_more_devices_opens_on_these_with_a_warning(tmp_path):
  """A pod's run (fsdp 16 here) read in a notebook with 8 devices: every device on fsdp, said;
  a mesh asked for explicitly is not replaced."""
  config = small_config("sft")
  config.mesh.fsdp = 16
  saved = _workdir(tmp_path / "run", config, steps=(1,))
  with pytest.warns(UserWarning, match=r"the run's mesh does not fit this process .*its 8 "
                    r"device\(s\) on fsdp instead"):
    run, params = run_builder.from_workdir(str(tmp_path / "run"))
  assert dict(run.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert _same(params, saved[1])
  with pytest.raises(sharding.MeshError, match="needs 16 devices"):
    run_builder.from_workdir(str(tmp_path / "run"), mesh={"fsdp": 16})
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a mesh that fits says nothing
    run_builder.from_workdir(str(tmp_path / "run"), mesh={"fsdp": 2})


def test_ids_form_runs_decode_to_token_names_and_score_a_sampled_answer():
  """The synthetic ids form decodes through its small vocabulary (the byte tokenizer gives ''),
  and a sampler's answer, its EOS counted, scores as the answer."""
  run = run_builder.build_run(small_config("sft"))
  assert run.form == "ids"
  vocab = synthetic.SmallVocab(run.task.num_entities)
  ids = [vocab.entity(3), vocab["->"], vocab.entity(5)]
  assert run.decode(ids) == "e3 -> e5"
  assert run.tokenizer.decode(ids) == ""
  example = run.examples(0, 1)[0]
  answer = list(example.answers[0])
  eos = list(run.model.eos_token_ids)[:1]
  assert run.score(answer + eos, example)["em"] == 1.0
  assert run.score(answer[:-1] + eos, example)["em"] == 0.0


def test_a_notebooks_sources_are_the_held_out_split_and_trainings_the_train_split():
  """`run.sources("synthetic:...")` in a notebook reads the rows launch/eval.py reads (its
  --split default, test), not the training stream's own examples, which `train_sources` reads."""
  config = small_config("sft")
  config.data.train = "synthetic:multihop"
  run = run_builder.build_run(config)
  (held_out,) = run.sources("synthetic:multihop")
  (train,) = run.train_sources
  (named_test,) = run.sources("synthetic:multihop", split="test")
  ids = lambda named: [named.source[i].id for i in range(3)]
  assert ids(held_out) == ids(named_test) and held_out.options == named_test.options
  assert ids(train) == [e.example.id for e in run.examples(0, 3)]
  assert not set(ids(held_out)) & set(ids(train))
  assert held_out.options["split"] == "test" and train.options["split"] == "train"


def test_evaluated_rows_of_the_ids_form_read_as_token_names(tmp_path):
  """predictions.jsonl's text fields decode as `run.decode` does: the byte tokenizer left the
  ids form's question, prediction and answers empty beside their scores."""
  from memrecall.evaluate import evaluator
  from memrecall.runtime import jsonl
  run = run_builder.build_run(small_config("sft"))
  evaluator.evaluate_data(run.params(), run, run.sources("synthetic:multihop"), modes=["all"],
                          output_dir=str(tmp_path), limit=2, batch_size=2, log=lambda *a: None)
  (named,) = run.sources("synthetic:multihop")
  for record in jsonl.read(tmp_path / "predictions.jsonl"):
    example = named.source[record["row"]]
    assert record["question"] == run.decode(example.question) != ""
    assert record["answers"] == [run.decode(a) for a in example.answers] != [""]
    assert record["prediction"] == run.decode(record["prediction_ids"]) != ""
