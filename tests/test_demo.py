"""The demo pipeline end to end with tiny budgets: every stage, the files, and a rerun that reuses."""

import json
import os

from memrecall import demo
from tests.train.conftest import small_config


def _small(arg):
  c = small_config(arg)
  c.demo.compressor_steps, c.demo.sft_steps, c.demo.sft_early_accuracy = 2, 4, 0.0
  c.demo.rl_steps, c.demo.gate_steps = 2, 2
  c.demo.eval_lengths, c.demo.eval_examples, c.demo.eval_batch = (1, 2), 4, 4
  c.demo.memagent_examples, c.demo.rl_eval_examples, c.demo.latency_examples = 2, 4, 2
  c.demo.train_memagent = True  # the full variant's fair baseline, on raw chunks
  c.demo.extra_tasks = ("vartrack",)  # and its harder task
  c.demo.eval_modes = ("gate", "all", "memagent")  # the full variant's modes
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
      ("lychee", "multihop", m, n) for m in ("gate", "all", "memagent") for n in (1, 2)} | {
      ("memagent", "multihop", "memagent", n) for n in (1, 2)} | {
      ("lychee", "vartrack", m, n) for m in ("gate", "all") for n in (1, 2)}
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
