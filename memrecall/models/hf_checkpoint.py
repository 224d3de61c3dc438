"""Import and export of Hugging Face Qwen2 checkpoints (config.json + safetensors).

Import reads tensor by tensor from memory-mapped files and builds every
parameter with `jax.make_array_from_callback`, so each device receives only
its own shard and the host never holds the whole model twice: the peak host
overhead is one layer's tensor.  Export writes the same layout back, sharded
into files of bounded size with an index.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from memrecall.models.config import ConfigError, ModelConfig, dtype_from_name
from memrecall.models.qwen2 import Qwen2, abstract_params
from memrecall.models.safetensors_io import SafetensorsFile, iter_checkpoint_files, save_file
from memrecall.runtime import sharding as sharding_lib


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: missing, unexpected or misshapen tensors."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """How one memrecall parameter corresponds to HF tensors.

  path:       the parameter's path in the memrecall tree.
  hf_name:    the HF tensor name; `{i}` is the layer index for stacked params.
  linear_in:  for a PyTorch Linear weight ([out, in]), how many leading dims of
              the memrecall kernel form the input; None for tensors stored as is.
  """
  path: tuple[str, ...]
  hf_name: str
  linear_in: int | None = None
  # Read instead when hf_name is absent (a plain Qwen2 checkpoint given a
  # compressor): the tensor, and optionally one row of it.
  fallback: str | None = None
  fallback_row: int | None = None
  # The HF tensor has an extra leading dim of 1 (a Linear(hidden -> 1)).
  hf_leading_one: bool = False
  # A missing tensor leaves the parameter at its initial value.
  optional: bool = False

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf_name

  def to_ours(self, hf: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if self.linear_in is None:
      return hf.reshape(shape)
    return hf.T.reshape(shape)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    if self.hf_leading_one:
      return ours.reshape((1,) + ours.shape)
    if self.linear_in is None:
      return ours.reshape(-1) if ours.ndim > 1 and self.hf_name.endswith(".bias") else ours
    return ours.reshape(math.prod(ours.shape[:self.linear_in]), -1).T


def qwen2_rules(config: ModelConfig) -> list[TensorRule]:
  """The HF name of every parameter of a Qwen2 model with this config."""
  layer = "model.layers.{i}."
  rules = [TensorRule(("embedding",), "model.embed_tokens.weight"),
           TensorRule(("final_norm", "scale"), "model.norm.weight")]
  if not config.tie_word_embeddings:
    rules.append(TensorRule(("lm_head",), "lm_head.weight", linear_in=1))
  rules += [
      TensorRule(("layers", "input_norm", "scale"), layer + "input_layernorm.weight"),
      TensorRule(("layers", "post_attention_norm", "scale"), layer + "post_attention_layernorm.weight"),
      TensorRule(("layers", "attention", "o_kernel"), layer + "self_attn.o_proj.weight", linear_in=2),
      TensorRule(("layers", "mlp", "gate_kernel"), layer + "mlp.gate_proj.weight", linear_in=1),
      TensorRule(("layers", "mlp", "up_kernel"), layer + "mlp.up_proj.weight", linear_in=1),
      TensorRule(("layers", "mlp", "down_kernel"), layer + "mlp.down_proj.weight", linear_in=1),
  ]
  for p in "qkv":
    rules += [TensorRule(("layers", "attention", f"{p}_kernel"), layer + f"self_attn.{p}_proj.weight",
                         linear_in=1),
              TensorRule(("layers", "attention", f"{p}_bias"), layer + f"self_attn.{p}_proj.bias")]
  if config.compressor:
    # LycheeMemory's names; absent from a plain Qwen2 checkpoint, where the
    # beacon projections start as copies of q/k/v and the beacon embedding as
    # the EOS embedding (as the released code initialises them).
    eos = config.eos_token_ids[0] if config.eos_token_ids else 0
    rules.append(TensorRule(("beacon_embedding",), "model.lychee_memory_embed_tokens.weight",
                            fallback="model.embed_tokens.weight", fallback_row=eos))
    for p in "qkv":
      for kind, linear_in in (("weight", 1), ("bias", None)):
        rules.append(TensorRule(
            ("layers", "attention", f"beacon_{p}_{'kernel' if kind == 'weight' else 'bias'}"),
            layer + f"self_attn.lychee_memory_{p}_proj.{kind}", linear_in=linear_in,
            fallback=layer + f"self_attn.{p}_proj.{kind}"))
  if config.has_gate:
    # The relevance head, under LycheeMemory's name, and the gate's LoRA adapters under ours
    # (each as a PyTorch Linear: A [rank, in], B [out, rank]); a checkpoint without them gets
    # fresh ones.
    rules += [TensorRule(("gate_head",), "similarity_head.weight", hf_leading_one=True, optional=True),
              TensorRule(("gate_bias",), "similarity_head.bias", hf_leading_one=True, optional=True)]
    for target in config.gate_lora_targets:
      attention = target in ("q", "k", "v", "o")
      block, module = ("attention", "self_attn") if attention else ("mlp", "mlp")
      inputs = 2 if target == "o" else 1  # o's input is [heads, head_dim]
      for factor, linear_in in (("a", inputs), ("b", 1)):
        rules.append(TensorRule(("layers", block, f"{target}_lora_{factor}"),
                                layer + f"{module}.{target}_proj{_GATE_LORA_MARK}"
                                f"{factor.upper()}.weight", linear_in=linear_in, optional=True))
  return rules


# Tensors that HF checkpoints may carry and that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Tensors of parts that a config may leave out (the gate's relevance head).
_OPTIONAL_PREFIXES = ("similarity_head.",)
_BEACON_MARK = "lychee_memory_"  # the compressor's tensors: beacon embedding and projections
_GATE_LORA_MARK = ".gate_lora_"  # the gate's adapters (memrecall's exports)


def _resolve_fallback(rule: TensorRule, tensors: Mapping[str, Any]) -> TensorRule:
  """Swaps a rule whose tensor is absent for its fallback source, when it has one."""
  if rule.fallback is None or rule.hf_name.format(i=0) in tensors:
    return dataclasses.replace(rule, fallback=None, fallback_row=None)
  return dataclasses.replace(rule, hf_name=rule.fallback, fallback=None)


def _get_path(tree: Mapping, path: Sequence[str]):
  for key in path:
    tree = tree[key]
  return tree


def _set_path(tree: dict, path: Sequence[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def read_config(directory: str | os.PathLike, **overrides) -> tuple[ModelConfig, dict]:
  """The ModelConfig of a HF checkpoint directory, and its raw config.json."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
  with open(path, encoding="utf-8") as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from None
  model_type = hf.get("model_type")
  if model_type not in (None, "qwen2", "lychee_memory", "lycheememory"):
    raise ConfigError(f"{path}: model_type {model_type!r} is not a Qwen2 model")
  config = ModelConfig.from_hf_dict(hf, **overrides)
  if "eos_token_ids" not in overrides:
    # Generation stops where transformers' `generate` does: generation_config.json's EOS ids
    # too (Qwen2.5-Instruct's adds <|endoftext|> to config.json's <|im_end|>).
    stops = _generation_eos(directory)
    more = tuple(i for i in stops if i not in config.eos_token_ids)
    if more:
      config = config.replace(eos_token_ids=config.eos_token_ids + more)
  return config, hf


