"""HF checkpoint import/export: layouts, exact round trips and clear errors on bad input."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from tests.conftest import FIXTURES, LYCHEE_TEXT
from memrecall.models import hf_checkpoint
from memrecall.models.config import ConfigError
from memrecall.models.safetensors_io import SafetensorsFile, iter_checkpoint_files, save_file


def _copy(src, dst):
  shutil.copytree(os.path.join(FIXTURES, src), dst)
  return dst


def _tensors(directory):
  return {n: np.array(f.get(n)) for n, f in iter_checkpoint_files(directory)}


def _rewrite(directory, edit):
  """Applies edit(dict of tensors) to a single-file checkpoint."""
  path = os.path.join(directory, "model.safetensors")
  tensors = {n: np.array(v) for n, v in _tensors(directory).items()}
  edit(tensors)
  save_file(tensors, path)


def test_single_and_sharded_checkpoints_load_identically(tiny_dir):
  single, config = hf_checkpoint.load_hf_checkpoint(tiny_dir)
  sharded, config2 = hf_checkpoint.load_hf_checkpoint(os.path.join(FIXTURES, "qwen2_tiny_sharded"))
  assert config == config2
  assert config.rope_theta == 1e4 and config.eos_token_ids == (2,) and config.num_kv_heads == 2
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("source", ["qwen2_tiny", "qwen2_tiny_tied"])
@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 60_000])
def test_export_then_import_is_bit_exact(tmp_path, source, max_shard_bytes):
  params, config = hf_checkpoint.load_hf_checkpoint(os.path.join(FIXTURES, source))
  hf_checkpoint.save_hf_checkpoint(params, config, tmp_path, max_shard_bytes=max_shard_bytes)
  files = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert (len(files) > 1) == (max_shard_bytes < 1 << 30)
  assert os.path.exists(tmp_path / "model.safetensors.index.json") == (len(files) > 1)
  # The exported tensors are the original HF tensors, bit for bit.
  original = _tensors(os.path.join(FIXTURES, source))
  exported = _tensors(tmp_path)
  assert set(original) == set(exported)
  for name in original:
    np.testing.assert_array_equal(original[name], exported[name])
  again, config2 = hf_checkpoint.load_hf_checkpoint(tmp_path)
  assert config2 == config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_round_trip(tmp_path, tiny_dir):
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir, param_dtype="bfloat16")
  hf_checkpoint.save_hf_checkpoint(params, config, tmp_path)
  assert SafetensorsFile(tmp_path / "model.safetensors").get("model.norm.weight").dtype == ml_dtypes.bfloat16
  again, _ = hf_checkpoint.load_hf_checkpoint(tmp_path)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_reader_agrees_with_the_safetensors_package(tmp_path, tiny_dir):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  reference = safetensors_numpy.load_file(os.path.join(tiny_dir, "model.safetensors"))
  ours = SafetensorsFile(os.path.join(tiny_dir, "model.safetensors"))
  assert sorted(reference) == sorted(ours.names())
  for name, value in reference.items():
    np.testing.assert_array_equal(ours.get(name), value)
  # And the package reads what we write.
  save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64)},
            tmp_path / "x.safetensors")
  back = safetensors_numpy.load_file(str(tmp_path / "x.safetensors"))
  np.testing.assert_array_equal(back["a"], np.arange(6).reshape(2, 3))


def test_missing_tensor_is_named(tmp_path):
  d = _copy("qwen2_tiny", tmp_path / "ckpt")
  _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"missing tensors model\.layers\.1\.self_attn\.k_proj\.bias"):
    hf_checkpoint.load_hf_checkpoint(d)


def test_wrong_shape_is_named(tmp_path):
  d = _copy("qwen2_tiny", tmp_path / "ckpt")

  def shrink(t):
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100]
  _rewrite(d, shrink)
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"model\.layers\.0\.mlp\.up_proj\.weight has shape \(100, 64\), "
                           r"expected \(128, 64\)"):
    hf_checkpoint.load_hf_checkpoint(d)


def test_unexpected_tensor_is_named(tmp_path):
  d = _copy("qwen2_tiny", tmp_path / "ckpt")
  _rewrite(d, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)}))
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"1 unexpected tensor \(a different architecture or config\?\): "
                           r"model\.layers\.2"):
    hf_checkpoint.load_hf_checkpoint(d)


def test_a_lycheememory_checkpoints_backbone_loads_without_its_compressor():
  """generate.py loads a checkpoint's backbone alone (compressor=False): a LycheeMemory
  checkpoint's beacon tensors had been "unexpected"; the backbone is the full load's."""
  hf = os.path.join(LYCHEE_TEXT, "hf")
  full, config = hf_checkpoint.load_hf_checkpoint(hf)
  backbone, backbone_config = hf_checkpoint.load_hf_checkpoint(hf, compressor=False)
  assert config.compressor and not backbone_config.compressor
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x)
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  whole, part = flat(full), flat(backbone)
  assert set(part) < set(whole) and not any("beacon" in name for name in part)
  for name, value in part.items():
    np.testing.assert_array_equal(value, whole[name], err_msg=name)


def test_heads_not_divisible_by_kv_heads(tmp_path):
  d = _copy("qwen2_tiny", tmp_path / "ckpt")
  cfg = json.load(open(d / "config.json"))
  cfg["num_key_value_heads"] = 3
  json.dump(cfg, open(d / "config.json", "w"))
  with pytest.raises(ConfigError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"):
    hf_checkpoint.load_hf_checkpoint(d)


def test_directory_without_config_json(tmp_path):
  d = _copy("qwen2_tiny", tmp_path / "ckpt")
  os.remove(d / "config.json")
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    hf_checkpoint.load_hf_checkpoint(d)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_checkpoint.load_hf_checkpoint(tmp_path / "nowhere")


def test_generation_config_adds_its_stop_tokens(tmp_path):
  """transformers' generate stops at generation_config.json's EOS ids too (Qwen2.5-Instruct:
  <|im_end|> and <|endoftext|>); so does every loop here, config.json's first; a broken file is
  named."""
  d = _copy("qwen2_tiny", tmp_path / "ckpt")
  first, _ = hf_checkpoint.read_config(d)
  extra = (first.eos_token_ids[0] + 1) % first.vocab_size
  (d / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": [first.eos_token_ids[0], extra]}))
  config, _ = hf_checkpoint.read_config(d)
  assert config.eos_token_ids == first.eos_token_ids + (extra,)
  assert config.pad_token_id == first.pad_token_id
  assert hf_checkpoint.read_config(d, eos_token_ids=(3,))[0].eos_token_ids == (3,)  # as asked
  (d / "generation_config.json").write_text("{")
  with pytest.raises(ConfigError, match="generation_config.json is not valid JSON"):
    hf_checkpoint.read_config(d)


def test_directory_without_weights_and_broken_index(tmp_path):
  d = _copy("qwen2_tiny", tmp_path / "ckpt")
  os.remove(d / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
    hf_checkpoint.load_hf_checkpoint(d)
  s = _copy("qwen2_tiny_sharded", tmp_path / "sharded")
  os.remove(s / "model-00002-of-00005.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00005.safetensors"):
    hf_checkpoint.load_hf_checkpoint(s)


def test_truncated_safetensors_file(tmp_path):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(b"\x10\x00")
  with pytest.raises(ValueError, match="too short"):
    SafetensorsFile(path)
  path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
  with pytest.raises(ValueError, match="exceeds the file size"):
    SafetensorsFile(path)


def test_lychee_checkpoint_exports_to_its_own_layout(tmp_path, lychee_dir):
  from memrecall.method import compressor
  params, config = hf_checkpoint.load_hf_checkpoint(lychee_dir, gate_lora_rank=2)
  _, raw = hf_checkpoint.read_config(lychee_dir)
  settings = compressor.CompressorConfig.from_hf_dict(raw, chunk_size=1024)
  hf_checkpoint.save_hf_checkpoint(params, config, tmp_path, extra_config=settings.to_hf_dict())
  original, exported = _tensors(lychee_dir), _tensors(tmp_path)
  # lychee_memory_* and similarity_head included; beside them, the gate's adapters, which a
  # LycheeMemory checkpoint does not have, under memrecall's names.
  lora = {n for n in exported if ".gate_lora_" in n}
  assert set(original) == set(exported) - lora
  assert len(lora) == 2 * len(config.gate_lora_targets) * config.num_layers
  for name in original:
    np.testing.assert_array_equal(original[name], exported[name])
  _, raw_again = hf_checkpoint.read_config(tmp_path)
  assert compressor.CompressorConfig.from_hf_dict(raw_again, chunk_size=1024) == settings
  # Every setting memrecall implements is written out, as the reference's own config has it.
  for key in ("lychee_memory_window", "lychee_memory_stride", "lychee_memory_ratio",
              *compressor.SUPPORTED_HF_VALUES):
    assert compressor._normalised(raw_again[key]) == compressor._normalised(raw[key]), key
  again, config_again = hf_checkpoint.load_hf_checkpoint(tmp_path, gate_lora_rank=2)
  assert config_again.compressor
  for path in (("beacon_embedding",), ("gate_head",), ("layers", "attention", "beacon_v_bias")):
    a, b = params, again
    for key in path:
      a, b = a[key], b[key]
    np.testing.assert_array_equal(a, b)


def test_export_writes_each_shard_before_fetching_the_next_parameters(tmp_path, tiny_dir,
                                                                      monkeypatch):
  """The host never holds the whole model: shard k is on disk (and dropped) before the
  parameters of later shards are fetched."""
  params, config = hf_checkpoint.load_hf_checkpoint(tiny_dir)
  events = []
  fetch, save = hf_checkpoint._host, hf_checkpoint.save_file
  monkeypatch.setattr(hf_checkpoint, "_host", lambda leaf: events.append("fetch") or fetch(leaf))
  monkeypatch.setattr(hf_checkpoint, "save_file",
                      lambda *a, **k: events.append("save") or save(*a, **k))
  hf_checkpoint.save_hf_checkpoint(params, config, tmp_path, max_shard_bytes=60_000)
  saves = [i for i, e in enumerate(events) if e == "save"]
  assert len(saves) > 2 and saves[0] < events.index("fetch", saves[0]) < saves[-1]
  assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []  # no partials left
  again, _ = hf_checkpoint.load_hf_checkpoint(tmp_path)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_checkpoint_written_by_the_safetensors_library_loads_bit_exactly(tmp_path, tiny_dir):
  """As the released 7B is stored: bf16 tensors written by torch (or safetensors' numpy API)."""
  import ml_dtypes
  original = _tensors(tiny_dir)
  rng = np.random.default_rng(0)
  bf16 = {k: (v + rng.normal(0, 1e-2, v.shape)).astype(ml_dtypes.bfloat16)
          for k, v in original.items()}
  try:
    import torch
    from safetensors.torch import save_file as library_save
    library_save({k: torch.from_numpy(v.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
                  for k, v in bf16.items()}, str(tmp_path / "model.safetensors"))
  except ImportError:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file(bf16, str(tmp_path / "model.safetensors"))
  values = json.load(open(os.path.join(tiny_dir, "config.json")))
  values["torch_dtype"] = "bfloat16"
  json.dump(values, open(tmp_path / "config.json", "w"))
  params, config = hf_checkpoint.load_hf_checkpoint(tmp_path)
  assert config.param_dtype == "bfloat16"
  np.testing.assert_array_equal(
      np.asarray(params["embedding"]).view(np.uint16),
      bf16["model.embed_tokens.weight"].view(np.uint16))
  np.testing.assert_array_equal(  # [out, in] -> [in, out] for each stacked layer
      np.asarray(params["layers"]["mlp"]["down_kernel"][1]).view(np.uint16),
      bf16["model.layers.1.mlp.down_proj.weight"].T.view(np.uint16))


@pytest.mark.parametrize("key,value", [
    ("lychee_memory_attn", "step-expansion"), ("lychee_memory_pos", "append"),
    ("lychee_memory_attend_prev", False), ("lychee_memory_sink_size", 4),
    ("lychee_memory_parallel_window", 2), ("lychee_memory_param", ["q", "k", "v", "o"])])
def test_unsupported_lycheememory_settings_are_refused(key, value):
  from memrecall.method.compressor import CompressorConfig
  from memrecall.models.config import ConfigError
  ok = {"lychee_memory_window": 512, "lychee_memory_stride": 512, "lychee_memory_ratio": [4],
        "lychee_memory_attn": "full-coverage", "lychee_memory_pos": "interleave",
        "lychee_memory_attend_prev": True, "lychee_memory_sink_size": 0,
        "lychee_memory_parallel_window": 1, "lychee_memory_param": ["v", "q", "k"]}
  assert CompressorConfig.from_hf_dict(ok).window == 512
  with pytest.raises(ConfigError, match=f"{key}=.*supported: "):
    CompressorConfig.from_hf_dict({**ok, key: value})
