"""Model shapes: `--config configs/models.py:NAME` with NAME tiny, mid or qwen2.5-{0.5b,1.5b,3b,7b}.

Each returns a ConfigDict whose `model` block is read by
`memrecall.models.config.ModelConfig.from_dict`.
"""

import ml_collections

_MODELS = {
    # A CPU-sized model for tests and the demo; vocab leaves room for the byte
    # tokenizer (259 ids) and task tokens.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=10_000.0, tie_word_embeddings=False,
                 param_dtype="float32", dtype="float32", bos_token_id=1, eos_token_ids=(2,),
                 pad_token_id=0),
    # A CPU benchmark shape (113 MB of f32 weights: decode reads far more than the caches hold).
    "mid": dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                num_kv_heads=2, head_dim=64, rope_theta=10_000.0, tie_word_embeddings=False,
                param_dtype="float32", dtype="float32", bos_token_id=1, eos_token_ids=(2,),
                pad_token_id=0),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1_000_000.0,
                         tie_word_embeddings=True, param_dtype="bfloat16", dtype="bfloat16",
                         bos_token_id=151643, eos_token_ids=(151645, 151643), pad_token_id=151643),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1_000_000.0,
                         tie_word_embeddings=True, param_dtype="bfloat16", dtype="bfloat16",
                         bos_token_id=151643, eos_token_ids=(151645, 151643), pad_token_id=151643),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                       num_heads=16, num_kv_heads=2, head_dim=128, rope_theta=1_000_000.0,
                       tie_word_embeddings=True, param_dtype="bfloat16", dtype="bfloat16",
                       bos_token_id=151643, eos_token_ids=(151645, 151643), pad_token_id=151643),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                       num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0,
                       tie_word_embeddings=False, param_dtype="bfloat16", dtype="bfloat16",
                       bos_token_id=151643, eos_token_ids=(151645, 151643), pad_token_id=151643),
}


def model_config(name: str) -> ml_collections.ConfigDict:
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(_MODELS)}")
  values = dict(rms_norm_eps=1e-6, attention="auto", remat="none", remat_blocks=True,
                matmul_precision="default", mlp_chunk_tokens=16384, head_chunk_tokens=2048,
                **_MODELS[name])
  return ml_collections.ConfigDict(values)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_name = arg
  config.model = model_config(arg)
  return config
