"""The real-path commands of docs/scaling.md, with the model and data swapped for fixtures."""

import json
import os
import shutil

import pytest

from tests import forked_launchers
from tests.conftest import cpu_env
from tests.conftest import LYCHEE_TEXT
from tests.real.conftest import ROOT

ENV = cpu_env()
# The toy-size overrides of tests/real/test_recipes.py's `recipe`, as flags.
TOY = ["--config.model.param_dtype=float32", "--config.model.dtype=float32",
       "--config.model.remat=none", "--config.model.gate_lora_rank=4",
       "--config.compressor.chunk_size=64", "--config.compressor.window=64",
       "--config.reasoner.memory_size=24", "--config.reasoner.answer_tokens=8",
       "--config.reasoner.question_tokens=48", "--config.data.max_chunks=16",
       "--config.train.steps=2", "--config.train.batch_size=2", "--config.train.microbatches=1",
       "--config.train.checkpoint_every=1",
       "--config.rl.group_size=2", "--config.mesh.fsdp=1"]


def launch(script: str, *args: str, cwd: str = ROOT, check: bool = True):
  proc = forked_launchers.run(os.path.join(ROOT, "launch", script), args, ENV, cwd=cwd,
                              timeout=600)
  if check:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc


def predictions(path) -> list[dict]:
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_eval_of_the_reference_checkpoint_reproduces_its_answer_ids(tmp_path):
  """The issue's exact command: LycheeMemory's public code gave these ids on these rows."""
  hf, rows = os.path.join(LYCHEE_TEXT, "hf"), os.path.join(LYCHEE_TEXT, "rows.json")
  command = [f"--hf_checkpoint={hf}", f"--data=rows:{rows}", "--modes=all", "--chunk_size=1024",
             "--memory_size=16", "--answer_tokens=12", "--matmul_precision=highest"]
  launch("eval.py", *command, cwd=str(tmp_path))
  expected = json.load(open(os.path.join(LYCHEE_TEXT, "expected.json")))
  out = tmp_path / "eval" / "hf"
  got = predictions(out / "predictions.jsonl")
  assert [r["row"] for r in got] == [0, 1] and {r["mode"] for r in got} == {"all"}
  for record, ids in zip(got, expected["answer_ids"]):
    assert record["prediction_ids"] == [i for i in ids if i not in (0, 2)]  # EOS and pad removed
    assert record["blocks_read"] == 8 and record["num_docs"] == 1
    for key in ("prediction", "answers", "sub_em", "strict_sub_em", "em"):
      assert key in record
  assert got[1]["answers"] == ["4", "four"]
  results = json.load(open(out / "results.json"))
  assert [(r["data"], r["mode"], r["examples"]) for r in results] == [("rows.json", "all", 2)]
  assert (out / "results.csv").exists()
  assert '"matmul_precision": "highest"' in (out / "keys.json").read_text()  # in the rows' key
  # Rerunning skips the finished rows.
  launch("eval.py", *command, cwd=str(tmp_path))
  assert predictions(out / "predictions.jsonl") == got


def test_train_rl_from_a_hf_checkpoint_then_evaluate_the_workdir(tiny_qwen, data_files, tmp_path):
  work, hf = tmp_path / "rl", tmp_path / "hf"
  shutil.copytree(tiny_qwen, hf)
  launch("train.py", "--config=configs/lychee.py:rl", f"--config.init.hf_checkpoint={hf}",
         f"--config.data.train=rows:{data_files['rows']}", f"--workdir={work}", *TOY)
  assert sorted(os.listdir(work / "checkpoints")) == ["1", "2"]
  shutil.rmtree(hf)  # the workdir keeps what it needs (hf_assets/)
  # A TFDS RULER-HQA dataset built once (as every host would stream it).
  manual = tmp_path / "manual"
  manual.mkdir()
  shutil.copy(data_files["hotpotqa"], manual / "hotpot_dev_distractor_v1.json")
  prepared = launch("prepare_data.py", "--builder=ruler_hqa", "--num_docs=12", "--num_questions=3",
                    f"--manual_dir={manual}", f"--data_dir={tmp_path / 'tfds'}")
  tfds_dir = prepared.stdout.strip().splitlines()[-1]
  out = tmp_path / "eval"
  proc = launch("eval.py", f"--checkpoint={work}", f"--data=rows:{data_files['eval_rows']}",
                f"--data=ruler_hqa:{data_files['ruler_hqa']}", f"--data=tfds:{tfds_dir}",
                "--modes=all,memagent", "--limit=2", "--batch_size=2", f"--output_dir={out}")
  got = predictions(out / "predictions.jsonl")
  assert {(r["data"], r["mode"]) for r in got} == {
      (d, m) for d in ("eval_rows.jsonl", "memagent_eval_20.json", "ruler_hqa/docs12-q3/1.2.0")
      for m in ("all", "memagent")}
  assert len(got) == 12 and all(isinstance(r["prediction"], str) for r in got)
  results = json.load(open(out / "results.json"))
  assert {r["num_docs"] for r in results} == {4, 12, 20}
  assert "sub-EM" in proc.stdout
  # Exported as a HF checkpoint (float32, as it trained), the run answers as its workdir does
  # through --hf_checkpoint with the run's sizes: weights, compressor settings, gate, tokenizer
  # and chat template all travel.
  exported = tmp_path / "exported"
  launch("export.py", f"--checkpoint={work}", f"--output={exported}", "--dtype=float32")
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(exported))
  launch("eval.py", f"--hf_checkpoint={exported}", f"--data=rows:{data_files['eval_rows']}",
         "--modes=all", "--limit=2", "--batch_size=2", "--chunk_size=64", "--memory_size=24",
         "--answer_tokens=8", "--question_tokens=48", f"--output_dir={tmp_path / 'eval_hf'}")
  answers = lambda rows: [(r["row"], r["prediction_ids"]) for r in rows
                          if r["data"] == "eval_rows.jsonl" and r["mode"] == "all"]
  assert len(answers(got)) == 2 and all(ids for _, ids in answers(got))
  assert answers(predictions(tmp_path / "eval_hf" / "predictions.jsonl")) == answers(got)


