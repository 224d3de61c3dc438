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


def rotate_rows(mat, positions, theta):
  """rotate() applied to every row of mat [T, D] at positions [T]."""
  return np.stack([rotate(row, p, theta) for row, p in zip(mat, positions)])


def compress_chunk(weights, hf_config, ids, mask, window, ratio, raw_logits=False):
  """Beacon compression of one chunk, window by window, in the interleaved layout.

  Returns per layer (keys, values) of the beacons, pre-RoPE: [C/r, kv_heads, D]; with
  raw_logits, also the LM head's logits [C, V] at the raw tokens (the compressor's
  pre-training objective reads them).
  """
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  n_heads = hf_config["num_attention_heads"]
  n_kv = hf_config["num_key_value_heads"]
  d = hf_config["hidden_size"] // n_heads
  eps, theta = hf_config["rms_norm_eps"], hf_config["rope_theta"]
  n_layers = hf_config["num_hidden_layers"]
  kept = [([], []) for _ in range(n_layers)]  # beacon keys/values of earlier windows
  logits = []
  for start in range(0, len(ids), window):
    rows, valid, is_beacon = [], [], []
    for i in range(window):
      rows.append(w["model.embed_tokens.weight"][ids[start + i]])
      valid.append(bool(mask[start + i]))
      is_beacon.append(False)
      if (i + 1) % ratio == 0:
        rows.append(w["model.lychee_memory_embed_tokens.weight"][0])
        valid.append(True)
        is_beacon.append(True)
    x = np.stack(rows)
    prefix = sum(len(k) for k in kept[0][0])
    key_valid = [True] * prefix + valid
    positions = np.maximum(np.cumsum(key_valid) - 1, 0)
    own_pos = positions[prefix:]
    for layer in range(n_layers):
      p = f"model.layers.{layer}."
      h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
      proj = {}
      for name in "qkv":
        ordinary = h @ w[p + f"self_attn.{name}_proj.weight"].T + w[p + f"self_attn.{name}_proj.bias"]
        beacon = (h @ w[p + f"self_attn.lychee_memory_{name}_proj.weight"].T
                  + w[p + f"self_attn.lychee_memory_{name}_proj.bias"])
        proj[name] = np.where(np.array(is_beacon)[:, None], beacon, ordinary)
      q = proj["q"].reshape(len(rows), n_heads, d)
      k = proj["k"].reshape(len(rows), n_kv, d)
      v = proj["v"].reshape(len(rows), n_kv, d)
      prev_k = np.concatenate(kept[layer][0]) if kept[layer][0] else np.zeros((0, n_kv, d))
      prev_v = np.concatenate(kept[layer][1]) if kept[layer][1] else np.zeros((0, n_kv, d))
      all_k, all_v = np.concatenate([prev_k, k]), np.concatenate([prev_v, v])
      out = np.zeros((len(rows), n_heads, d))
      for head in range(n_heads):
        kvh = head // (n_heads // n_kv)
        keys = rotate_rows(all_k[:, kvh], positions, theta)
        for t in range(len(rows)):
          qt = rotate(q[t, head], own_pos[t], theta)
          allowed = [s for s in range(prefix + t + 1) if key_valid[s]]
          scores = np.array([qt @ keys[s] for s in allowed]) / np.sqrt(d)
          probs = np.exp(scores - scores.max())
          probs /= probs.sum()
          out[t, head] = sum(pr * all_v[s, kvh] for pr, s in zip(probs, allowed))
      x = x + out.reshape(len(rows), -1) @ w[p + "self_attn.o_proj.weight"].T
      h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
      gate = h @ w[p + "mlp.gate_proj.weight"].T
      x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ \
          w[p + "mlp.down_proj.weight"].T
      beacon_rows = np.array(is_beacon)
      kept[layer][0].append(k[beacon_rows])
      kept[layer][1].append(v[beacon_rows])
    raw = rms_norm(x[~np.array(is_beacon)], w["model.norm.weight"], eps)
    logits.append(raw @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T)
  beacons = [(np.concatenate(kk), np.concatenate(vv)) for kk, vv in kept]
  return (beacons, np.concatenate(logits)) if raw_logits else beacons
