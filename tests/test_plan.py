"""launch/plan.py's byte counts against counts derived by hand from the 7B shapes."""

import pytest

from configs import models
from memrecall.capacity import memory_plan
from memrecall.train import trainer
from memrecall.models.config import ModelConfig

E, M, V, L, H, K, D = 3584, 18944, 152064, 28, 28, 4, 128


def _qwen7b():
  return ModelConfig.from_dict(models.model_config("qwen2.5-7b").to_dict()).replace(compressor=True)


def _by_hand(fsdp: int, tensor: int) -> int:
  """Per-device bf16 bytes: kernels split over fsdp (embed dim) and tensor (heads/mlp/vocab);
  biases split over tensor only (their heads axis); norms replicated."""
  kernels = (2 * V * E  # embedding + lm_head: vocab over tensor, embed over fsdp
             + L * (2 * E * H * D + 2 * E * K * D)  # q and o; k and v
             + L * 3 * E * M)  # gate, up, down
  beacon_kernels = L * (E * H * D + 2 * E * K * D)
  sharded = (kernels + beacon_kernels) // (fsdp * tensor)
  beacon_embedding = E // fsdp
  biases = 2 * L * (H * D + 2 * K * D) // tensor  # ordinary and beacon q/k/v biases
  norms = (2 * L + 1) * E
  return 2 * (sharded + beacon_embedding + biases + norms)


@pytest.mark.parametrize("fsdp,tensor", [(8, 1), (4, 2), (2, 4)])
def test_param_and_optimizer_bytes_match_hand_counts(fsdp, tensor):
  result = memory_plan.plan(_qwen7b(), {"fsdp": fsdp, "tensor": tensor}, trainable="backbone")
  assert result.params == _by_hand(fsdp, tensor)
  assert result.optimizer == 2 * result.params  # AdamW's two moments, bf16 like the params
  assert result.devices == 8


def test_beacon_only_training_keeps_moments_small():
  result = memory_plan.plan(_qwen7b(), {"fsdp": 8}, trainable="beacon")
  beacon = (L * (E * H * D + 2 * E * K * D)) // 8 + E // 8 + L * (H * D + 2 * K * D)
  assert result.optimizer == 2 * 2 * beacon


