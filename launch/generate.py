r"""Generates text with a Qwen2 model: a HF checkpoint, a training workdir, or a random model of a
named shape.

  python launch/generate.py --hf_checkpoint=/path/to/Qwen2.5-0.5B-Instruct \
      --prompt="The capital of France is" --max_new_tokens=16
  python launch/generate.py --checkpoint=/tmp/memrecall_run --prompt_ids=5,6,7
  python launch/generate.py --model=tiny --prompt_ids=5,6,7 --temperature=0.8 --top_p=0.9 \
      --output_json=/tmp/out.json

Prints and writes `{"prompt_ids": [...], "ids": [...], "text": "...", "logprobs": [...]}` to
--output_json (each token's
log-probability at --temperature, before top-k/top-p; greedy: the model's own).  Bad flags, paths,
shapes or meshes are one-line errors before any model is built (--verbose: tracebacks).
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HF_CHECKPOINT = flags.DEFINE_string("hf_checkpoint", None, "HF Qwen2 checkpoint directory (a "
                                     "LycheeMemory one too: its backbone generates).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A memrecall training workdir (its latest "
                                  "checkpoint, tokenizer and settings), or one checkpoint's "
                                  "folder WORKDIR/checkpoints/STEP.")
_MODEL = flags.DEFINE_string("model", "tiny",
                             "Model shape from configs/models.py, randomly initialised "
                             "(only without --hf_checkpoint or --checkpoint).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt token ids, e.g. 1,2,3.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).",
                              lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1] (1 = off).",
                            lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (and init seed for a random model).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"],
                                 "Override the parameter dtype.")
_MESH = flags.DEFINE_string("mesh", None,
                            "Mesh axis sizes, e.g. 'fsdp=4,tensor=2' (default: every device on "
                            "fsdp).")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Where to write the result.")
from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help


def _run(mesh_shape):
  """(run, its weights' loader) of the checkpoint, workdir or random model the flags name, from
  `run_builder` as every launcher builds one: its model, tokenizer, mesh (--mesh; default every
  device on fsdp)."""
  import ml_collections
  from configs import models
  from memrecall import run_builder
  if _CHECKPOINT.value:  # --mesh, or the run's own where it fits this machine's devices
    import jax
    run, params = cli.on_own_devices(
        lambda mesh: run_builder.from_workdir(_CHECKPOINT.value, mesh=mesh),
        len(jax.local_devices()), mesh_shape)
    return run, lambda: params
  dtypes = {"param_dtype": _PARAM_DTYPE.value, "dtype": _PARAM_DTYPE.value} \
      if _PARAM_DTYPE.value else {}
  if _HF_CHECKPOINT.value:
    has_tokenizer = os.path.exists(os.path.join(_HF_CHECKPOINT.value, "tokenizer.json"))
    run = run_builder.from_hf_checkpoint(
        _HF_CHECKPOINT.value, model={"compressor": False, **dtypes}, mesh=mesh_shape,
        tokenizer="" if has_tokenizer else "bytes")
    return run, run.params
  config = ml_collections.ConfigDict({
      "stage": "eval", "model": {**models.model_config(_MODEL.value).to_dict(), **dtypes},
      "init": {"seed": _SEED.value},
      # Unused by generation, read by every run: a compressor and the reasoner's budgets.
      "compressor": {"chunk_size": 256, "window": 128, "ratio": 4},
      "reasoner": {"memory_size": 1, "answer_tokens": _MAX_NEW_TOKENS.value,
                   "question_tokens": 1}})
  if mesh_shape:
    config.mesh = ml_collections.ConfigDict(mesh_shape)
  run = run_builder.build_run(run_builder.with_defaults(config))
  return run, run.params


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from configs import models
  from memrecall.models import sampling
  from memrecall.runtime import sharding

  if (_PROMPT.value is None) == (_PROMPT_IDS.value is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_ids")
  cli.readable("hf_checkpoint", _HF_CHECKPOINT.value)
  cli.readable("checkpoint", _CHECKPOINT.value)
  cli.writable("output_json", _OUTPUT_JSON.value)
  if _PROMPT_IDS.value is not None:
    try:
      ids = [int(i) for i in _PROMPT_IDS.value]
    except ValueError:
      raise app.UsageError(f"--prompt_ids must be integers, got {_PROMPT_IDS.value}") from None
  if _HF_CHECKPOINT.value and _CHECKPOINT.value:
    raise app.UsageError("give at most one of --hf_checkpoint and --checkpoint")
  given = "--hf_checkpoint" if _HF_CHECKPOINT.value else "--checkpoint" if _CHECKPOINT.value else ""
  if given and flags.FLAGS["model"].present:
    raise app.UsageError(f"--model names a random model's shapes; {given} brings its own")
  if _CHECKPOINT.value and _PARAM_DTYPE.value:
    raise app.UsageError("--param_dtype: a training workdir generates in its own dtypes")
  if not given:
    try:  # an unknown name, before anything is built
      models.model_config(_MODEL.value)
    except ValueError as e:
      raise app.UsageError(f"--model: {e}") from None
  mesh_shape = cli.mesh_shape("mesh", _MESH.value)
  try:
    run, load_params = _run(mesh_shape)
  except sharding.MeshError as e:
    raise app.UsageError(f"--mesh={_MESH.value or 'fsdp=-1'}: {e}") from None
  config, tok = run.model, run.tokenizer

  if _PROMPT_IDS.value is None:
    ids = tok.encode(_PROMPT.value)
  if not ids:
    raise app.UsageError("the prompt is empty")
  bad = [i for i in ids if not 0 <= i < config.vocab_size]
  if bad:
    raise app.UsageError(f"prompt ids {bad[:5]} are outside the vocabulary (size {config.vocab_size})")

  try:
    settings = sampling.SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                       top_p=_TOP_P.value, eos_ids=config.eos_token_ids,
                                       pad_id=config.pad_token_id)
  except ValueError as e:  # e.g. --top_p without --temperature
    raise app.UsageError(f"{e} (--temperature, --top_k, --top_p)") from None
  params = load_params()  # the weights last (a workdir's are read with its run)
  with jax.set_mesh(run.mesh):
    out = sampling.generate(params, config, jnp.asarray([ids]), None, jax.random.key(_SEED.value),
                            max_new_tokens=_MAX_NEW_TOKENS.value, sampling=settings)
  n = int(out.lengths[0])
  new_ids = [int(i) for i in out.tokens[0, :n]]
  result = {"prompt_ids": ids, "ids": new_ids, "text": tok.decode(new_ids),
            "logprobs": [float(x) for x in out.logprobs[0, :n]]}
  print(json.dumps(result, ensure_ascii=False))
  if _OUTPUT_JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value)), exist_ok=True)
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, ensure_ascii=False)


if __name__ == "__main__":
  cli.run(main)