def _generation_eos(directory: str) -> tuple[int, ...]:
  """generation_config.json's `eos_token_id` (an id or a list), () without one."""
  path = os.path.join(directory, "generation_config.json")
  if not os.path.exists(path):
    return ()
  with open(path, encoding="utf-8") as f:
    try:
      eos = json.load(f).get("eos_token_id")
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from None
  return () if eos is None else tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))


def load_hf_checkpoint(directory: str | os.PathLike, *, mesh=None,
                       rules_fn: Callable[[ModelConfig], list[TensorRule]] = qwen2_rules,
                       **config_overrides) -> tuple[Any, ModelConfig]:
  """Loads a HF Qwen2 checkpoint as (params, config).

  Args:
    directory: holds config.json and model.safetensors, or several
      `*.safetensors` files with `model.safetensors.index.json`.
    mesh: when given, every parameter is placed straight onto its sharding from
      the logical-axis rules; otherwise onto the default device.
    rules_fn: maps a config to its tensor rules (extended by the compressor).
    **config_overrides: ModelConfig fields to replace, e.g. `param_dtype="bfloat16"`.
  """
  config, _ = read_config(directory, **config_overrides)
  tensors = dict(iter_checkpoint_files(directory))
  rules = [_resolve_fallback(rule, tensors) for rule in rules_fn(config)]
  rules = [r for r in rules if not (r.optional and r.hf_name.format(i=0) not in tensors)]
  expected = {rule.hf_name.format(i=i) for rule in rules
              for i in (range(config.num_layers) if rule.stacked else [0])}
  missing = sorted(expected - set(tensors))
  if missing:
    raise CheckpointError(f"{directory}: missing tensors {_summarise(missing)}")
  ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
  if not config.has_gate:  # a gate's tensors, read without it (--gate_lora_rank=0)
    ignorable |= {n for n in tensors if n.startswith(_OPTIONAL_PREFIXES) or _GATE_LORA_MARK in n}
  if not config.compressor:  # the backbone of a LycheeMemory checkpoint (e.g. to generate)
    ignorable |= {n for n in tensors if _BEACON_MARK in n}
  unexpected = sorted(n for n in set(tensors) - expected
                      if n not in ignorable and not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise CheckpointError(f"{directory}: {len(unexpected)} unexpected tensor"
                          f"{'s' if len(unexpected) > 1 else ''} (a different architecture or "
                          f"config?): {_summarise(unexpected)}")

  abstract = abstract_params(config)
  dtype = dtype_from_name(config.param_dtype)
  if mesh is None:
    default = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: default, abstract,
                             is_leaf=lambda x: isinstance(x, nn.Partitioned))
  else:
    shardings = sharding_lib.param_shardings(abstract, mesh)
  params: dict = {}
  for rule in rules:
    leaf = _get_path(abstract, rule.path)
    shape = tuple(leaf.value.shape if isinstance(leaf, nn.Partitioned) else leaf.shape)
    layer_shape = shape[1:] if rule.stacked else shape
    for i in range(config.num_layers if rule.stacked else 1):
      name = rule.hf_name.format(i=i)
      got = tensors[name].shape(name)
      if rule.fallback_row is not None:
        got = (1,) + got[1:]
      want = _hf_shape(rule, layer_shape)
      if got != want:
        raise CheckpointError(f"{directory}: tensor {name} has shape {got}, expected {want} "
                              "for this config")
    array = jax.make_array_from_callback(
        shape, _get_path(shardings, rule.path), _reader(rule, tensors, layer_shape, dtype, config.num_layers))
    _set_path(params, rule.path, array)
  return _init_missing(params, abstract, shardings, config), config


