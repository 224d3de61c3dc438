"""Resumable evaluation rows are keyed by what made them, and survive a kill mid-write.

In-process on the shared text fixture (a tiny LycheeMemory checkpoint, two question rows), so
the compiled recall loop is reused across the reruns, on one device: what is tested here does
not depend on the mesh, and spread over the test process's 8 simulated devices (2 cores) one
evaluation took 8.4 s against 0.9 s on one (sharded evaluation: tests/test_evaluation.py,
tests/test_multihost.py, tests/test_multiprocess_eval.py).
"""

import json
import os
import shutil

import jax
import pytest

from memrecall import run_builder
from memrecall.evaluate import evaluator, output_key, report
from memrecall.runtime import jsonl
from tests.conftest import LYCHEE_TEXT

HF, ROWS = os.path.join(LYCHEE_TEXT, "hf"), os.path.join(LYCHEE_TEXT, "rows.json")


def _run(memory_size=4, checkpoint=HF, **settings):
  return run_builder.from_hf_checkpoint(checkpoint, devices=jax.devices()[:1], chunk_size=1024,
                                        memory_size=memory_size, answer_tokens=4, **settings)


def _evaluate(run, params, output_dir, model_name="hf"):
  return evaluator.evaluate_data(params, run, run.sources(f"rows:{ROWS}"), modes=["all"],
                                  output_dir=str(output_dir), model_name=model_name, batch_size=2,
                                  log=lambda *a: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """(run, params, directory of a finished evaluation of both rows)."""
  run = _run()
  params = run.params()
  directory = tmp_path_factory.mktemp("finished")
  _evaluate(run, params, directory)
  return run, params, directory


def _copy(finished_dir, tmp_path):
  target = tmp_path / "eval"
  shutil.copytree(finished_dir, target)
  return target


def _rows(directory):
  return [(r["model"], r["mode"], r["row"]) for r in jsonl.read(directory / "predictions.jsonl")]


def test_a_matching_rerun_skips_finished_rows(finished, tmp_path):
  run, params, done = finished
  directory = _copy(done, tmp_path)
  before = (directory / "predictions.jsonl").read_bytes()
  calls = []
  original = evaluator.evaluate_mode
  try:
    evaluator.evaluate_mode = lambda *a, **k: calls.append(1) or original(*a, **k)
    summary = _evaluate(run, params, directory)
  finally:
    evaluator.evaluate_mode = original
  assert calls == [] and (directory / "predictions.jsonl").read_bytes() == before
  assert summary[0]["examples"] == 2


def test_another_checkpoint_never_shares_a_row(finished, tmp_path):
  run, params, done = finished
  directory = _copy(done, tmp_path)
  before = (directory / "predictions.jsonl").read_bytes()
  # Other weights under the same name (two checkpoints in directories both called `hf`).
  other = jax.tree.map(lambda x: x, params)
  other["final_norm"] = {k: v + 0.5 for k, v in params["final_norm"].items()}
  with pytest.raises(output_key.OutputKeyError, match="params '[0-9a-f]{16}' there"):
    _evaluate(run, other, directory)
  assert (directory / "predictions.jsonl").read_bytes() == before
  # Under another name they are evaluated beside the first model's rows, each row its own.
  _evaluate(run, other, directory, model_name="other")
  rows = _rows(directory)
  assert sorted(rows) == [("hf", "all", 0), ("hf", "all", 1), ("other", "all", 0),
                          ("other", "all", 1)]
  assert set(json.load(open(directory / "keys.json"))) == {"hf/rows.json", "other/rows.json"}


def test_another_tokenizer_never_shares_a_row(finished, tmp_path):
  """A tokenizer.json edited inside the checkpoint directory, in ids no prompt uses (the
  prompts' template ids are unchanged), still keys its rows apart: decoded answers differ."""
  run, params, done = finished
  directory = _copy(done, tmp_path)
  checkpoint = tmp_path / "hf"
  shutil.copytree(HF, checkpoint)
  copied = _run(checkpoint=str(checkpoint))
  assert copied.tokenizer.fingerprint == run.tokenizer.fingerprint
  tokens = json.load(open(checkpoint / "tokenizer.json"))
  vocab = tokens["model"]["vocab"]
  vocab["\u00fd"], vocab["\u00fe"] = vocab["\u00fe"], vocab["\u00fd"]  # bytes 0xFD, 0xFE
  (checkpoint / "tokenizer.json").write_text(json.dumps(tokens))
  edited = _run(checkpoint=str(checkpoint))
  assert edited.prompts == run.prompts
  before = (directory / "predictions.jsonl").read_bytes()
  with pytest.raises(output_key.OutputKeyError, match="tokenizer '[0-9a-f]{16}' there"):
    _evaluate(edited, params, directory)
  assert (directory / "predictions.jsonl").read_bytes() == before


def test_a_changed_setting_is_refused_naming_it(finished, tmp_path):
  _, params, done = finished
  directory = _copy(done, tmp_path)
  before = (directory / "predictions.jsonl").read_bytes()
  with pytest.raises(output_key.OutputKeyError, match="memory_size 4 there, 8 now"):
    _evaluate(_run(memory_size=8), params, directory)
  assert (directory / "predictions.jsonl").read_bytes() == before


def test_a_run_that_failed_before_its_first_row_does_not_block_the_corrected_rerun(finished,
                                                                                  tmp_path):
  """The key is recorded before the first row; a run that fails there (a question over its
  budget) leaves only the key, and the rerun with the budget the error names replaces it."""
  run, params, _ = finished
  directory = tmp_path / "eval"
  with pytest.raises(ValueError, match="over the budget of 3"):
    _evaluate(_run(question_tokens=3), params, directory)
  assert json.load(open(directory / "keys.json"))["hf/rows.json"]["question_tokens"] == 3
  _evaluate(run, params, directory)
  assert sorted(r[2] for r in _rows(directory)) == [0, 1]
  assert json.load(open(directory / "keys.json"))["hf/rows.json"]["question_tokens"] == \
      run.question_tokens


def test_changed_data_is_refused(finished, tmp_path):
  run, params, done = finished
  directory = _copy(done, tmp_path)
  rows = json.load(open(ROWS))
  rows[0]["context"] += " One more sentence."
  changed = tmp_path / "rows.json"
  changed.write_text(json.dumps(rows))
  with pytest.raises(output_key.OutputKeyError, match="data '"):
    evaluator.evaluate_data(params, run, run.sources(f"rows:{changed}"), modes=["all"],
                             output_dir=str(directory), model_name="hf", batch_size=2,
                             log=lambda *a: None)


def test_rows_without_a_key_are_refused(finished, tmp_path):
  run, params, done = finished
  directory = _copy(done, tmp_path)
  os.remove(directory / "keys.json")
  with pytest.raises(output_key.OutputKeyError, match="no record of what made them"):
    _evaluate(run, params, directory)


def test_a_write_killed_at_any_byte_is_followed_by_a_complete_rerun(finished, tmp_path):
  run, params, done = finished
  full = (done / "predictions.jsonl").read_bytes()
  first_end = full.index(b"\n") + 1
  expected = jsonl.read(done / "predictions.jsonl")
  for offset in (first_end // 2, first_end, len(full) - 1):
    directory = tmp_path / f"cut{offset}"
    shutil.copytree(done, directory)
    with open(directory / "predictions.jsonl", "r+b") as f:
      f.truncate(offset)
    summary = _evaluate(run, params, directory)
    text = (directory / "predictions.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]  # every line parses
    assert text.endswith("\n") and sorted(r["row"] for r in records) == [0, 1], offset
    assert sorted(records, key=lambda r: r["row"]) == expected, offset
    assert summary[0]["examples"] == 2


def _count_evaluated(run, params, directory):
  """(summary, rows computed) of a rerun into `directory`."""
  calls = []
  original = evaluator.evaluate_mode
  try:
    evaluator.evaluate_mode = lambda *a, **k: calls.append(len(a[3])) or original(*a, **k)
    summary = _evaluate(run, params, directory)
  finally:
    evaluator.evaluate_mode = original
  return summary, sum(calls)


def test_rows_of_an_interrupted_multiprocess_run_are_reused_and_merged(finished, tmp_path):
  """A 2-process run stopped before its merge, resumed by one process: nothing is recomputed,
  and every row reaches predictions.jsonl once."""
  run, params, done = finished
  directory = _copy(done, tmp_path)
  expected = jsonl.read(directory / "predictions.jsonl")
  for record in expected:  # each row where its process (row mod 2) wrote it
    jsonl.append(evaluator.predictions_path(str(directory), record["row"] % 2, 2), [record])
  os.remove(directory / "predictions.jsonl")
  summary, computed = _count_evaluated(run, params, directory)
  assert computed == 0 and summary[0]["examples"] == 2
  assert sorted(jsonl.read(directory / "predictions.jsonl"), key=lambda r: r["row"]) == expected


def test_the_merge_keeps_every_row_once_and_is_idempotent(tmp_path):
  row = lambda i, text="x": {"model": "m", "data": "d.json", "mode": "all", "row": i,
                             "prediction": text}
  jsonl.append(tmp_path / "predictions.jsonl", [row(0)])
  jsonl.append(evaluator.predictions_path(str(tmp_path), 0, 2), [row(0, "again"), row(2)])
  jsonl.append(evaluator.predictions_path(str(tmp_path), 1, 2), [row(3), row(1)])
  with open(evaluator.predictions_path(str(tmp_path), 1, 2), "a") as f:
    f.write('{"model": "m", "da')  # a process killed mid-write
  jsonl.append(tmp_path / "predictions-backup.jsonl", [row(7)])  # not a process's file
  merged = evaluator.merge_predictions(str(tmp_path))
  assert [r["row"] for r in merged] == [0, 1, 2, 3] and merged[0]["prediction"] == "x"
  assert jsonl.read(tmp_path / "predictions.jsonl") == merged
  data = (tmp_path / "predictions.jsonl").read_bytes()
  assert evaluator.merge_predictions(str(tmp_path)) == merged  # a rerun's merge adds nothing
  assert (tmp_path / "predictions.jsonl").read_bytes() == data


def test_round_robin_gives_every_row_to_exactly_one_process():
  from memrecall.runtime import distributed
  for count in (0, 1, 5, 8):
    for processes in (1, 2, 3):
      shares = [distributed.round_robin(count, p, processes) for p in range(processes)]
      assert sorted(i for share in shares for i in share) == list(range(count))
  assert distributed.round_robin(5, 1, 2) == [1, 3]


def test_results_summarise_the_rows_asked_for_beside_other_models(finished, tmp_path):
  """A rerun with a smaller --limit reports the rows it asked for, not every row an earlier run
  left; results.json keeps another model's rows evaluated beside them."""
  run, params, done = finished
  directory = _copy(done, tmp_path)
  _evaluate(run, params, directory, model_name="other")
  records = {(r["model"], r["row"]): r for r in jsonl.read(directory / "predictions.jsonl")}
  summary = evaluator.evaluate_data(params, run, run.sources(f"rows:{ROWS}"), modes=["all"],
                                    output_dir=str(directory), model_name="hf", batch_size=2,
                                    limit=1, log=lambda *a: None)
  assert [(r["model"], r["examples"]) for r in summary] == [("hf", 1)]
  assert summary[0]["sub_em"] == 100 * records["hf", 0]["sub_em"]
  results = json.load(open(directory / "results.json"))
  assert [(r["model"], r["examples"]) for r in results] == [("hf", 1), ("other", 2)]
  assert results[0] == report.json_safe(summary[0])


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
  with pytest.raises(jsonl.JsonlError, match="line 2 is not JSON"):
    jsonl.read(path)


def test_append_drops_a_torn_tail_at_every_offset(tmp_path):
  path = tmp_path / "m.jsonl"
  rows = [{"step": i, "loss": i / 3} for i in range(3)]
  jsonl.append(path, rows)
  data = path.read_bytes()
  for offset in range(len(data) + 1):
    path.write_bytes(data[:offset])
    kept = jsonl.read(path)
    assert kept == rows[:data[:offset].count(b"\n")]
    jsonl.append(path, rows[len(kept):])
    assert jsonl.read(path) == rows and path.read_bytes() == data


HOTPOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fixtures",
                      "hotpot_dev_tiny.json")


def test_other_data_options_are_refused_naming_them(finished, tmp_path):
  """The options that change which rows a source yields (here hotpotqa's documents per question)
  are part of its rows' key: a rerun with others is refused, as another data file is."""
  run, params, _ = finished
  spec = f"hotpotqa:{HOTPOT}"
  evaluate = lambda sources: evaluator.evaluate_data(
      params, run, sources, modes=["all"], output_dir=str(tmp_path), model_name="hf", limit=1,
      batch_size=1, log=lambda *a: None)
  evaluate(run.sources(spec, num_docs=10))
  before = (tmp_path / "predictions.jsonl").read_bytes()
  with pytest.raises(output_key.OutputKeyError, match="data.num_docs 10 there, 12 now"):
    evaluate(run.sources(spec, num_docs=12))
  with pytest.raises(output_key.OutputKeyError, match="data.seed 0 there, 1 now"):
    evaluate(run.sources(spec, num_docs=10, seed=1))
  assert (tmp_path / "predictions.jsonl").read_bytes() == before
  assert evaluate(run.sources(spec, num_docs=10))[0]["examples"] == 1  # the same options resume


def test_two_data_files_of_one_name_are_refused_naming_both(finished, tmp_path):
  """Rows are grouped by file name: a second rows.json would find the first one's rows done."""
  run, params, _ = finished
  paths = []
  for sub in ("a", "b"):
    (tmp_path / sub).mkdir()
    shutil.copy(ROWS, tmp_path / sub / "rows.json")
    paths.append(str(tmp_path / sub / "rows.json"))
  with pytest.raises(ValueError, match=f"{paths[0]} and {paths[1]} are both named rows.json"):
    evaluator.evaluate_data(params, run, run.sources(f"rows:{','.join(paths)}"), modes=["all"],
                             output_dir=str(tmp_path / "eval"), model_name="hf", batch_size=2,
                             log=lambda *a: None)
  assert not os.path.exists(tmp_path / "eval" / "predictions.jsonl")


def test_answers_cut_off_at_answer_tokens_are_marked_truncated(finished, tmp_path):
  """The random model never says EOS within answer_tokens=4: each row is marked cut off, and
  results.json counts them; a row whose answer ends (EOS among its first tokens) is not."""
  import dataclasses
  run, params, done = finished
  records = jsonl.read(done / "predictions.jsonl")
  assert [r["truncated"] for r in records] == [True, True]
  results = json.load(open(done / "results.json"))
  assert [(r["truncated"], r["truncated_fraction"]) for r in results] == [(2, 1.0)]
  # Its first answer token (as it comes) made an EOS: the answer ends at once.
  first = records[0]["prediction_ids"][0]
  ends = dataclasses.replace(run, model=dataclasses.replace(
      run.model, eos_token_ids=run.model.eos_token_ids + (first,)))
  evaluator.evaluate_data(params, ends, ends.sources(f"rows:{ROWS}"), modes=["all"],
                          output_dir=str(tmp_path), model_name="hf", batch_size=2, limit=1,
                          log=lambda *a: None)
  record, = jsonl.read(tmp_path / "predictions.jsonl")
  assert record["truncated"] is False and len(record["prediction_ids"]) < 4


def test_a_sampled_evaluation_draws_by_seed_and_is_keyed_by_its_settings(finished, tmp_path):
  """--temperature samples one answer per question (MemAgent's harness protocol): the same
  seed draws the same rows again, in any batches (each row has a key of its own, so a resumed
  or multi-process run draws them alike), another seed other ones, and a directory made
  greedily or at another seed or temperature is not reused."""
  run, params, greedy_dir = finished
  greedy = {r["row"]: r["prediction_ids"] for r in jsonl.read(greedy_dir / "predictions.jsonl")}

  def sample(directory, batch_size=2, **settings):
    evaluator.evaluate_data(params, run, run.sources(f"rows:{ROWS}"), modes=["all"],
                            output_dir=str(directory), model_name="hf", batch_size=batch_size,
                            log=lambda *a: None, **settings)
    return {r["row"]: r["prediction_ids"] for r in jsonl.read(directory / "predictions.jsonl")}

  hot = dict(temperature=3.0, top_p=0.95)  # a random tiny model: every sample differs
  first = sample(tmp_path / "a", seed=0, **hot)
  assert sample(tmp_path / "b", seed=0, **hot) == first
  assert sample(tmp_path / "one_by_one", batch_size=1, seed=0, **hot) == first
  assert sample(tmp_path / "c", seed=1, **hot) != first
  assert first != greedy
  for other in (dict(seed=1, **hot), dict(seed=0, temperature=2.0, top_p=0.95), {}):
    with pytest.raises(output_key.OutputKeyError, match="sampl"):
      sample(tmp_path / "a", **other)
