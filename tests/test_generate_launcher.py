"""launch/generate.py end to end, as a user runs it."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from memrecall.models import hf_checkpoint, sampling
from tests import forked_launchers
from tests.conftest import xla_defaults_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags):
  return forked_launchers.run(os.path.join(ROOT, "launch", "generate.py"), flags,
                             xla_defaults_env())


@pytest.mark.parametrize("flags, settings, seed", [
    ((), {}, 0),
    (("--temperature=0.8", "--top_k=20", "--top_p=0.9", "--seed=3"),
     {"temperature": 0.8, "top_k": 20, "top_p": 0.9}, 3)], ids=["greedy", "sampled"])
def test_ids_equal_the_library(tmp_path, tiny_dir, flags, settings, seed):
  """The launcher's ids are the library's with the same settings and key (sampled: its
  --temperature, --top_k, --top_p and --seed all reach the sampler)."""
  out = tmp_path / "out.json"
  proc = _run(f"--hf_checkpoint={tiny_dir}", "--prompt_ids=5,6,7,8", "--max_new_tokens=12",
              f"--output_json={out}", *flags)
  assert proc.returncode == 0, proc.stderr
  result = json.load(open(out))
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir)
  expected = sampling.generate(params, config, np.asarray([[5, 6, 7, 8]]), None,
                               jax.random.key(seed), max_new_tokens=12,
                               sampling=sampling.SamplingConfig(eos_ids=config.eos_token_ids,
                                                                **settings))
  n = int(expected.lengths[0])
  assert result["ids"] == expected.tokens[0, :n].tolist()
  assert isinstance(result["text"], str) and len(result["logprobs"]) == n


def test_text_prompt_with_sampling_on_a_random_tiny_model(tmp_path):
  out = tmp_path / "out.json"
  proc = _run("--model=tiny", "--prompt=hello there", "--temperature=0.8", "--top_k=20",
              "--top_p=0.9", "--seed=3", "--max_new_tokens=6", f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  assert 1 <= len(json.load(open(out))["ids"]) <= 6


def test_usage_errors_are_clear(tiny_dir, tmp_path):
  proc = _run(f"--hf_checkpoint={tiny_dir}")
  assert proc.returncode != 0 and "exactly one of --prompt and --prompt_ids" in proc.stderr
  proc = _run(f"--hf_checkpoint={tiny_dir}", "--prompt_ids=1,999")
  assert proc.returncode != 0 and "outside the vocabulary" in proc.stderr
  proc = _run(f"--hf_checkpoint={tmp_path}", "--prompt_ids=1")
  assert proc.returncode != 0 and "has no config.json" in proc.stderr


def test_logs_are_quiet_by_default():
  """No backend probes (`Unable to initialize backend 'tpu'`) or other library logs: the
  result alone, unless --verbose."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "MEMRECALL_VERBOSE")}
  command = [sys.executable, os.path.join(ROOT, "launch", "generate.py"), "--prompt_ids=5,6",
             "--max_new_tokens=2"]
  proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  assert len(proc.stdout.strip().splitlines()) == 1


def test_generates_from_a_training_workdir(tmp_path):
  """--checkpoint=WORKDIR: the run's latest weights, tokenizer and settings, as answer.py's;
  a run trained on more devices than this process has (2 here, against the launcher's 1) is
  read onto its devices instead, and says so."""
  from memrecall import run_builder
  from memrecall.train import trainer
  from tests.train.conftest import small_config
  config = small_config("sft", steps=1)
  config.mesh.fsdp = 2
  trainer.train(config, str(tmp_path / "run"), log=lambda *a: None)
  out = tmp_path / "out.json"
  proc = _run(f"--checkpoint={tmp_path / 'run'}", "--prompt_ids=5,6,7", "--max_new_tokens=4",
              f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  assert "the run's mesh does not fit this process" in proc.stderr
  run, params = run_builder.from_workdir(str(tmp_path / "run"))
  expected = sampling.generate(params, run.model, np.asarray([[5, 6, 7]]), None,
                               jax.random.key(0), max_new_tokens=4,
                               sampling=sampling.SamplingConfig(eos_ids=run.model.eos_token_ids,
                                                                pad_id=run.model.pad_token_id))
  n = int(expected.lengths[0])
  result = json.load(open(out))
  assert result["prompt_ids"] == [5, 6, 7] and result["ids"] == expected.tokens[0, :n].tolist()
  proc = _run(f"--checkpoint={tmp_path / 'run'}", "--model=tiny", "--prompt_ids=5")
  assert proc.returncode != 0 and "--checkpoint brings its own" in proc.stderr
