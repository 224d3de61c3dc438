"""The benchmark scripts run end to end (their numbers are read by people, not asserted)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import FAST_CPU_COMPILE, xla_defaults_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The scripts' numbers are not asserted, so they compile as the rest of the suite does (most of
# XLA's CPU optimisation off): bench_recall.py's and bench.py's tests took 52 against 80 s
# with it off (2026-12-05).
ENV = {**xla_defaults_env(), **FAST_CPU_COMPILE}


def test_bench_recall_runs_and_reports(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench_recall.py"),
                         "--chunks=8", "--chunk_size=64", "--memory_size=4", "--repeats=1",
                         f"--output_json={out}"], capture_output=True, text=True, env=ENV,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "ratio 1/8 : all" in proc.stdout and "streaming 64x : 1x" in proc.stdout
  result = json.load(open(out))
  assert result["blocks"] == 8 and result["seconds_all"] > 0
  assert set(result["streaming_bytes"]) == {"1", "64"}
  # What the streaming loop holds while it runs does not grow with the document; a device
  # bank (its compression included) does.
  temporaries = result["streaming_temporaries"]
  assert temporaries["64"] <= 1.1 * temporaries["1"]
  assert result["bank_bytes"]["64"] > 2 * result["bank_bytes"]["1"]


def test_bench_runs_on_the_tiny_model_and_writes_rows(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"),
                         "--lengths=512,2048", "--questions=2", "--memory_size=4", "--repeats=1",
                         "--chunk_size=128", "--modes=gate,gate_stream,memagent",
                         f"--output_json={out}"], capture_output=True, text=True, env=ENV,
                        timeout=600)
  # (`all` too runs in tests/test_device_check.py's smoke; memagent is the speed-ups' reference.)
  assert proc.returncode == 0, proc.stderr
  rows = json.load(open(out))
  assert {(r["mode"], r["context_tokens"]) for r in rows} == {
      (m, t) for m in ("gate", "gate_stream", "memagent") for t in (512, 2048)}
  for r in rows:
    assert set(r) == {"mode", "context_tokens", "compress_s", "gate_s", "reason_s", "total_s",
                      "peak_bytes", "read_fraction", "floor_s", "floor_ratio",
                      "compress_efficiency"}
    # round(0.1 * N) chunks of the gated modes' N (at least one), all of the others'.
    n = r["context_tokens"] // 128
    assert r["read_fraction"] == (max(1, round(0.1 * n)) / n if "gate" in r["mode"] else 1.0)
    assert r["total_s"] > 0 and r["floor_s"] > 0
    assert r["floor_ratio"] == pytest.approx(r["total_s"] / r["floor_s"])
    assert (r["compress_efficiency"] is None) == (r["mode"] == "memagent")
  gate = {r["context_tokens"]: r for r in rows if r["mode"] == "gate"}
  assert all(r["gate_s"] > 0 and r["compress_s"] > 0 for r in gate.values())
  # The device bank grows with the context; the streaming loop holds one group at a time.
  stream = {r["context_tokens"]: r["peak_bytes"] for r in rows if r["mode"] == "gate_stream"}
  assert gate[2048]["peak_bytes"] > 1.5 * gate[512]["peak_bytes"]
  assert stream[2048] <= 1.1 * stream[512]
  assert all(k in proc.stdout for k in ("speed-up", "mem ratio", "x floor", "floor speed-up"))
  machine = json.load(open(tmp_path / "bench_machine.json"))
  assert machine["ceilings"]["matmul_flops"] > 0 and machine["decode_floor_fraction"] > 0
  assert "of the floor" in proc.stdout and "of the matmul ceiling" in proc.stdout


def test_profile_decode_times_each_batch_against_its_floor(tmp_path):
  out = tmp_path / "profile.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "profile_decode.py"),
                         "--model=tiny", "--batches=1,3", "--steps=4", "--cache_tokens=16",
                         "--repeats=1", "--variants=scanned", f"--output_json={out}"],
                        capture_output=True, text=True, env=ENV, timeout=600)
  assert proc.returncode == 0, proc.stderr
  rows = json.load(open(out))["rows"]
  assert [(r["variant"], r["batch"]) for r in rows] == [
      ("per_layer", 1), ("scanned", 1), ("per_layer", 3), ("scanned", 3)]
  for r in rows:
    # The floor is the step's bytes (weights less the embedding table, plus the filled cache)
    # at the measured read bandwidth, so a bigger batch has a bigger floor.
    assert r["ms_per_step"] > 0 and r["floor_fraction"] == pytest.approx(
        r["floor_ms"] / r["ms_per_step"])
  assert rows[2]["floor_ms"] > rows[0]["floor_ms"]
  assert "of the floor" in proc.stdout


def test_best_time_runs_a_jitted_program_only_the_timed_times():
  """A jitted program is compiled ahead of time, not run untimed first (at 7B shapes that run
  is minutes); static arguments may be passed positionally; anything else is warmed up once."""
  import functools
  import jax
  import jax.numpy as jnp
  from memrecall.evaluate import timing
  runs = []

  @functools.partial(jax.jit, static_argnames=("scale",))
  def program(x, scale, y):
    jax.debug.callback(lambda: runs.append(1))
    return x * scale + y

  x = jnp.ones((4, 4))
  assert timing.best_time(program, 1, x, 2.0, x) > 0
  assert len(runs) == 1
  seconds, planned = timing.time_compiled(program, 3, x, 3.0, x)
  assert seconds > 0 and len(runs) == 4
  assert planned == timing.compiled_bytes(program, x, 3.0, x)
  compiled, call = timing.compile_ahead(program, x, 5.0, x)
  np.testing.assert_array_equal(call(), 6 * np.ones((4, 4)))
  assert len(runs) == 5
  timing.best_time(lambda: program(x, 2.0, x), 2)  # plain Python: one untimed call first
  assert len(runs) == 8


def test_planned_bytes_beyond_the_weights_count_the_weights_a_program_reads_not():
  """XLA leaves an unread weight out of a program's arguments: the bytes beyond the weights
  are the temporaries, outputs and other arguments, not the total less every weight (which
  had come out lower by the unread weight, 1.59 GB of a 7B compression)."""
  import jax
  import jax.numpy as jnp
  from memrecall.evaluate import timing
  params = {"read": jnp.ones((64, 64)), "unread": jnp.ones((512, 512))}
  x = jnp.ones((8, 64))
  program = jax.jit(lambda params, x: jnp.tanh(x @ params["read"]) @ params["read"])
  compiled = program.lower(params, x).compile()
  stats = compiled.memory_analysis()
  assert stats.argument_size_in_bytes == params["read"].nbytes + x.nbytes  # "unread" dropped
  beyond = stats.temp_size_in_bytes + stats.output_size_in_bytes + x.nbytes
  assert timing.planned_bytes(compiled, (params, x), weights=params) == beyond
  _, planned = timing.time_compiled(program, 1, params, x, weights=params)
  assert planned == beyond


def test_compression_flops_by_hand():
  from memrecall.evaluate import benchmark
  from memrecall.method.compressor import CompressorConfig
  from memrecall.models.config import ModelConfig
  config = ModelConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=4)
  compressor = CompressorConfig(chunk_size=16, window=8, ratio=4)
  # Per layer and row: q,k,v (8*(2+2)*4=128) + o (2*4*8=64) + MLP (3*8*16=384) = 576 MACs.
  # Rows per window 8 + 2 = 10, 2 windows, 3 chunks, through the first of the 2 layers.
  dense = 2 * 576 * 1 * 10 * 2 * 3
  # Attention: 4 * rows * keys * heads * head_dim per layer; keys = prefix + rows / 2.
  attention = sum(4 * 10 * (w * 2 + 5) * 2 * 4 * 1 for w in range(2)) * 3
  # The last layer: only the 2 beacons' keys and values (8 * 2 * 1 * 4 = 64 MACs a row) are
  # the memory; XLA computes nothing else of it.
  last = 2 * 64 * 2 * 2 * 3
  assert benchmark.compression_flops(config, compressor, 3) == dense + attention + last
  one_layer = config.replace(num_layers=1)  # the beacons' keys and values alone
  assert benchmark.compression_flops(one_layer, compressor, 3) == last


def test_decode_rate_and_ceilings_run_on_cpu():
  import jax
  from memrecall.evaluate import benchmark
  from memrecall.models import qwen2 as model
  from memrecall.models.config import ModelConfig
  config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8)
  params = model.init_params(config, jax.random.key(0))
  rate = benchmark.decode_rate(params, config, cache_tokens=8, steps=4, repeats=1)
  assert rate["seconds_per_token"] > 0
  assert rate["bytes_per_token"] == (benchmark.step_weight_bytes(params, config)
                                     + benchmark.cache_bytes(config, 8 + 4 / 2))
  assert rate["prefill_s"] > 0 and rate["prefill_flops"] > 0
  # A step at batch 3 reads the weights once and three rows' caches.
  batched = benchmark.decode_rate(params, config, cache_tokens=8, steps=4, repeats=1, batch=3)
  weights = benchmark.step_weight_bytes(params, config)
  assert batched["batch"] == 3 and batched["prefill_flops"] == 3 * rate["prefill_flops"]
  cache = rate["bytes_per_token"] - weights
  assert batched["bytes_per_token"] - weights == pytest.approx(3 * cache)
  ceilings = benchmark.measure_ceilings(matmul_size=64, read_bytes=2**20, repeats=1)
  assert ceilings.matmul_flops > 0 and ceilings.read_bytes > 0
  assert ceilings.seconds(ceilings.matmul_flops, ceilings.read_bytes) == 2.0


def test_a_generation_step_reads_the_plain_forwards_weights_by_hand():
  """Not the beacon projections or the gate's LoRA, and of an untied embedding table none."""
  import dataclasses
  import jax
  from memrecall.evaluate import benchmark
  from memrecall.models import qwen2 as model
  from memrecall.models.config import ModelConfig
  plain = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8)
  # q, k, v with biases (16*16 + 2*16*8 + 16 + 2*8), o (16*16), MLP (3*16*32), two layer
  # norms and the final one (3*16), the LM head (16*64): 4 bytes each.
  expected = 4 * (256 + 256 + 16 + 16 + 256 + 1536 + 48 + 1024)
  for config in (plain, dataclasses.replace(plain, compressor=True, gate_lora_rank=4),
                 dataclasses.replace(plain, tie_word_embeddings=True)):
    params = model.init_params(config, jax.random.key(0))
    for layout in ((params, config), model.unstack_layers(params, config)):
      assert benchmark.step_weight_bytes(*layout) == expected, config
  params = model.init_params(plain, jax.random.key(0))
  assert benchmark.param_bytes(params) == expected + 4 * 64 * 16  # + the embedding table