def _rows_file(tmp_path, name, rows):
  path = tmp_path / name
  path.write_text(json.dumps(rows))
  return str(path)


def test_bad_input_is_a_clear_error_and_keeps_what_was_written(tiny_qwen, data_files, tmp_path):
  from memrecall import run_builder
  from memrecall.models.config import ConfigError
  good = json.load(open(data_files["rows"]))[:2]
  run = run_builder.from_hf_checkpoint(tiny_qwen, chunk_size=64, memory_size=8, answer_tokens=4)
  cases = {
      "no_answer.json": ([{**good[0], "reward_model": {}}], "no_answer.json row 0", "answer"),
      "no_question.json": ([{"context": "Document 1:\nx", "answers": ["a"]}],
                           "no_question.json row 0", "question"),
      "empty.json": ([{**good[0], "context": "  "}], "empty.json row 0", "context"),
  }
  for name, (rows, where, what) in cases.items():
    with pytest.raises(ValueError, match=f"{where}.*{what}"):
      run.sources(f"rows:{_rows_file(tmp_path, name, rows)}")
  with pytest.raises(ValueError, match="unknown kind 'novel'.*ruler_hqa"):
    run.sources("novel:/x.json")
  bare = tmp_path / "bare"  # a checkpoint without its tokenizer
  shutil.copytree(tiny_qwen, bare)
  os.remove(bare / "tokenizer.json")
  with pytest.raises(ConfigError, match=f"{bare} has no tokenizer.json"):
    run_builder.from_hf_checkpoint(str(bare))
  # Through the launcher: a question over its budget stops the run at its row (a usage error
  # naming it), and the rows already done stay.  (The same settings in both runs: a rerun with
  # another budget is refused before any row, see tests/test_bad_inputs.py.)
  base = [f"--hf_checkpoint={tiny_qwen}", "--modes=all", "--chunk_size=64", "--memory_size=8",
          "--answer_tokens=4", "--question_tokens=32", f"--output_dir={tmp_path / 'out'}"]
  rows = _rows_file(tmp_path, "two.json", [good[0], {**good[1], "extra_info": {
      "question": "why " * 40}, "prompt": []}])
  launch("eval.py", *base, f"--data=rows:{rows}", "--limit=1")
  before = (tmp_path / "out" / "predictions.jsonl").read_text()
  proc = launch("eval.py", *base, f"--data=rows:{rows}", check=False)
  assert proc.returncode != 0 and "two.json row 1" in proc.stderr and "budget" in proc.stderr
  assert (tmp_path / "out" / "predictions.jsonl").read_text() == before


def test_answer_reads_lycheememorys_row_layout():
  """LycheeMemory's own example rows (context, prompt, reward_model, extra_info.question)."""
  proc = launch("answer.py", f"--hf_checkpoint={os.path.join(LYCHEE_TEXT, 'hf')}",
                f"--document={os.path.join(LYCHEE_TEXT, 'rows.json')}", "--row=1",
                "--chunk_size=1024", "--memory_size=16", "--max_new_tokens=12", "--mode=all")
  expected = json.load(open(os.path.join(LYCHEE_TEXT, "expected.json")))
  assert f"answer: {expected['answers'][1]}" in proc.stdout


def test_an_overlong_training_row_stops_the_run_by_name_or_is_left_out(tiny_qwen, data_files,
                                                                       tmp_path):
  """data.overlong: `error` names the row and the setting; `skip` puts the epoch's next row that
  fits in its place (a run had died at such a row mid-way, and could not resume past it)."""
  from memrecall import run_builder
  from memrecall.readers.base import BatchError, chunked
  rows = json.load(open(data_files["rows"]))[:4]
  rows[2] = {**rows[2], "context": rows[2]["context"] * 8}
  path = _rows_file(tmp_path, "mixed.json", rows)

  def run_with(overlong):
    run = run_builder.from_hf_checkpoint(tiny_qwen, chunk_size=64, memory_size=8, answer_tokens=4)
    run.config.data.update({"train": f"rows:{path}", "overlong": overlong})
    lengths = [len(run.tokenizer.encode(r["context"])) for r in rows]
    run.config.data.max_chunks = -(-max(lengths[:2] + lengths[3:]) // 64)
    assert lengths[2] > run.num_chunks * 64  # only row 2 is over the budget
    return run

  strict = run_with("error")
  examples = strict.examples(0, 4)  # one epoch: every row once
  assert sorted(e.example.metadata["row"] for e in examples) == [0, 1, 2, 3]
  with pytest.raises(BatchError, match=r"mixed.json row 2 .*over the budget of .* "
                                       r"\(data.max_chunks; --config.data.overlong=skip"):
    chunked(examples, 64, strict.num_chunks, 0)
  lenient = run_with("skip")
  kept = lenient.examples(0, 4)
  assert 2 not in [e.example.metadata["row"] for e in kept]
  assert all(len(e.context) <= lenient.num_chunks * 64 for e in kept)
  # The same rows on every call (each process asks for its own positions of the stream).
  assert [e.example.id for e in lenient.examples(1, 2)] == [e.example.id for e in kept[1:3]]
