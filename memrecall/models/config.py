"""Model configuration: one frozen dataclass shared by every module.

`ModelConfig` is what the Flax modules read.  It is built from an
`ml_collections.ConfigDict` (the `model` block of a `configs/*.py` file) or
from a Hugging Face `config.json`, and can be written back to the latter.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots")
# "default": the backend's choice (bf16 runs; on NVIDIA GPUs float32 matmuls then run in TF32);
# "highest": full float32 products, wherever float32 results are compared with references.
MATMUL_PRECISIONS = ("default", "high", "highest")
# config.json's keys of a gate memrecall exported (LycheeMemory's released models have none).
GATE_KEY_PREFIX = "memrecall_"
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class ConfigError(ValueError):
  """A configuration that cannot describe a working model."""


def dtype_from_name(name: str) -> Any:
  try:
    return _DTYPES[name]
  except KeyError:
    raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Qwen2-style decoder.

  `param_dtype` is how parameters are stored, `dtype` is what matmuls run in;
  norms, softmax and logits are always computed in float32.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS
  remat: str = "none"  # one of REMAT_POLICIES
  # Training's scans over a document's blocks recompute each block's forward in the backward
  # pass (`jax.checkpoint` on the gate stage's body, `trajectory.blocks_then_answer` on a
  # trajectory's): activation memory is one block's however many blocks,
  # at the price of one more forward per block (with `remat` on, ~25% more step FLOPs: each
  # layer then runs three times).  False keeps every block's residuals instead (memory grows
  # with the number of blocks; `launch/plan.py` estimates it).
  remat_blocks: bool = True
  # The MLP runs over at most this many tokens (rows x positions) at a time
  # (`qwen2.in_token_chunks`): a long prefill's [rows, tokens, intermediate] activation is
  # the largest a recall loop holds.  0: all at once.  Counted over the rows one device
  # holds; decode steps and one-row-a-device turns of up to this many tokens are never split.
  mlp_chunk_tokens: int = 16384
  # Teacher-forced scoring (`trajectory.turn_logprobs`: RL's log-probs, SFT's loss) runs the
  # LM head and its log-softmax over at most this many tokens a device at a time: a [rows, tokens,
  # vocab] float32 block is 0.6 MiB a token at Qwen2.5's 152K vocabulary, the largest
  # array of a reference pass.  Each chunk is recomputed in the backward pass.  0: all at once.
  head_chunk_tokens: int = 2048
  matmul_precision: str = "default"  # one of MATMUL_PRECISIONS, for every dot of the model
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0
  # Whether the parameter tree holds the compressor's beacon embedding and
  # per-layer beacon q/k/v projections (docs/architecture.md#compressor-layout).
  compressor: bool = False
  # The gate (docs/architecture.md#gate): LoRA adapters of this rank on `gate_lora_targets`
  # plus a scalar relevance head; 0 = the tree has no gate parameters.
  gate_lora_rank: int = 0
  gate_lora_alpha: float = 16.0
  gate_lora_targets: tuple[str, ...] = ("q", "k", "v", "o")
  # The parameters' layer layout.  True: every layer's parameters stacked on a leading
  # `layers` axis and run under a scan (checkpoints and training: compile time does not grow
  # with depth).  False: one subtree per layer (`layers_0`, ...) run in an unrolled loop, for
  # inference: inside a decode loop XLA copies a scanned layer's weight slice at every step,
  # where separate arrays are read in place (`qwen2.unstack_layers` converts).
  scan_layers: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
          f"({self.num_kv_heads}) for grouped-query attention")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ConfigError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, "
                        f"got {self.matmul_precision!r}")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    dtype_from_name(self.param_dtype)
    dtype_from_name(self.dtype)
    object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
    outside = [i for i in (self.pad_token_id, *self.eos_token_ids) if not 0 <= i < self.vocab_size]
    if outside:  # an id past the table embeds as NaN, which even a masked pad slot spreads
      raise ConfigError(f"pad_token_id / eos_token_ids {outside} lie outside the vocabulary "
                        f"(vocab_size {self.vocab_size})")
    object.__setattr__(self, "gate_lora_targets", tuple(self.gate_lora_targets))
    unknown = set(self.gate_lora_targets) - set(LORA_TARGETS)
    if unknown:
      raise ConfigError(f"unknown gate_lora_targets {sorted(unknown)}; choose from {LORA_TARGETS}")
    if self.gate_lora_rank < 0:
      raise ConfigError(f"gate_lora_rank must be >= 0, got {self.gate_lora_rank}")
    for name in ("mlp_chunk_tokens", "head_chunk_tokens"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer (0: no chunks), got {value!r}")
    if not isinstance(self.scan_layers, bool):
      raise ConfigError(f"scan_layers must be True or False, got {self.scan_layers!r}")

  @property
  def has_gate(self) -> bool:
    return self.gate_lora_rank > 0

  @property
  def precision(self) -> str | None:
    """The `precision=` of every dot: None leaves it to `jax_default_matmul_precision`."""
    return None if self.matmul_precision == "default" else self.matmul_precision

  @property
  def jnp_dtype(self):
    return dtype_from_name(self.dtype)

  @property
  def jnp_param_dtype(self):
    return dtype_from_name(self.param_dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # --- construction -------------------------------------------------------

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a mapping (e.g. `config.model.to_dict()`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(names)}")
    values = dict(values)
    for key in ("eos_token_ids", "gate_lora_targets"):
      if values.get(key) is not None:
        values[key] = tuple(values[key])
    return cls(**values)

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """Reads the fields of a Hugging Face Qwen2 `config.json`."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ConfigError(f"config.json lacks required Qwen2 keys {missing}")
    _refuse_unsupported(hf)
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    if hidden % num_heads and "head_dim" not in hf:
      raise ConfigError(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({num_heads})")
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    pad = hf.get("pad_token_id")
    # The stored dtype ("torch_dtype" before transformers 5, "dtype" after) is
    # the default for both parameters and compute.
    stored = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    stored = stored if stored in _DTYPES else "float32"
    values = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads", num_heads)),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get(
            "rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0),
        param_dtype=stored,
        dtype=stored,
        compressor=any(k.startswith("lychee_memory_") for k in hf),
    )
    # A gate exported by memrecall (`to_hf_dict`): its adapters' settings, under our names.
    for key in ("gate_lora_rank", "gate_lora_alpha", "gate_lora_targets"):
      if GATE_KEY_PREFIX + key in hf:
        values[key] = hf[GATE_KEY_PREFIX + key]
    values.update(overrides)
    return cls(**values)

  @classmethod
  def from_hf_file(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_hf_dict(json.load(f), **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """The Hugging Face `config.json` describing this model."""
    eos = list(self.eos_token_ids)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.param_dtype,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "max_position_embeddings": 32768,
        **({"lychee_memory_param": ["q", "k", "v"]} if self.compressor else {}),
        **({GATE_KEY_PREFIX + "gate_lora_rank": self.gate_lora_rank,
            GATE_KEY_PREFIX + "gate_lora_alpha": self.gate_lora_alpha,
            GATE_KEY_PREFIX + "gate_lora_targets": list(self.gate_lora_targets)}
           if self.has_gate else {}),
    }


def _refuse_unsupported(hf: Mapping[str, Any]) -> None:
  """Qwen2 settings this model does not implement, refused rather than read past: a checkpoint
  that scales RoPE (YaRN, linear, dynamic: long-context variants), attends in a sliding window
  or uses another activation would load and run, and give other outputs."""
  scaling = hf.get("rope_scaling") or {}
  kind = scaling.get("rope_type") or scaling.get("type") or (
      hf.get("rope_parameters") or {}).get("rope_type") or "default"
  if kind != "default":
    raise ConfigError(f"config.json scales RoPE ({kind!r}: rope_scaling={hf.get('rope_scaling')}, "
                      f"rope_parameters={hf.get('rope_parameters')}); memrecall implements plain "
                      "RoPE (rope_theta) only: use the checkpoint's config without it")
  if hf.get("use_sliding_window"):
    raise ConfigError("config.json sets use_sliding_window: memrecall's Qwen2 attends to every "
                      "earlier token in every layer (set it false, as Qwen2.5's configs do)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"config.json's hidden_act is {hf['hidden_act']!r}; Qwen2's MLP is SiLU")