def test_gate_steps_follow_the_grouped_loop_by_hand():
  import numpy as np
  from memrecall.evaluate import benchmark
  picks = np.zeros((2, 12), bool)
  picks[0, [0, 10]] = True
  # Row 0, groups of 4: [0-3] reads 0 -> 1; [1-4] none -> 5; [5-8] none -> 9; [9-12] reads 10
  # -> 11; [11] none -> done: 5 steps.  Row 1 reads nothing: 3 steps; the loop runs the longer.
  assert benchmark.gate_steps(picks, 4) == 5
  assert benchmark.gate_steps(picks[1:], 4) == 3


def test_generation_floor_by_hand():
  from memrecall.evaluate import benchmark
  from memrecall.models.config import ModelConfig
  config = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=4)
  ceilings = benchmark.Ceilings(matmul_flops=1.0, read_bytes=1.0)  # seconds = FLOPs + bytes
  # 576 MACs per row (see above) -> 1152 FLOPs; attention 4 * keys * 2 heads * 4 = 32 * keys;
  # LM head 2 * 8 * 10 = 160 per logit row.  Prefill: 3 rows over 5 + 1.5 keys, one logit row.
  prefill = 3 * (1152 + 32 * 6.5) + 160 + 100  # + the weights' 100 bytes
  # One decode step (2 new tokens: the first from the prefill): 1 row over 5 + 3 + 1 = 9 keys,
  # weights + 9 cached slots x 2 (k, v) x 1 head x 4 x 4 bytes.
  decode = 1152 + 32 * 9 + 160 + 100 + 9 * 2 * 4 * 4
  floor = benchmark.generation_floor(config, ceilings, weight_bytes=100, batch=1, prompt=3,
                                     prefix=5, new_tokens=2)
  assert floor == pytest.approx(prefill + decode)


