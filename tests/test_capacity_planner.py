"""launch/plan.py's verdicts: what a train step holds (--model), the device a GPU mesh is judged
on, each row's fit verdict as launch/compile.py gives it, and mesh-aware terms."""

import json
import os

import jax
import pytest

from configs import models
from memrecall.capacity import aot, memory_plan
from memrecall.models.config import ModelConfig
from tests import forked_launchers
from tests.conftest import xla_defaults_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = xla_defaults_env()
ENV.pop("MEMRECALL_VERBOSE", None)
GiB = 2**30
H100 = 84942979072 / GiB  # the H100's memory as XLA's target config gives it
E, M, L, H, K, D = 3584, 18944, 28, 28, 4, 128


def _plan(*args):
  return forked_launchers.run(os.path.join(ROOT, "launch", "plan.py"), args, ENV, cwd=ROOT,
                             timeout=120)


def _qwen7b(**changes):
  shape = models.model_config("qwen2.5-7b").to_dict()
  return ModelConfig.from_dict(shape).replace(compressor=True, **changes)


def test_the_model_summary_counts_the_float32_gradients_and_judges_jaxs_pool():
  """7B on fsdp 2 with float32 master weights: parameters and moments are 45 GiB a GPU, and
  the step's gradient buffers (the block loop's carry, the turn's layer scan) 30 GiB more; it
  printed 63.64 GiB, "fits", leaving them out."""
  result = memory_plan.plan(_qwen7b(param_dtype="float32"), {"fsdp": 2}, batch=16,
                            turn_tokens=2560)
  assert result.gradients == result.optimizer  # two float32 copies of the trainable leaves
  assert result.total / GiB > 0.9 * H100
  proc = _plan("--model=qwen2.5-7b", "--mesh=fsdp=2", "--batch=16", "--turn_tokens=2560")
  assert proc.returncode == 0, proc.stderr
  total = next(l for l in proc.stdout.splitlines() if l.strip().startswith("total"))
  assert f"{result.total / GiB:.2f} GiB of 79.1 GiB (h100): does not fit by" in total, total
  # Between JAX's default pool (75%) and 85% of the card: fits, with the fraction to set.
  proc = _plan("--model=qwen2.5-7b", "--mesh=fsdp=8", "--batch=16", "--turn_tokens=2560",
               "--device_gib=34")
  total = next(l for l in proc.stdout.splitlines() if l.strip().startswith("total"))
  assert "of 34.0 GiB (h100): fits; above JAX's default pool (75% of 34 GiB): run with " \
         "XLA_PYTHON_CLIENT_MEM_FRACTION=0." in total, total


def test_an_unknown_card_is_one_line_naming_the_cards():
  proc = _plan("--model=tiny", "--card=a100-80gb")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "plan.py: error: --card=a100-80gb: choose a GPU card (h100, h100-pcie, h200, b200, a100, "
      "a100-40gb, a100-80gb-pcie) or a TPU generation (v4, v5e, v5p, v6e)"), proc.stderr


def test_the_model_summary_reuses_the_recipe_estimators_terms():
  """--model with the 7B recipe's model, mesh, rows and turn gives the same gradient, gathered
  layer, MLP kernel, LM head, remat and MLP terms as the recipe's train step (SFT on gpu8:
  32 rows in 4 microbatches, one row a device)."""
  from configs import lychee
  from memrecall.run_builder import build_run
  from memrecall.train import trainer
  config = lychee.get_config("sft,7b,gpu8")
  run = build_run(config, jax.devices()[:8])
  programs = aot.recipe_programs(run, eval_batch=16, eval_tokens=4096, eval_modes=[])
  step = memory_plan.estimate_programs(run, programs)[0]
  recipe = {t.name: t.bytes for t in step.phases["a turn's backward"]}
  turn = run.prompts.update.length(run.question_tokens, run.memory_capacity) + \
      run.reasoner.memory_size
  result = memory_plan.plan(run.model, {"fsdp": 8}, trainable=config.train.trainable,
                            batch=config.train.batch_size, turn_tokens=turn,
                            microbatches=trainer.microbatches_of(config, 8))
  mine = {t.name: t.bytes for t in result.terms}
  for name in ("gradients", "one layer's weights gathered", "MLP kernels in the backward's layout",
               "LM head gathered", "remat: the turn's layer inputs", "one layer's MLP"):
    assert mine[name] == recipe[name], name


