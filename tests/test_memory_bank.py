"""Memory banks round-trip exactly and refuse to serve another model or setting."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memrecall import run_builder
from memrecall.method import compressor, memory_bank
from tests.conftest import Loaded


@pytest.fixture(scope="module")
def compressed(lychee_model, lychee_reference):
  ids, mask = compressor.chunk_document(lychee_reference["in/text_ids"][0], 1024, pad_id=0)
  memory = compressor.compress(lychee_model.params, lychee_model.run.model, lychee_model.run.compressor,
                               jnp.asarray(ids), jnp.asarray(mask))
  meta = memory_bank.describe(lychee_model.params, lychee_model.run.model, lychee_model.run.compressor,
                              memory, int(mask.sum()))
  return memory, meta


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_exact(tmp_path, compressed, dtype):
  memory, meta = compressed
  memory = jax.tree.map(lambda x: x.astype(dtype) if x.dtype != bool else x, memory)
  meta = dataclasses.replace(meta, dtype=str(memory.k.dtype))
  memory_bank.save_bank(tmp_path / "bank", memory, meta)
  bank, loaded_meta = memory_bank.load_bank(tmp_path / "bank", meta)
  assert loaded_meta == meta and meta.num_chunks == 3 and meta.num_tokens == 2748
  assert bank.k.dtype == memory.k.dtype
  np.testing.assert_array_equal(bank.k[:, :, 0], np.moveaxis(np.asarray(memory.k), 1, 0))
  np.testing.assert_array_equal(bank.v[:, :, 0], np.moveaxis(np.asarray(memory.v), 1, 0))
  np.testing.assert_array_equal(bank.slot_mask[:, 0], memory.slot_mask)
  assert bank.chunk_valid.all()


def test_mismatched_banks_are_refused(tmp_path, compressed, tiny_dir):
  memory, meta = compressed
  memory_bank.save_bank(tmp_path / "bank", memory, meta)
  with pytest.raises(memory_bank.BankMismatchError, match="chunk_size: bank has 1024, expected 2048"):
    memory_bank.load_bank(tmp_path / "bank", dataclasses.replace(meta, chunk_size=2048))
  with pytest.raises(memory_bank.BankMismatchError, match="ratio"):
    memory_bank.load_bank(tmp_path / "bank", dataclasses.replace(meta, ratio=8))
  other = Loaded(*run_builder.load_hf_checkpoint(tiny_dir, chunk_size=1024,
                                                 matmul_precision="highest"))
  other_meta = dataclasses.replace(
      meta, model_fingerprint=memory_bank.model_fingerprint(other.params, other.run.model))
  with pytest.raises(memory_bank.BankMismatchError, match="model_fingerprint"):
    memory_bank.load_bank(tmp_path / "bank", other_meta)
  with pytest.raises(FileNotFoundError, match="not a memory bank"):
    memory_bank.load_bank(tmp_path)


def test_fingerprint_tracks_every_parameter_that_shapes_compressed_memory(lychee_model):
  """One element changed anywhere the compressor reads (any layer, not only the first) makes
  another fingerprint; the output head, final norm and gate do not."""
  import flax.traverse_util
  params, config = lychee_model.params, lychee_model.run.model
  base = memory_bank.model_fingerprint(params, config)
  assert base == memory_bank.model_fingerprint(params, config)
  flat = flax.traverse_util.flatten_dict(params)

  def nudged(path):
    x = np.array(flat[path])
    index = (x.shape[0] - 1,) + (0,) * (x.ndim - 1) if x.ndim else ()  # a stacked one's last layer
    x[index] += 1e-3
    return memory_bank.model_fingerprint(
        flax.traverse_util.unflatten_dict({**flat, path: jnp.asarray(x)}), config)

  # Named here, not by the module's predicate: the head, final norm, gate head and bias, LoRA.
  not_read = lambda p: (p[0] in ("lm_head", "final_norm", "gate_head", "gate_bias")
                        or "_lora_" in p[-1])
  memory_paths = [p for p in flat if not not_read(p)]
  assert len(memory_paths) > 10  # beacon and ordinary projections, MLPs, norms, embeddings
  # Every MLP projection, the gate projection too (a substring test on "gate_" once left it out).
  assert {("layers", "mlp", f"{k}_kernel") for k in ("gate", "up", "down")} <= set(memory_paths)
  for path in memory_paths:
    assert nudged(path) != base, path
  for path in [p for p in flat if p not in memory_paths]:
    assert nudged(path) == base, path
  # Nor do the gate's settings: a bank made with a gate serves the same model without one.
  assert config.has_gate
  gate = lambda p: p[0] in ("gate_head", "gate_bias") or "_lora_" in p[-1]
  without_gate = flax.traverse_util.unflatten_dict({p: v for p, v in flat.items() if not gate(p)})
  assert memory_bank.model_fingerprint(without_gate, config.replace(gate_lora_rank=0)) == base
  assert memory_bank.model_fingerprint(params, config.replace(gate_lora_rank=8)) == base


def test_saving_over_a_bank_replaces_it_whole(tmp_path, compressed):
  memory, meta = compressed
  memory_bank.save_bank(tmp_path / "bank", memory, meta)
  two = jax.tree.map(lambda x: x[:, :2] if x.ndim == 5 else x[:2], memory)
  memory_bank.save_bank(tmp_path / "bank", two, dataclasses.replace(meta, num_chunks=2))
  bank, loaded = memory_bank.load_bank(tmp_path / "bank")
  assert bank.num_blocks == 2 and loaded.num_chunks == 2
  assert sorted(os.listdir(tmp_path)) == ["bank"]  # no staging directories left behind
  json.load(open(tmp_path / "bank" / "metadata.json"))


def test_a_replacement_that_fails_leaves_the_old_bank(tmp_path, compressed, monkeypatch):
  """The old bank is moved aside, not deleted, until the new one is in place: a failure at
  that last move (an interrupt, a full disk) leaves the old bank whole."""
  memory, meta = compressed
  memory_bank.save_bank(tmp_path / "bank", memory, meta)
  real = os.replace

  def failing(src, dst):
    if os.path.basename(src).startswith(".bank-") and dst == str(tmp_path / "bank"):
      raise OSError("disk full")
    return real(src, dst)

  monkeypatch.setattr(memory_bank.os, "replace", failing)
  two = jax.tree.map(lambda x: x[:, :2] if x.ndim == 5 else x[:2], memory)
  with pytest.raises(OSError, match="disk full"):
    memory_bank.save_bank(tmp_path / "bank", two, dataclasses.replace(meta, num_chunks=2))
  monkeypatch.undo()
  bank, loaded = memory_bank.load_bank(tmp_path / "bank", meta)
  assert loaded.num_chunks == 3 and bank.num_blocks == 3
  assert sorted(os.listdir(tmp_path)) == ["bank"]
  with pytest.raises(FileExistsError, match="not a memory bank's"):  # nor a stranger's files
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    memory_bank.save_bank(tmp_path / "notes", memory, meta)
  assert (tmp_path / "notes" / "a.txt").read_text() == "mine"
