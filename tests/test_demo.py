"""The demo pipeline end to end with tiny budgets: every stage, the files, and a rerun that reuses."""

import json
import os
import subprocess

import pytest

from memrecall import demo
from tests.train.conftest import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small(arg):
  c = small_config(arg)
  c.demo.compressor_steps, c.demo.sft_steps, c.demo.sft_early_accuracy = 2, 4, 0.0
  c.demo.rl_steps, c.demo.gate_steps = 2, 2
  # Batches of one question: a question timed alone runs the batches' own compiled program, so
  # each evaluated mode and length compiles once, not twice (the demo alone: 105 -> 81 s).
  c.demo.eval_lengths, c.demo.eval_examples, c.demo.eval_batch = (1, 2), 4, 1
  c.demo.memagent_examples, c.demo.rl_eval_examples, c.demo.latency_examples = 2, 4, 1
  c.demo.train_memagent = True  # the full variant's fair baseline, on raw chunks
  c.demo.extra_tasks = ("vartrack",)  # and its harder task
  # The default variant's modes: `all` (the full variant's third) is evaluated in
  # tests/test_evaluation.py, and its rows here were four more compiles.
  c.demo.eval_modes = ("gate", "memagent")
  return c


def test_demo_runs_every_stage_and_reuses_them(tmp_path):
  lines = []
  stages = demo.run_demo(_small, str(tmp_path), log=lines.append)
  assert set(stages) == {"compressor", "sft_early", "sft", "rl_from_early_sft", "rl", "gate",
                         "memagent_sft", "memagent_rl", "vartrack_sft", "vartrack_gate", "eval"}
  assert stages["sft_early"]["step"] == 2  # the first checkpoint reached 0% accuracy
  early = stages["rl_from_early_sft"]
  for key in ("reward_start", "reward_end", "accuracy_before", "accuracy_after"):
    assert early[key] is not None
  assert "accuracy_1x" in stages["sft"]
  # The baseline trains with its own settings (configs/tiny.py, AGENT memagent): at the
  # method's learning rate its raw-chunk lookup never forms.
  memagent = _small("sft,default,multihop,memagent")
  assert memagent.agent == "memagent"
  assert stages["memagent_sft"]["learning_rate"] == memagent.optimizer.learning_rate
  assert memagent.optimizer.learning_rate < _small("sft").optimizer.learning_rate
  def strict(constant):
    raise AssertionError(f"{constant} in results.json: not strict JSON")
  rows = json.load(open(tmp_path / "results.json"), parse_constant=strict)
  json.load(open(tmp_path / "eval" / "results.json"), parse_constant=strict)
  assert {r["gate_recall"] for r in rows if r["mode"] == "memagent"} == {None}
  assert {(r["model"], r["task"], r["mode"], r["length_multiple"]) for r in rows} == {
      ("lychee", "multihop", m, n) for m in ("gate", "memagent") for n in (1, 2)} | {
      ("memagent", "multihop", "memagent", n) for n in (1, 2)} | {
      ("lychee", "vartrack", "gate", n) for n in (1, 2)}
  assert {r["examples"] for r in rows if r["mode"] == "memagent"} == {2}
  assert {r["examples"] for r in rows if r["mode"] != "memagent"} == {4}
  assert set(rows[0]) >= {"model", "mode", "length_multiple", "context_tokens", "examples",
                          "accuracy", "latency_s", "batched_s"}
  report = open(tmp_path / "report.md").read()
  assert "| model | task | mode | length |" in report and "| total |" in report
  assert report.count("| lychee | multihop | gate |") == 2
  assert report.count("| lychee | vartrack | gate |") == 2
  for png in ("accuracy_vs_length.png", "latency_vs_length.png", "rl_reward.png"):
    assert os.path.getsize(tmp_path / png) > 1000
  assert any(line.startswith("[demo] RL from early SFT (step 2): greedy accuracy") for line in lines)
  assert any("memagent mode takes" in line and "; trained memagent" in line for line in lines)
  # A rerun trains nothing again.
  again = []
  demo.run_demo(_small, str(tmp_path), log=again.append)
  assert sum("reused" in line for line in again) == 9


def test_a_memagent_agent_is_evaluated_on_sections_as_long_as_its_training_chunks():
  config = _small("sft,default,multihop,memagent")
  config.compressor.chunk_size = config.compressor.window = 8
  assert demo._memagent_baseline(config).memagent_chunk == 8
  assert demo._memagent_baseline(_small("sft")).memagent_chunk == 16


# --- bad input and the reuse of finished stages, without training ---------------------------

class _Trained(Exception):
  """Raised by a stand-in for `trainer.train`: the demo reached a stage it would train."""


def _no_training(monkeypatch, finished: bool = False):
  """trainer.train replaced: raises _Trained, or (finished) returns at once as a stage whose
  checkpoints are all there does."""
  def train(config, directory, log=print, stop_at=None):
    if finished:
      return {}
    raise _Trained(directory)
  monkeypatch.setattr(demo.trainer, "train", train)