def test_a_gpu_mesh_without_a_record_is_judged_on_an_h100_and_says_when_loops_gather(tmp_path):
  """gpu8 names no card: without a record it is judged on an H100 (JAX's 75% pool), so
  evaluation is placed as compile.py places it there (replicated: 17 GiB a GPU, not the
  4.9 GiB of weights sharded on an unknown device).  Where the weights stay sharded (a small
  --device_gib) the footnote on the loops' per-step gathers is printed, record or not."""
  out = tmp_path / "plan.json"
  spec = ["--config=configs/lychee.py:rl,7b,gpu8", "--config.train.batch_size=128",
          "--config.rl.group_size=8", "--records=/nonexistent", f"--output_json={out}"]
  proc = _plan(*spec)
  assert proc.returncode == 0, proc.stderr
  rows = {r["program"]: r for r in json.load(open(out))}
  assert rows["eval_recall_gate"]["eval_weights"] == "replicated"
  assert rows["eval_recall_gate"]["estimate"]["total_gib"] > 15  # the whole bfloat16 copy
  assert "judged on h100 (79.1 GiB, JAX's default pool 75%" in proc.stdout
  proc = _plan(*spec, "--device_gib=2")
  assert proc.returncode == 0, proc.stderr
  assert json.load(open(out))[-1]["eval_weights"] == "sharded"
  note = proc.stdout.strip().splitlines()[-1]
  assert "eval_recall_gate" in note and "all-gathers the layers' weights" in note, note
  assert "XLA's GPU compiler also gathers the whole model" in note