def _init_missing(params: dict, abstract, shardings, config: ModelConfig) -> dict:
  """Initialises the parameters no tensor provided (e.g. the gate's adapters), only those."""
  flat_abstract = flax.traverse_util.flatten_dict(abstract)
  loaded = flax.traverse_util.flatten_dict(params)
  missing = [path for path in flat_abstract if path not in loaded]
  if not missing:
    return params
  flat_shardings = flax.traverse_util.flatten_dict(shardings)
  model = Qwen2(config)

  def init_missing(rng):
    variables = model.init(rng, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                           jnp.ones((1, 1, 1, 1), bool))
    flat = flax.traverse_util.flatten_dict(nn.unbox(variables["params"]))
    return {path: flat[path] for path in missing}  # the rest is dead code to XLA

  fresh = jax.jit(init_missing, out_shardings={p: flat_shardings[p] for p in missing})(
      jax.random.key(0))
  return flax.traverse_util.unflatten_dict({**loaded, **fresh})


def _hf_shape(rule: TensorRule, layer_shape: Sequence[int]) -> tuple[int, ...]:
  return tuple(rule.to_hf(np.empty(layer_shape, np.int8)).shape)


def _reader(rule: TensorRule, tensors: Mapping[str, SafetensorsFile], layer_shape, dtype,
            num_layers: int):
  """A callback producing any slice of a parameter, reading only the layers it spans."""
  def read_layer(i: int) -> np.ndarray:
    name = rule.hf_name.format(i=i)
    tensor = tensors[name].get(name)
    if rule.fallback_row is not None:
      tensor = tensor[rule.fallback_row:rule.fallback_row + 1]
    return rule.to_ours(tensor, layer_shape)

  def callback(index: tuple[slice, ...]) -> np.ndarray:
    if not rule.stacked:
      return np.asarray(read_layer(0)[index], dtype=dtype)
    layers = range(*index[0].indices(num_layers))
    return np.stack([np.asarray(read_layer(i)[index[1:]], dtype=dtype) for i in layers])
  return callback