def test_memagent_floor_counts_the_sections_it_reads():
  """memagent's floor is one update per raw section it runs (picks [B, sections]), whatever
  the compressed modes' chunk count."""
  from memrecall.evaluate import benchmark
  from memrecall.method import prompts, reasoner, recall
  from memrecall.models import sampling, tokenizer
  from memrecall.method.compressor import CompressorConfig
  from memrecall.models.config import ModelConfig
  config = ModelConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=8, compressor=True)
  chat = prompts.Prompts.build(tokenizer.ByteTokenizer(), chat_template="")
  setup = recall.RecallSetup(config, chat, reasoner.ReasonerConfig(memory_size=4, answer_tokens=2),
                             recall.RecallConfig(mode="gate"), sampling.SamplingConfig())
  ceilings = benchmark.Ceilings(matmul_flops=1e9, read_bytes=1e9)
  floor = lambda sections: benchmark.mode_floor(
      "memagent", config, CompressorConfig(chunk_size=16, window=8, ratio=4), setup, ceilings,
      1e6, np.ones((2, sections), bool), memagent_chunk=32, question=3)
  update = benchmark.generation_floor(
      config, ceilings, 1e6, 2, chat.memagent.length(3, setup.memory_capacity, 32), 0, 4)
  assert floor(8) - floor(4) == pytest.approx(4 * update)


def test_benchmark_settings_and_modes_out_of_range_are_refused_by_name():
  """A zero once ran as the default (`value or default`), divided by zero or timed nothing."""
  from memrecall.evaluate import benchmark
  with pytest.raises(ValueError, match=r"range: questions=0, repeats=0, .*selected_fraction"):
    benchmark.BenchSettings(lengths=[512], questions=0, repeats=0, selected_fraction=0.0)
  with pytest.raises(ValueError, match=r"lengths=\[512, -1\]"):
    benchmark.BenchSettings(lengths=[512, -1])
  modes = benchmark.mode_names()
  assert {"gate", "gate_stream", "all", "memagent"} <= set(modes) and "memagent_stream" not in modes
  with pytest.raises(ValueError, match=r"unknown benchmark mode 'fast'; choose from .*gate_st"):
    benchmark.mode_reader("fast", None, None, None)
