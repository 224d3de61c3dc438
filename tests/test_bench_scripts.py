"""The benchmark scripts run end to end (their numbers are read by people, not asserted)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_recall_runs_and_reports(tmp_path):
  out = tmp_path / "bench.json"
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench_recall.py"),
                         "--chunks=8", "--chunk_size=64", "--memory_size=4", "--repeats=1",
                         f"--output_json={out}"], capture_output=True, text=True, env=env,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "ratio 1/8 : all" in proc.stdout and "streaming 64x : 1x" in proc.stdout
  result = json.load(open(out))
  assert result["blocks"] == 8 and result["seconds_all"] > 0
  assert set(result["streaming_bytes"]) == {"1", "64"}


def test_bench_runs_on_the_tiny_model_and_writes_rows(tmp_path):
  out = tmp_path / "bench.json"
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"),
                         "--lengths=512,1024", "--questions=2", "--memory_size=4", "--repeats=1",
                         "--chunk_size=128", f"--output_json={out}"], capture_output=True,
                        text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr
  rows = json.load(open(out))
  assert {(r["mode"], r["context_tokens"]) for r in rows} == {
      (m, t) for m in ("gate", "all", "memagent") for t in (512, 1024)}
  for r in rows:
    assert set(r) == {"mode", "context_tokens", "compress_s", "gate_s", "reason_s", "total_s",
                      "peak_bytes"}
    assert r["total_s"] > 0
  gate = {r["context_tokens"]: r for r in rows if r["mode"] == "gate"}
  assert all(r["gate_s"] > 0 and r["compress_s"] > 0 for r in gate.values())
  assert "speed-up" in proc.stdout and "mem ratio" in proc.stdout