def test_each_row_carries_the_compilers_verdict(tmp_path):
  """A record's advice is shown on its row (JAX's pool), a row the compiler refused says so
  (it showed '?'), and a row without a record is judged as compile.py would judge it."""
  spec = "configs/lychee.py:sft,0.5b,gpu8"
  pool = "above JAX's default pool (75% of 79 GiB): run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.85"
  refused = "does not fit by 3.00 GiB (over 90% of 79 GiB): more microbatches"
  rows = [{"program": "train_step", "allocation_gib": 0.0, "total_gib": 74.2, "compiled": False,
           "fits": False, "advice": refused},
          {"program": "eval_recall_gate", "allocation_gib": 60.0, "total_gib": 63.3,
           "fits": True, "advice": pool},
          {"program": "answer_stream", "allocation_gib": 2.0, "total_gib": 2.0}]
  (tmp_path / "r.json").write_text(json.dumps({
      "config": spec, "overrides": [], "topology": "h100:8", "hbm_gib_per_device": 79.1,
      "jax": "0.12.0.1", "compiler": "jax-cuda12-plugin 0.12.0.1", "eval_batch": 16,
      "eval_modes": ["gate", "stream"], "rows": rows}))
  out = tmp_path / "plan.json"
  proc = _plan(f"--config={spec}", f"--records={tmp_path}", f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  lines = {l.split()[0]: l for l in proc.stdout.splitlines() if l.startswith("  ")}
  assert "refused" in lines["train_step"] and lines["train_step"].endswith(refused)
  assert lines["eval_recall_gate"].endswith(f"fits; {pool}")
  assert lines["answer_stream"].endswith("fits")
  verdicts = {r["program"]: r["verdict"] for r in json.load(open(out))}
  assert verdicts == {"train_step": refused, "eval_recall_gate": f"fits; {pool}",
                      "answer_stream": "fits"}
  # Another device's memory (--device_gib) is judged anew, not given the record's verdict;
  # --card does not apply where the record names the device, and says so.
  proc = _plan(f"--config={spec}", f"--records={tmp_path}", "--device_gib=40", "--card=a100")
  assert proc.returncode == 0, proc.stderr
  lines = {l.split()[0]: l for l in proc.stdout.splitlines() if l.startswith("  ")}
  assert "158.2%" in lines["eval_recall_gate"] and "does not fit by" in lines["eval_recall_gate"]
  assert lines["answer_stream"].endswith("fits")
  assert "--card=a100 is not used" in proc.stderr


def test_jaxs_pool_advice_is_marginal_near_the_card():
  """Between 75% and 85% of a GPU: the fraction to run with.  Above 85% the runtime's own
  workspaces (outside the plan) may not fit the rest: marginal, and fewer rows per device."""
  assert aot.fit_advice("rollout", 64.0, 80.0, 50.0, 14.0, pool_fraction=0.75) == (
      "above JAX's default pool (75% of 80 GiB): run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.85")
  marginal = aot.fit_advice("rollout", 70.0, 80.0, 50.0, 20.0, pool_fraction=0.75)
  assert marginal.startswith("above JAX's default pool (75% of 80 GiB) and marginal at 87.5% "
                             "of the card (cuBLAS and NCCL workspaces are outside the plan): "
                             "give each device fewer rows (a smaller batch)"), marginal
  assert marginal.endswith("XLA_PYTHON_CLIENT_MEM_FRACTION=0.90")
  assert "fewer rows (more train.microbatches)" in aot.fit_advice(
      "train_step", 70.0, 80.0, 50.0, 20.0, pool_fraction=0.75)
  assert aot.fit_advice("rollout", 70.0, 80.0, 50.0, 20.0) == ""  # a TPU: no pool
  assert aot.fit_advice("rollout", 75.0, 80.0, 50.0, 25.0, pool_fraction=0.75).startswith(
      "does not fit by 3.00 GiB")


def test_terms_follow_the_mesh():
  """Query heads the tensor axis does not divide (28 on 8) keep their scores whole on every
  device; a layer gathered over fsdp stays split over tensor; without fsdp and with weights
  stored in the compute dtype nothing is gathered."""
  from memrecall.models.qwen2 import QUERY_BLOCK
  model = _qwen7b()  # bfloat16 storage and compute
  scores = lambda tensor: next(t.bytes for t in memory_plan.plan(
      model, {"tensor": tensor}, turn_tokens=1024).terms if t.name.startswith("attention"))
  assert scores(8) == H * QUERY_BLOCK * 1024 * 4
  assert scores(4) == H * QUERY_BLOCK * 1024 * 4 // 4
  layer = lambda sizes: next((t.bytes for t in memory_plan.plan(model, sizes).terms
                              if t.name.startswith("one layer's weights")), 0)
  norms = 2 * 2 * E * 2  # two copies of the layer's two RMS norms, replicated
  assert layer({"fsdp": 2, "tensor": 2}) - norms == (layer({"fsdp": 4}) - norms) // 2
  assert layer({"tensor": 4}) == 0
  cast = memory_plan.plan(_qwen7b(param_dtype="float32"), {"tensor": 4}).terms
  assert any(t.name == "one layer's weights cast to bfloat16" for t in cast)


def test_several_updates_a_step_say_what_the_estimate_leaves_out():
  """rl.updates_per_batch > 1 adds the policy's scoring pass as a program of its own, and the
  table says the train step's estimate leaves out what the update loop carries."""
  proc = _plan("--config=configs/tiny.py:rl", "--config.mesh.fsdp=1",
               "--config.rl.updates_per_batch=2")
  assert proc.returncode == 0, proc.stderr
  assert "policy_logprobs" in proc.stdout
  assert "train_step: 2 updates a step (rl.updates_per_batch)" in proc.stdout
  proc = _plan("--config=configs/tiny.py:rl", "--config.mesh.fsdp=1")
  assert "policy_logprobs" not in proc.stdout and "updates a step" not in proc.stdout
