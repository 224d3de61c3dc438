"""The demo pipeline end to end with tiny budgets: every stage, the files, and a rerun that reuses."""

import json
import os

from memrecall import demo
from tests.train.conftest import small_config


def _small(arg):
  c = small_config(arg)
  c.demo.compressor_steps, c.demo.sft_steps, c.demo.sft_early_step = 2, 4, 2
  c.demo.rl_steps, c.demo.gate_steps = 2, 2
  c.demo.eval_lengths, c.demo.eval_examples, c.demo.eval_batch = (1, 2), 4, 4
  return c


def test_demo_runs_every_stage_and_reuses_them(tmp_path):
  lines = []
  stages = demo.run_demo(_small, str(tmp_path), log=lines.append)
  assert set(stages) == {"compressor", "sft", "rl_from_early_sft", "rl", "gate", "eval"}
  early = stages["rl_from_early_sft"]
  for key in ("reward_start", "reward_end", "accuracy_before", "accuracy_after"):
    assert early[key] is not None
  assert "accuracy_1x" in stages["sft"]
  rows = json.load(open(tmp_path / "results.json"))
  assert {(r["mode"], r["length_multiple"]) for r in rows} == {
      (m, n) for m in ("gate", "all", "memagent") for n in (1, 2)}
  assert set(rows[0]) >= {"model", "mode", "length_multiple", "context_tokens", "examples",
                          "accuracy", "latency_s"}
  for png in ("accuracy_vs_length.png", "latency_vs_length.png", "rl_reward.png"):
    assert os.path.getsize(tmp_path / png) > 1000
  assert any("RL from early SFT: greedy accuracy" in line for line in lines)
  # A rerun trains nothing again.
  again = []
  demo.run_demo(_small, str(tmp_path), log=again.append)
  assert sum("reused" in line for line in again) == 5
