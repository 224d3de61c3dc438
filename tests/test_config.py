"""ModelConfig validation and the configs/ files."""

import pytest

from configs import models
from memrecall.models.config import ConfigError, ModelConfig


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-0.5b", "qwen2.5-7b"])
def test_model_configs_build(name):
  config = ModelConfig.from_dict(models.get_config(name).model.to_dict())
  assert config.num_heads % config.num_kv_heads == 0


def test_7b_shapes_match_the_design():
  c = ModelConfig.from_dict(models.get_config("qwen2.5-7b").model.to_dict())
  assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
          c.head_dim, c.vocab_size) == (28, 3584, 18944, 28, 4, 128, 152064)
  assert not c.tie_word_embeddings and c.rope_theta == 1e6


@pytest.mark.parametrize("change,message", [
    (dict(num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(attention="flash"), "attention must be one of"),
    (dict(dtype="float8"), "unknown dtype"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(remat="some"), "remat must be one of"),
])
def test_bad_configs_name_the_problem(change, message):
  base = models.get_config("tiny").model.to_dict()
  base.update(change)
  with pytest.raises(ConfigError, match=message):
    ModelConfig.from_dict(base)


def test_unknown_keys_and_unknown_model_are_refused():
  with pytest.raises(ConfigError, match="unknown model config keys"):
    ModelConfig.from_dict({**models.get_config("tiny").model.to_dict(), "n_layer": 3})
  with pytest.raises(ValueError, match="unknown model"):
    models.get_config("gpt2")


def test_hf_config_round_trip_and_rope_parameters():
  config = ModelConfig.from_dict(models.get_config("qwen2.5-0.5b").model.to_dict())
  assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
  hf = config.to_hf_dict()
  del hf["rope_theta"]
  hf["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}  # transformers >= 5
  assert ModelConfig.from_hf_dict(hf).rope_theta == 5e5
  with pytest.raises(ConfigError, match="lacks required Qwen2 keys"):
    ModelConfig.from_hf_dict({"hidden_size": 8})


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 32768}}, "scales RoPE \\('yarn'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "scales RoPE \\('linear'"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "dynamic"}}, "scales RoPE"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'")])
def test_hf_configs_the_model_does_not_implement_are_refused(change, message):
  """Qwen2 variants that would load and run with other outputs (YaRN for long context, a
  sliding window, another activation) are refused by name, not read past."""
  hf = ModelConfig.from_dict(models.get_config("qwen2.5-0.5b").model.to_dict()).to_hf_dict()
  ModelConfig.from_hf_dict({**hf, "rope_scaling": None, "rope_parameters": {
      "rope_theta": 1e6, "rope_type": "default"}})  # what Qwen2.5's configs say: accepted
  with pytest.raises(ConfigError, match=message):
    ModelConfig.from_hf_dict({**hf, **change})


def test_special_ids_outside_the_vocabulary_are_refused():
  """A pad or EOS id past the embedding table would embed as NaN (JAX's lookup) and spread
  from a masked slot into every real token of its row: refused when the config is made."""
  small = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
               num_kv_heads=1, head_dim=4)
  ModelConfig(**small, pad_token_id=15, eos_token_ids=(14,))
  for bad in (dict(pad_token_id=16), dict(eos_token_ids=(3, 16)), dict(pad_token_id=-1)):
    with pytest.raises(ConfigError, match="outside the vocabulary"):
      ModelConfig(**small, **bad)