def test_bank_and_the_train_steps_terms():
  """--model's step holds what the recipe estimator counts in a turn's backward pass: the
  trainable leaves' gradients twice (the block loop's carry, the turn's layer scan), a layer's
  weights gathered for its recompute and its backward, the MLP kernels in the backward's
  layout, the remat inputs, one layer's MLP, a block of attention scores, the LM head three
  times and one chunk of the scored tokens' logits."""
  from memrecall.models.qwen2 import QUERY_BLOCK, token_chunks
  config = _qwen7b()
  result = memory_plan.plan(config, {"data": 2, "fsdp": 4}, batch=16, turn_tokens=2560, bank_chunks=64)
  # 64 chunks x 28 layers x k,v x 1024 slots x 4 heads x 128 x 2 bytes, chunks over 8 devices.
  assert result.memory_bank == 64 * L * 2 * 1024 * K * D * 2 // 8
  assert result.gradients == 2 * (result.optimizer // 2)  # the trainable leaves' bytes, twice
  rows, t = 2, 2560
  layer = 2 * (3 * E * H * D + 4 * E * K * D + 3 * E * M + 2 * (H * D + 2 * K * D) + 2 * E)
  assert token_chunks(rows, t, config.mlp_chunk_tokens) is None  # the MLP in one piece
  head_chunk = token_chunks(rows, t, config.head_chunk_tokens)[1]
  expected = (2 * layer + 2 * L * E * M * 2 // 4 + L * rows * t * E * 2 + rows * t * M * 2
              + rows * H * QUERY_BLOCK * t * 4 + 3 * V * E * 2 + rows * head_chunk * V * (2 + 4))
  assert result.activations == expected
  assert result.total == (result.params + result.optimizer + result.gradients
                          + result.activations + result.memory_bank)


# --- every program of a recipe: launch/plan.py --config ------------------------------------

import json
import os

import jax

from tests import forked_launchers
from tests.conftest import xla_defaults_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = xla_defaults_env()
ENV.pop("MEMRECALL_VERBOSE", None)


def _programs(config, devices):
  from memrecall.capacity import aot
  from memrecall.run_builder import build_run
  run = build_run(config, devices)
  programs = aot.recipe_programs(run, eval_batch=16, eval_tokens=run.num_chunks *
                                 run.compressor.chunk_size, eval_modes=["gate", "stream"])
  return run, programs


def test_every_program_has_exact_arguments_and_named_terms():
  from configs import tiny
  from memrecall.capacity import aot
  config = tiny.get_config("rl")
  config.mesh.fsdp = 4
  run, programs = _programs(config, jax.devices()[:4])
  estimates = memory_plan.estimate_programs(run, programs)
  assert [e.program for e in estimates] == ["train_step", "rollout", "reference_logprobs",
                                            "eval_recall_gate", "answer_stream"]
  for e, p in zip(estimates, programs):
    assert e.arguments == aot.device_bytes((p.args, p.kwargs)) > 0
    assert e.held == aot.device_bytes(p.held)
    assert e.total == e.arguments + e.held + e.temporaries and e.temporaries > 0
    for terms in e.phases.values():
      assert all(t.bytes > 0 and t.name and "x" in t.formula for t in terms)
  by_name = {e.program: e for e in estimates}
  # RL keeps the KL reference's copy beside the step, and the optimizer state besides.
  trainable = by_name["train_step"].held
  assert trainable > 0 and by_name["rollout"].held > 2 * trainable


def test_the_7b_terms_by_hand():
  """The rollout's bank and caches of configs/lychee.py:rl,7b,gpu8 (8 devices, 256 rows: 32
  per device), from the 7B shapes, and its train step's float32 gradient buffers."""
  from configs import lychee
  run, programs = _programs(lychee.get_config("rl,7b,gpu8"), jax.devices()[:8])
  step, rollout = memory_plan.estimate_programs(run, programs)[:2]
  # The microbatches' sum, the block loop's carry (from the answer's gradients on) and the
  # turn's layer scan; in the compression's backward also its layer scan (one for the chunk's
  # 2 windows of 2048 tokens).
  trainable = next(t.bytes for t in step.phases["a turn's backward"] if t.name == "gradients") / 3
  assert run.config.train.microbatches == 0 and trainable > 0  # one row per device per part
  assert trainer.microbatches_of(run.config, 8) == 32
  assert next(t.bytes for t in step.phases["compression's backward"]
              if t.name == "gradients") == 4 * trainable
  terms = {t.name: t.bytes for t in rollout.phases["memory updates"]}
  kv = lambda rows, positions: rows * positions * L * 2 * K * D * 2
  assert terms["rollout: the bank"] == kv(32, 8 * 1024)
  prompt = run.prompts.update.length(256, 1024)  # the update template around Q and memory
  assert terms["decode cache: update"] == 2 * kv(32, 1024 + prompt + 1024)
  assert terms["LM head gathered"] == V * E * 2
  # Each device compresses its own 32 x 8 chunks, then the bank holds them.
  assert [t.bytes for t in rollout.phases["compression"]] == [kv(1, 256 * 1024), kv(32, 8 * 1024)]


def _plan(*args, timeout=300):
  return forked_launchers.run(os.path.join(ROOT, "launch", "plan.py"), args, ENV, cwd=ROOT,
                             timeout=timeout)


def test_a_rollout_split_over_tensor_is_estimated_on_its_own_mesh():
  """rl.rollout_weights="tensor" for the same recipe: no device reports memory here, so the
  copy splits over the most devices up to fsdp 8 that split the 4 KV heads (data 2 x tensor 4).
  The rollout's phases then hold that copy (the 7B weights in bfloat16 split as the rules
  split them over tensor 4), the rows split over data 2 (128 a device), each
  row's cache a quarter of its KV heads, and no LM head gathered."""
  import jax
  from configs import lychee
  from memrecall.run_builder import build_run
  from memrecall.train import trainer
  config = lychee.get_config("rl,7b,gpu8")
  config.rl.rollout_weights = "tensor"
  run = build_run(config, jax.devices()[:8])
  rollout = memory_plan.estimate_programs(run, [p for p in trainer.stage_programs(run)
                                                if p.name == "rollout"])[0]
  terms = {t.name: t.bytes for t in rollout.phases["memory updates"]}
  # The gate's rank-16 LoRA on q, k, v and o: its embed-side factors whole, its head-side
  # ones split over tensor; the gate's head and bias stay float32.
  r = run.model.gate_lora_rank
  lora = L * 2 * (4 * E * r + (2 * H * D * r + 2 * K * D * r) // 4)
  assert terms["the rollout's inference copy (tensor)"] == _by_hand(1, 4) + lora + 4 * E + 4
  kv = lambda rows, positions: rows * positions * L * 2 * K * D * 2 // 4
  assert terms["rollout: the bank"] == kv(128, 8 * 1024)
  prompt = run.prompts.update.length(256, 1024)
  assert terms["decode cache: update"] == 2 * kv(128, 1024 + prompt + 1024)
  assert "LM head gathered" not in terms
  assert all(phase[0].name.startswith("the rollout's inference copy")
             for phase in rollout.phases.values())


def test_keeping_every_blocks_residuals_adds_them_for_all_blocks():
  """model.remat_blocks=False (configs/memagent.py:sft,7b,gpu8: raw sections, one row per
  device, 8 blocks): every phase of the step holds N blocks' turn inputs and written-token
  log-probabilities besides what it held, and the answer's weight gradients in a buffer of
  their own (plain autodiff; `trajectory.blocks_then_answer` starts its carry from them)."""
  from configs import memagent
  estimates = {}
  for keep in (False, True):
    config = memagent.get_config("sft,7b,gpu8")
    config.model.remat_blocks = not keep
    run, programs = _programs(config, jax.devices()[:8])
    estimates[keep] = memory_plan.estimate_programs(run, programs)[0]  # train_step
  rows, n = 1, run.num_chunks
  turn = run.prompts.memagent.length(run.question_tokens, run.memory_capacity,
                                     run.compressor.chunk_size) + run.reasoner.memory_size
  by_hand = n * (L * rows * turn * E * 2 + rows * run.reasoner.memory_size * V * 4)
  gradients = lambda keep, phase: next(t.bytes for t in estimates[keep].phases[phase]
                                       if t.name == "gradients")
  for phase, terms in estimates[True].phases.items():
    # The microbatches' sum, the block loop's carry and the turn's scan; then the answer's.
    assert 3 * gradients(True, phase) == 4 * gradients(False, phase), phase
    extra = sum(t.bytes for t in terms) - sum(t.bytes for t in estimates[False].phases[phase])
    assert extra == by_hand + gradients(True, phase) - gradients(False, phase), phase


def test_the_estimate_is_within_25_percent_of_every_compiler_record(tmp_path):
  """docs/compile/ holds launch/compile.py's records of every 7B recipe on its TPU slice, and
  of GPU recipes on one host of 8 H100s: every program of each has a compiler row.  On a TPU
  every estimate is within 25% of what the compiled program allocates (plus what RL holds
  beside it).  The estimate follows the TPU compiler's choices; on GPUs it holds for the train
  step, the rollout and the reference pass, and for evaluation with replicated weights
  (`--weights=auto`'s choice on these cards).
  With sharded weights XLA's GPU compiler also gathers the whole model before inference loops
  (evaluation allocates up to 9x the estimate: docs/2026-12-06-gpu-deviceless-compile.md), and
  so does the TPU compiler on 16 GiB v5e chips (3x; --weights=auto splits the 7B weights over a
  tensor axis there instead, and that estimate holds): sharded evaluation is held only on v5p.
  Where evaluation's rows split over fewer devices than the batch axes (16 questions on 32
  chips) the compiler may spread a row group's prefill over the chips that share it, and the
  estimate is an upper bound: up to 50% over."""
  records = [f for f in os.listdir(os.path.join(ROOT, "docs", "compile")) if f.endswith(".json")]
  assert records
  out = tmp_path / "plan.json"
  proc = _plan("--all", f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  rows = json.load(open(out))
  assert {r["config"] for r in rows} == {json.load(open(os.path.join(
      ROOT, "docs", "compile", f)))["config"] for f in records}
  missing = [(r["config"], r["program"]) for r in rows if r["ratio"] is None]
  assert not missing, f"programs without a compiler record: {missing}"
  from memrecall.capacity import gpu_hosts
  on_gpus = lambda r: gpu_hosts.looks_like_gpu(r["topology"])
  assert any(map(on_gpus, rows)) and not all(map(on_gpus, rows))
  from memrecall.capacity import aot
  def upper(r):
    mesh = r["eval_mesh"] if aot.is_eval(r["program"]) else r["mesh"]
    shards = mesh["data"] * mesh["fsdp"]
    return 1.5 if aot.is_eval(r["program"]) and r["eval_batch"] % shards else 1.25
  sharded_eval = lambda r: aot.is_eval(r["program"]) and r["eval_weights"] == "sharded"
  # On GPUs every RL program holds, whatever the rollout's placement: MemAgent's rollout once
  # allocated twice the estimate, its prefill's attention blocks all scored at once
  # (docs/2026-12-06-prefill-memory.md), and the reference passes 0.7-1.5x before their
  # logits were scored in chunks (docs/2026-12-06-scoring-memory.md).
  held = lambda r: not sharded_eval(r) or r["topology"].startswith("v5p")
  off = {(r["config"], r["topology"], r["program"], r["eval_weights"]): round(r["ratio"], 2)
         for r in rows if held(r) and not 0.75 <= r["ratio"] <= upper(r)}
  assert not off, off
  # Sharded evaluation, where not held: the estimate is under what is allocated, never over.
  over = [(r["config"], r["topology"], r["program"]) for r in rows
          if sharded_eval(r) and r["ratio"] > upper(r)]
  assert not over, over
  for r in rows:  # the printed table carries the same ratios
    assert f"{r['ratio']:.2f}" in proc.stdout
  # A rollout is estimated where its record's compile placed the copy (the target's memory).
  records = {(rec["config"], tuple(rec.get("overrides", []))): rec for rec in (
      json.load(open(os.path.join(ROOT, "docs", "compile", f))) for f in records)
      if any(row["program"] == "rollout" for row in rec["rows"])}
  placed = [r for r in rows if r["program"] == "rollout" and "rollout_mesh" in records.get(
      (r["config"], tuple(r["overrides"])), {})]
  assert any(r["rollout_weights"] == "tensor" for r in placed)
  for r in placed:
    assert r["rollout_mesh"] == records[(r["config"], tuple(r["overrides"]))]["rollout_mesh"]


def test_records_of_other_evaluation_settings_are_not_merged(tmp_path):
  """A later record of one program compiled with other evaluation settings stays apart: merged,
  its settings would relabel the earlier record's evaluation rows (estimated for 64 questions
  of 128K tokens against a program compiled for 16 of 32K)."""
  name = "lychee_rl_7b_v5p-64.json"
  record = json.load(open(os.path.join(ROOT, "docs", "compile", name)))
  (tmp_path / name).write_text(json.dumps(record))
  later = {**record, "eval_batch": 64, "eval_tokens": 131072,
           "rows": [r for r in record["rows"] if r["program"] == "train_step"]}
  (tmp_path / "later.json").write_text(json.dumps(later))
  os.utime(tmp_path / "later.json", (2e9, 2e9))  # written after
  out = tmp_path / "plan.json"
  proc = _plan("--all", f"--records={tmp_path}", f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  rows = json.load(open(out))
  evaluation = [r for r in rows if r["program"] == "eval_recall_gate" and r["ratio"]]
  assert len(evaluation) == 1 and 0.75 <= evaluation[0]["ratio"] <= 1.25, evaluation


def test_a_gpu_mesh_is_an_estimate_until_a_record_names_its_hosts(tmp_path):
  """gpu8 names no card: the estimate alone, judged on an H100 (--card's default), until a
  launch/compile.py record for GPU hosts (h100:8) of the same recipe is in --records; then its
  rows stand beside the estimate."""
  out = tmp_path / "estimate.json"
  proc = _plan("--config=configs/lychee.py:sft,0.5b,gpu8", f"--records={tmp_path}",
               f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  assert "no TPU slice or GPU card named: estimate only, judged on h100 (79.1 GiB, JAX's " \
         "default pool 75%; --card for another; --compile=h100:8 compiles it)" in proc.stdout
  lines = [l for l in proc.stdout.splitlines() if l.startswith("  train_step")]
  assert len(lines) == 1 and lines[0].endswith("(estimate) fits")
  estimates = {r["program"]: r["estimate"]["total_gib"] for r in json.load(open(out))}
  # Evaluation placed as compile.py places it on an H100 (JAX's pool): the 0.5B copy whole.
  weights = {r["eval_weights"] for r in json.load(open(out))}
  assert weights == {"replicated"}
  # A record as compile.py writes it, each program allocating twice its estimate.
  rows = [{"program": name, "allocation_gib": 2 * gib, "held_gib": 0.0, "total_gib": 3 * gib}
          for name, gib in estimates.items()]
  (tmp_path / "sft_h100.json").write_text(json.dumps({
      "config": "configs/lychee.py:sft,0.5b,gpu8", "overrides": [], "topology": "h100:8",
      "eval_weights": "replicated",
      "hbm_gib_per_device": 79.1, "jax": "0.12.0.1", "compiler": "jax-cuda12-plugin 0.12.0.1",
      "eval_batch": 16, "eval_modes": ["gate", "stream"], "rows": rows}))
  proc = _plan("--config=configs/lychee.py:sft,0.5b,gpu8", f"--records={tmp_path}",
               f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  assert "[h100:8, compiler record (jax 0.12.0.1, jax-cuda12-plugin 0.12.0.1)]" in proc.stdout
  assert {r["program"]: r["ratio"] for r in json.load(open(out))} == {
      name: pytest.approx(0.5) for name in estimates}
  # A later record of one program under other evaluation weights does not replace the
  # recipe's whole one (it had: the plan then showed that program alone).
  one = next(iter(estimates))
  (tmp_path / "sft_h100_sharded_eval.json").write_text(json.dumps({
      "config": "configs/lychee.py:sft,0.5b,gpu8", "overrides": [], "topology": "h100:8",
      "eval_weights": "sharded", "programs": [one], "hbm_gib_per_device": 79.1,
      "eval_batch": 16, "eval_modes": ["gate", "stream"],
      "rows": [r for r in rows if r["program"] == one]}))
  os.utime(tmp_path / "sft_h100_sharded_eval.json", (2e9, 2e9))  # written after
  proc = _plan("--config=configs/lychee.py:sft,0.5b,gpu8", f"--records={tmp_path}",
               f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  assert {r["program"] for r in json.load(open(out))} == set(estimates)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/lychee.py:rl,0.5b,v5p-64", "--config.mesh.fsdp=4"],
     "does not cover the 32 devices of v5p:2x4x4"),
    (["--config=configs/lychee.py:rl,0.5b,gpu8", "--compile=h100:4"],
     "does not cover the 4 devices of h100:4"),
    (["--config=configs/tiny.py:sft", "--compile=v9x:2x2"], "--compile: unknown TPU generation"),
    (["--config=configs/lychee.py:rl,0.5b,gpu8", "--compile=recipe"], "names no TPU slice"),
    (["--all", "--records=/nonexistent"], "no launch/compile.py records in /nonexistent"),
    (["--config=configs/lychee.py:rl,0.5b,gpu8", "--gpu_target_config=h100.txtpb"],
     "--gpu_target_config goes with --compile for GPU hosts"),
    (["--all", "--model=tiny"], "give one of --config, --all or --model"),
    (["--config=configs/tiny.py:sft"], "the recipe names no TPU slice, so -1 (every device) has "
                                       "no size to take: give the sizes (e.g. --config.mesh.fsdp"),
])
def test_bad_input_is_one_line(args, message):
  proc = _plan(*args)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("plan.py: error:") and message in err[0], proc.stderr