def _checkpoints(directory, *steps):
  for step in steps:
    os.makedirs(directory / "checkpoints" / str(step))
    (directory / "checkpoints" / str(step) / "state").write_text(str(step))


@pytest.mark.parametrize("content,problem", [
    ('{"compressor": {"wall_s": 1', "is not valid JSON"), ("", "is not valid JSON"),
    ('[{"wall_s": 1}]', "holds a JSON list, not an object of stages")])
def test_a_damaged_stages_record_is_named_before_any_training(tmp_path, monkeypatch, content,
                                                               problem):
  _no_training(monkeypatch)
  (tmp_path / "stages.json").write_text(content)
  with pytest.raises(ValueError) as error:
    demo.run_demo(_small, str(tmp_path), log=lambda line: None)
  assert str(error.value).startswith(f"{tmp_path / 'stages.json'} {problem}")
  assert "delete" in str(error.value)
  assert (tmp_path / "stages.json").read_text() == content


def test_a_deleted_early_sft_copy_is_made_again_from_its_recorded_step(tmp_path, monkeypatch):
  """Not from SFT's latest (final) checkpoint, which is what the copy's absence led to."""
  _no_training(monkeypatch)
  records = {"compressor": {"wall_s": 1.0}, "sft_early": {"wall_s": 1.0, "step": 2},
             "sft": {"wall_s": 1.0}}
  (tmp_path / "stages.json").write_text(json.dumps(records))
  _checkpoints(tmp_path / "sft", 2, 4)
  with pytest.raises(_Trained, match="rl_early"):  # every stage before RL reused
    demo.run_demo(_small, str(tmp_path), log=lambda line: None)
  assert os.listdir(tmp_path / "sft_early" / "checkpoints") == ["2"]
  assert (tmp_path / "sft_early" / "checkpoints" / "2" / "state").read_text() == "2"


@pytest.mark.parametrize("recorded,sft_steps,early_steps,message", [
    (True, (4,), (), "is gone and {sft} no longer holds step 2 it was copied from"),
    (True, (2, 4), (4,), "holds steps [4], not step 2 of {sft}"),
    (False, (4,), (4,), "has no record in {stages} of the SFT step it holds"),
    (False, (4,), (), "{sft} has trained past the early checkpoint RL starts from (it holds"),
])
def test_an_early_sft_copy_that_cannot_be_checked_is_refused(tmp_path, monkeypatch, recorded,
                                                             sft_steps, early_steps, message):
  _no_training(monkeypatch, finished=True)
  records = {"compressor": {"wall_s": 1.0}}
  if recorded:
    records["sft_early"] = {"wall_s": 1.0, "step": 2}
  (tmp_path / "stages.json").write_text(json.dumps(records))
  _checkpoints(tmp_path / "sft", *sft_steps)
  if early_steps:
    _checkpoints(tmp_path / "sft_early", *early_steps)
  with pytest.raises(ValueError) as error:
    demo.run_demo(_small, str(tmp_path), log=lambda line: None)
  assert message.format(sft=tmp_path / "sft", stages=tmp_path / "stages.json") in str(error.value)
  assert sorted(os.listdir(tmp_path / "sft" / "checkpoints")) == [str(s) for s in sft_steps]


@pytest.fixture
def echo_venv(tmp_path):
  """A virtual environment for launch/demo.sh whose python prints its arguments: the command
  demo.sh would run, and nothing installed or trained."""
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text('#!/bin/sh\necho "$@"\n')
  (venv / "bin" / "python").chmod(0o755)
  (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
  (venv / ".memrecall-installed-hf,plot").touch()  # newer than setup.py: nothing to install
  return venv


@pytest.mark.parametrize("args,code,output", [
    (["mywd", "--variant=full"], 0, "launch/demo.py --workdir={cwd}/mywd --variant=full"),
    (["--workdir=mywd"], 0, "launch/demo.py --workdir=workdir/demo --workdir={cwd}/mywd"),
    (["full"], 2, "launch/demo.sh: error: 'full' is a variant: give --variant=full"),
    (["mywd", "full"], 2, "launch/demo.sh: error: 'full' is a variant"),
    (["mywd", "extra"], 2, "launch/demo.sh: error: unexpected argument 'extra'"),
])
def test_demo_sh_reads_workdir_under_the_callers_directory(tmp_path, echo_venv, args, code,
                                                           output):
  cwd = tmp_path / "caller"
  cwd.mkdir()
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "demo.sh"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, "MEMRECALL_VENV": str(echo_venv)})
  assert proc.returncode == code, proc.stdout + proc.stderr
  said = (proc.stdout + proc.stderr).strip()
  assert said == output.format(cwd=cwd) if code == 0 else said.startswith(output), said
  assert len(said.splitlines()) == 1 and os.listdir(cwd) == []
