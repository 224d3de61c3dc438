"""launch/export.py: a trained run as a HF checkpoint that reads back as the same weights, gate
adapters included, in either dtype; an existing export is never replaced."""

import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from memrecall import run_builder
from memrecall.models import hf_checkpoint, qwen2 as model
from memrecall.runtime.checkpoint import Checkpointer
from tests import forked_launchers
from tests.conftest import cpu_env
from tests.train.conftest import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained_looking_workdir(directory) -> dict:
  """A gate run's workdir whose every parameter is random (the adapters' B and the relevance
  head too, which start at zero), so that a lost or swapped tensor shows."""
  config = small_config("gate")
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0), None)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  checkpointer = Checkpointer(str(directory), save_every=1, keep=1, async_save=False)
  checkpointer.save(1, {"params": params, "step": np.int32(1)},
                    json.loads(config.to_json_best_effort()), {"step": 1}, force=True)
  checkpointer.close()
  return flax.traverse_util.flatten_dict(params)


def _export(*flags):
  return forked_launchers.run(os.path.join(ROOT, "launch", "export.py"), flags, cpu_env(),
                             cwd=ROOT, timeout=600)


def test_an_export_reads_back_as_the_runs_weights_gate_included(tmp_path):
  saved = _trained_looking_workdir(tmp_path / "run")
  out = tmp_path / "export32"
  proc = _export(f"--checkpoint={tmp_path / 'run'}", f"--output={out}", "--dtype=float32",
                 "--shard_gib=0.00005")  # ~52 KB shards: several files and an index
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"verified: {len(saved)} parameters read back equal the run's in float32" in proc.stdout
  assert os.path.exists(out / "model.safetensors.index.json")
  hf = json.load(open(out / "config.json"))
  assert hf["memrecall_gate_lora_rank"] == 4 and hf["memrecall_gate_lora_targets"] == ["q", "v"]
  assert hf["lychee_memory_window"] and hf["torch_dtype"] == "float32"
  # Read with no settings given: the compressor and the gate come from config.json.
  params, config = hf_checkpoint.load_hf_checkpoint(out)
  assert config.compressor and config.gate_lora_rank == 4
  got = flax.traverse_util.flatten_dict(params)
  assert set(got) == set(saved)
  for path, value in saved.items():
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=str(path))
  # A run on the byte tokenizer is marked so, and the launchers' run reads it back with it
  # (it has no tokenizer.json to copy).
  assert hf["memrecall_tokenizer"] == "bytes" and not os.path.exists(out / "tokenizer.json")
  assert type(run_builder.from_hf_checkpoint(str(out)).tokenizer).__name__ == "ByteTokenizer"
  # The run's answering settings travel in config.json, and a run read back from the export
  # takes them (a tiny run given the released model's prompts and 1024-token budgets answered
  # nothing); arguments still replace them.
  trained = run_builder.build_run(small_config("gate"))
  back = run_builder.from_hf_checkpoint(str(out))
  assert hf["memrecall_run"] == run_builder.exported_run(trained)
  assert (back.prompts, back.reasoner, back.task, back.form) == (
      trained.prompts, trained.reasoner, trained.task, trained.form)
  assert back.compressor.chunk_size == trained.compressor.chunk_size
  assert back.config.gate.threshold == trained.config.gate.threshold
  assert run_builder.from_hf_checkpoint(str(out), memory_size=7).reasoner.memory_size == 7
  # Without the gate (--gate_lora_rank=0): its tensors are left, the rest reads.
  plain, config = hf_checkpoint.load_hf_checkpoint(out, gate_lora_rank=0)
  assert not config.has_gate and "gate_head" not in plain

  out16 = tmp_path / "export16"
  proc = _export(f"--checkpoint={tmp_path / 'run' / 'checkpoints' / '1'}", f"--output={out16}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  params16, config16 = hf_checkpoint.load_hf_checkpoint(out16)
  assert config16.param_dtype == "bfloat16"
  for path, value in flax.traverse_util.flatten_dict(params16).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(saved[path].astype(jnp.bfloat16)),
                                  err_msg=str(path))

  # An export is never written over.
  before = {name: os.path.getmtime(out16 / name) for name in os.listdir(out16)}
  proc = _export(f"--checkpoint={tmp_path / 'run'}", f"--output={out16}")
  assert proc.returncode == 2 and "is not empty" in proc.stderr, proc.stderr[-2000:]
  assert {name: os.path.getmtime(out16 / name) for name in os.listdir(out16)} == before


def test_a_checkpoint_memrecall_did_not_export_takes_the_released_settings():
  """No `memrecall_run` in config.json (the released LycheeMemory layout): 1024-token budgets,
  two windows a chunk and the released prompts, unless arguments say otherwise."""
  from tests.conftest import LYCHEE_TEXT
  hf = os.path.join(LYCHEE_TEXT, "hf")
  assert "memrecall_run" not in json.load(open(os.path.join(hf, "config.json")))
  run = run_builder.from_hf_checkpoint(hf)
  assert (run.reasoner.memory_size, run.reasoner.answer_tokens, run.question_tokens) == (
      1024, 1024, 1024)
  assert run.compressor.chunk_size == 2 * run.compressor.window and run.task is None
  # Empty templates: the released model's, in the checkpoint's chat template.
  assert run.config.prompts.to_dict() == run_builder.default_config().prompts.to_dict()
  assert run_builder.from_hf_checkpoint(hf, memory_size=16).reasoner.memory_size == 16


def test_an_export_of_a_raw_chunk_reader_reads_back(tmp_path):
  """A MemAgent baseline has no compressor: its sections (configs/memagent.py's 5000 tokens) are
  not compressor chunks, so the export records no chunk size (one made the read-back refuse:
  5000 is no multiple of the two windows a checkpoint without them gets)."""
  config = small_config("sft,default,multihop,memagent")
  config.model.compressor, config.model.gate_lora_rank = False, 0  # as configs/memagent.py
  # Sections of 2064 tokens: not a multiple of the 2048-token window a checkpoint without a
  # window of its own takes at that chunk size.
  config.compressor.update({"chunk_size": 2064, "window": 2064})
  run = run_builder.build_run(config)
  assert not run.model.compressor
  params = model.init_params(run.model, jax.random.key(0), None)
  run_builder.export_hf_checkpoint(run, params, str(tmp_path / "export"))
  record = json.load(open(tmp_path / "export" / "config.json"))["memrecall_run"]
  assert "compressor" not in record and record["reasoner"] == config.reasoner.to_dict()
  back = run_builder.from_hf_checkpoint(str(tmp_path / "export"))
  assert back.reasoner == run.reasoner and back.task == run.task