def _summarise(names: Sequence[str], limit: int = 8) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _host(leaf) -> np.ndarray:
  """One parameter on the host (gathered from its shards)."""
  return np.asarray(jax.device_get(leaf))


def save_hf_checkpoint(params, config: ModelConfig, directory: str | os.PathLike, *,
                       max_shard_bytes: int = 4 << 30,
                       rules_fn: Callable[[ModelConfig], list[TensorRule]] = qwen2_rules,
                       extra_config: Mapping[str, Any] | None = None) -> None:
  """Writes params in the HF layout: config.json, safetensors shards and their index.

  Tensors are fetched one parameter at a time and each shard is written (under a temporary
  name) and freed as soon as it is full, so the host holds at most one stacked parameter plus
  one shard; the shards get their final `-of-N` names once N is known.
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  for leftover in os.listdir(directory):  # of an export that was killed
    if leftover.startswith(".shard-") and leftover.endswith(".partial"):
      os.remove(os.path.join(directory, leftover))
  metadata = {"format": "pt"}
  written: list[tuple[str, list[str], int]] = []  # (temporary file, tensor names, bytes)
  shard: dict[str, np.ndarray] = {}
  size = 0

  def flush():
    nonlocal shard, size
    path = os.path.join(directory, f".shard-{len(written) + 1:05d}.safetensors.partial")
    save_file(shard, path, metadata)
    written.append((path, list(shard), size))
    shard, size = {}, 0

  for rule in rules_fn(config):
    value = _host(_get_path(params, rule.path))
    for i in range(config.num_layers if rule.stacked else 1):
      tensor = np.ascontiguousarray(rule.to_hf(value[i] if rule.stacked else value))
      if size and size + tensor.nbytes > max_shard_bytes:
        flush()
      shard[rule.hf_name.format(i=i)] = tensor
      size += tensor.nbytes
    del value
  flush()
  # Remove files of an earlier export so that the directory stays consistent.
  for stale in os.listdir(directory):
    if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
      os.remove(os.path.join(directory, stale))
  if len(written) == 1:
    os.replace(written[0][0], os.path.join(directory, "model.safetensors"))
  else:
    weight_map, total = {}, 0
    for k, (path, names, nbytes) in enumerate(written):
      filename = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
      os.replace(path, os.path.join(directory, filename))
      weight_map.update({name: filename for name in names})
      total += nbytes
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  hf_config = config.to_hf_dict()
  hf_config.update(extra_config or {})
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2)


