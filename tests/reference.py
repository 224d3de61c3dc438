"""An independent float64 numpy Qwen2 forward over HF-named weights, written with plain loops.

It shares no code with memrecall: it reads PyTorch-layout tensors (Linear
weights [out, in]) by their Hugging Face names and follows the published
architecture step by step, one head and one query position at a time.
"""

import numpy as np


def rms_norm(x, weight, eps):
  return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate(vec, position, theta):
  """Rotary embedding of one head vector [D] at an integer position (half-split pairs)."""
  d = vec.shape[-1]
  half = d // 2
  out = np.empty_like(vec)
  for j in range(half):
    angle = position / theta ** (2 * j / d)
    c, s = np.cos(angle), np.sin(angle)
    out[j] = vec[j] * c - vec[j + half] * s
    out[j + half] = vec[j + half] * c + vec[j] * s
  return out


def forward(weights, hf_config, tokens, mask):
  """Logits [B, T, V] (float64) for tokens [B, T] with validity mask [B, T]."""
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  n_layers = hf_config["num_hidden_layers"]
  n_heads = hf_config["num_attention_heads"]
  n_kv = hf_config["num_key_value_heads"]
  hidden = hf_config["hidden_size"]
  d = hf_config.get("head_dim") or hidden // n_heads
  eps = hf_config["rms_norm_eps"]
  theta = hf_config.get("rope_theta") or hf_config["rope_parameters"]["rope_theta"]
  batch, length = tokens.shape
  logits = []
  for b in range(batch):
    valid = mask[b].astype(bool)
    positions = np.maximum(np.cumsum(valid) - 1, 0)
    x = w["model.embed_tokens.weight"][tokens[b]]  # [T, E]
    for layer in range(n_layers):
      p = f"model.layers.{layer}."
      h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
      q = h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]
      k = h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]
      v = h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]
      q, k, v = q.reshape(length, n_heads, d), k.reshape(length, n_kv, d), v.reshape(length, n_kv, d)
      attn = np.zeros((length, n_heads, d))
      for head in range(n_heads):
        kv_head = head // (n_heads // n_kv)
        for t in range(length):
          if not valid[t]:
            continue
          qt = rotate(q[t, head], positions[t], theta)
          keys = [s for s in range(t + 1) if valid[s]]
          scores = np.array([qt @ rotate(k[s, kv_head], positions[s], theta) for s in keys]) / np.sqrt(d)
          probs = np.exp(scores - scores.max())
          probs /= probs.sum()
          attn[t, head] = sum(pr * v[s, kv_head] for pr, s in zip(probs, keys))
      x = x + attn.reshape(length, n_heads * d) @ w[p + "self_attn.o_proj.weight"].T
      h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
      gate = h @ w[p + "mlp.gate_proj.weight"].T
      up = h @ w[p + "mlp.up_proj.weight"].T
      x = x + ((gate / (1 + np.exp(-gate))) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits.append(x @ head.T)
  return np.stack(logits)
