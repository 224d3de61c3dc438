r"""Per-device memory of a recipe before it runs: the estimate, and the compiler's beside it.

  python launch/plan.py --config=configs/lychee.py:rl,7b,v5p-64
  python launch/plan.py --all                  # every recipe with a compiler record
  python launch/plan.py --config=configs/tiny.py:sft --config.mesh.fsdp=4 --compile=v5e:2x2
  python launch/plan.py --config=configs/lychee.py:rl,7b,gpu8
  python launch/plan.py --config=configs/lychee.py:rl,7b,gpu8 --compile=h100:8
  python launch/plan.py --model=qwen2.5-7b --mesh=fsdp=8 --batch=16 --turn_tokens=2560
  python launch/plan.py --model=qwen2.5-7b --mesh=fsdp=8 --card=a100-40gb

With --config, one row per program the stage runs (the train step; for RL the rollout and
the reference log-prob pass; evaluation's recall loop and answer.py's streaming loop), built
by the same code that compiles them (memrecall/capacity/aot.py): the arguments and what RL holds on
device beside them are exact, the temporaries a sum of named terms (memrecall/capacity/memory_plan.py;
--terms lists them with their formulas).  Beside it, the compiler's numbers: from a record
that launch/compile.py --output_json wrote (--records, default docs/compile/), or compiled
now for deviceless TPUs or GPUs (--compile=TOPOLOGY, a TPU slice or GPU hosts such as h100:8:
minutes of CPU for a 7B recipe, seconds for a tiny one).  `allocated` is what the compiled program's buffers take once laid out,
plus what RL holds; `total` adds the compiler's temporaries as it counts them
(args + temp + out - alias + held, what launch/compile.py's fit check uses); the ratio is
estimate / allocated.  Each row ends with the verdict launch/compile.py gives (`aot.fit_advice`):
fits, or by how much it does not and what to change; on a GPU, the memory fraction a program
above JAX's default pool (75%) needs.  A GPU mesh (gpu8) names no card: without --compile or a
record its rows are the estimate, judged on --card (default h100, what the GPU records are
compiled for).

With --model, the summary of one training setup: parameters and AdamW moments (exact), and
what a train step holds beside them as the recipe estimator counts a turn's backward pass
(float32 gradient buffers, a gathered layer, the LM head and logits with their gradient, the
remat inputs), and a memory bank; judged on --card as above.  Bad flags are one-line errors.
"""

import glob
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file("config", None, "A recipe, e.g. "
                                          "configs/lychee.py:rl,7b,v5p-64.")
_ALL = flags.DEFINE_bool("all", False, "Every recipe that has a compiler record in --records.")
_RECORDS = flags.DEFINE_string("records", os.path.join(ROOT, "docs", "compile"),
                               "Directory of launch/compile.py --output_json records.")
_COMPILE = flags.DEFINE_string("compile", None, "Compile the recipe now for this TPU slice or "
                               "GPU hosts (v5e:2x2, h100:8; or `recipe`: the slice its mesh "
                               "names) instead of reading a record.")
_GPU_TARGET_CONFIG = flags.DEFINE_string("gpu_target_config", None, "--compile for GPU hosts: "
                                         "the card's GpuTargetConfigProto as a text file "
                                         "(default: the one the CUDA plugin carries).")
_TERMS = flags.DEFINE_bool("terms", False, "List each estimate's terms and formulas.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write every row (estimate with its "
                                   "terms, the compiler's numbers, the ratio) here as JSON too.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 16, "Questions per evaluation batch.",
                                   lower_bound=1)
_MODEL = flags.DEFINE_string("model", None, "Or a shape from configs/models.py (the summary).")
_MESH = flags.DEFINE_string("mesh", None, "--model: axis sizes, e.g. data=2,fsdp=4,tensor=1 "
                            "(default fsdp=8).")
_TRAINABLE = flags.DEFINE_string("trainable", None, "--model: beacon | lora | gate | backbone "
                                 "| all (default backbone).")
_BATCH = flags.DEFINE_integer("batch", None, "--model: rows per step (default 16).",
                              lower_bound=1)
_MICROBATCHES = flags.DEFINE_integer("microbatches", None, "--model: parts of a step "
                                     "(default 1).", lower_bound=1)
_TURN_TOKENS = flags.DEFINE_integer("turn_tokens", None, "--model: tokens of one turn "
                                    "(default 2560).", lower_bound=1)
_BANK_CHUNKS = flags.DEFINE_integer("bank_chunks", None, "--model: compressed chunks held on "
                                    "device (default 0).", lower_bound=0)
_SLOTS = flags.DEFINE_integer("slots", None, "--model: compressed slots per chunk (default "
                              "1024).", lower_bound=1)
_DEVICE_GIB = flags.DEFINE_float("device_gib", None, "Device memory to compare with (default: "
                                 "the record's, the TPU's HBM, or --card's).", lower_bound=0.001)
_CARD = flags.DEFINE_string("card", None, "The device to judge against where no record, "
                            "--compile or TPU slice names one (--model, a gpu8 mesh): a GPU card "
                            "(h100, h100-pcie, h200, b200, a100, a100-40gb, a100-80gb-pcie; "
                            "default h100) or a TPU generation (v4, v5e, v5p, v6e).")
from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help

GiB = 1024 ** 3


def _mesh_sizes(config) -> dict:
  return {k: int(v) for k, v in config.mesh.to_dict().items() if k != "dcn"}


def _recipe_spec() -> str:
  return config_flags.get_config_filename(flags.FLAGS["config"])


def _target(spec: str, topology: str | None):
  """What a recipe is compiled for: `topology` (a TPU slice or GPU hosts), or the TPU slice
  its MESH name gives; None for a mesh that names neither (gpu8: no card named)."""
  from memrecall.capacity import targets
  name = topology if topology and topology != "recipe" else (spec.partition(":")[2].split(",")
                                                             + ["", "", ""])[2]
  try:
    return targets.parse_target(name)
  except targets.TopologyError:
    if topology and topology != "recipe":
      raise
    return None


def load_recipe(spec: str, overrides: list[str]):
  """A recipe's config from `FILE:ARG` and `--config.KEY=VALUE` overrides (a record's)."""
  import ast
  import importlib.util
  path, _, arg = spec.partition(":")
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  module_spec = importlib.util.spec_from_file_location("recipe", full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for override in overrides:
    key, _, value = override[len("--config."):].partition("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
      new = value.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float)):
      new = type(old)(value)
    elif isinstance(old, str):
      new = value
    else:
      new = ast.literal_eval(value)
    node[leaf] = new
  return config


def _records(directory: str) -> list[dict]:
  """Every record in `directory`, rows of one recipe (config + overrides, topology and the
  evaluation settings the programs were built with) merged: a later file's row for a program
  replaces an earlier one's.  Records of other evaluation settings stay apart, so no row is
  estimated with settings it was not compiled with."""
  merged: dict[tuple, dict] = {}
  for path in sorted(glob.glob(os.path.join(directory, "*.json")), key=os.path.getmtime):
    try:
      record = json.load(open(path, encoding="utf-8"))
    except (OSError, ValueError):
      continue
    if not isinstance(record, dict) or "rows" not in record or "config" not in record:
      continue
    key = (record["config"], tuple(record.get("overrides", [])), record.get("topology"),
           record.get("eval_batch"), record.get("eval_tokens"),
           tuple(record.get("eval_modes", ())), record.get("eval_weights", "sharded"))
    into = merged.setdefault(key, {**record, "rows": []})
    rows = {r["program"]: r for r in into["rows"]}
    rows.update({r["program"]: r for r in record["rows"]})
    into["rows"] = list(rows.values())
    # Programs of the merged records: all when any record holds all (no --programs).
    before, after = into.get("programs"), record.get("programs")
    into.update({k: v for k, v in record.items() if k != "rows"})
    into["programs"] = (before + [p for p in after if p not in before]
                        if before and after else [])
  return list(merged.values())


def _devices(count: int):
  """`count` CPU devices (only their number matters to the estimate's shardings)."""
  import jax
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise app.UsageError(f"the mesh needs {count} devices; run with XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={count} or more")
  return devices[:count]


def _gib(x: float) -> str:
  """Two decimals, or four below 1 GiB (a tiny recipe's MiB)."""
  return f"{x:.2f}" if x >= 1 else f"{x:.4f}"


def _card(name: str | None) -> tuple[str, float, float | None]:
  """--card: the device a plan is judged on where nothing else names it: its name, GiB per
  device (--device_gib's, if given) and the share its runtime allocates by default (JAX's GPU
  pool; None on a TPU)."""
  from memrecall.capacity import gpu_hosts, targets, tpu_slices
  card = (name or "h100").strip().lower()
  if card in gpu_hosts.MEMORY_BYTES:
    gib, pool = gpu_hosts.MEMORY_BYTES[card] / GiB, targets.GPU_POOL_FRACTION
  elif card in tpu_slices.HBM_GIB:
    gib, pool = tpu_slices.HBM_GIB[card], None
  else:
    raise app.UsageError(f"--card={name}: choose a GPU card ({', '.join(gpu_hosts.MEMORY_BYTES)}) "
                         f"or a TPU generation ({', '.join(tpu_slices.HBM_GIB)})")
  return card, _DEVICE_GIB.value or gib, pool


def _verdict(advice: str, fits: bool) -> str:
  """A row's verdict from compile.py's advice: what it says, led by "fits" where it fits."""
  if not advice:
    return "fits" if fits else "does not fit"
  return f"fits; {advice}" if fits else advice


def _plan_recipe(spec: str, overrides: list[str], config, record: dict | None, compile_for,
                 eval_batch: int, out: list) -> list[str]:
  """The table's lines for one recipe; its rows appended to `out`."""
  import math
  from memrecall.capacity import aot, gpu_hosts, memory_plan, targets
  from memrecall.models.placement import Placement
  from memrecall.runtime import sharding as sharding_lib
  from memrecall.models.config import ConfigError
  from memrecall.run_builder import build_run
  from memrecall.train import trainer
  mesh = _mesh_sizes(config)
  tpu = compile_for or _target(spec, None)
  deviceless = (targets.deviceless(compile_for, _GPU_TARGET_CONFIG.value)
                if compile_for is not None else None)
  if deviceless is not None:
    devices = deviceless.devices
  elif record is not None and record.get("mesh"):  # as many as it was compiled for
    devices = _devices(math.prod(record["mesh"].values()))
  else:
    known = math.prod(v for v in mesh.values() if v != -1)
    devices = _devices(tpu.chips if tpu is not None and -1 in mesh.values() else known)
  try:
    run = build_run(config, devices)
    # A record's evaluation settings (launch/compile.py's flags), else compile.py's defaults.
    tokens = (record or {}).get("eval_tokens") or run.num_chunks * run.compressor.chunk_size
    eval_batch = (record or {}).get("eval_batch") or eval_batch
    modes = (record or {}).get("eval_modes", ["gate", "stream"])
    # The device the rows are judged on, and its runtime's default pool (a GPU's; None: all):
    # the compile's, the record's, the recipe's TPU slice's, else --card's (assumed).
    card = None
    recorded = record is not None and record.get("hbm_gib_per_device")
    if deviceless:
      hbm_gib, pool = deviceless.memory_bytes_per_device / GiB, deviceless.pool_fraction
    elif recorded:
      hbm_gib = record["hbm_gib_per_device"]
      pool = targets.GPU_POOL_FRACTION if gpu_hosts.looks_like_gpu(record["topology"]) else None
    elif tpu is not None:
      hbm_gib, pool = tpu.hbm_gib_per_chip, None
    else:
      card, hbm_gib, pool = _card(_CARD.value)
    if _CARD.value and card is None:
      print(f"warning: --card={_CARD.value} is not used: {spec} is judged on the device its "
            "record, --compile or TPU slice names (--device_gib compares with another memory)",
            file=sys.stderr)
    device_gib = _DEVICE_GIB.value or hbm_gib
    # Placements are decided by what a device's runtime allocates (compile.py's rule); a
    # record's by the memory it was compiled for.
    memory = (deviceless.pool_bytes if deviceless else
              int((hbm_gib if recorded else device_gib) * GiB * (pool or 1)))
    eval_mesh = (record or {}).get("eval_mesh")
    if eval_mesh:  # the mesh it was compiled on: one process's devices (for tensor, re-formed)
      placement = Placement(record["eval_weights"], sharding_lib.make_mesh(
          eval_mesh, list(run.mesh.devices.flat)[:math.prod(eval_mesh.values())]), "recorded")
    else:
      placement = aot.eval_weights(
          run, (record or {}).get("eval_weights", "sharded") if record else "auto",
          memory or None)
    weights = placement.weights
    programs = aot.recipe_programs(run, eval_batch=eval_batch, eval_tokens=tokens,
                                   eval_modes=modes, eval_placement=placement,
                                   device_memory=memory or None)
    estimates = memory_plan.estimate_programs(run, programs, eval_batch=eval_batch)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  rows = {}
  if record is not None:
    rows = {r["program"]: r for r in record["rows"]}
  elif deviceless is not None:
    rows = {r.program: r.to_json() for r in aot.compile_rows(
        programs, run.mesh, deviceless.memory_bytes_per_device,
        pool_fraction=deviceless.pool_fraction)}
  if card:  # nothing names the device: --card's, assumed
    compiles = (f"; --compile={card}:{run.mesh.size} compiles it" if card in gpu_hosts.CARDS
                else "")
    assumed = (f"no TPU slice or GPU card named: estimate only, judged on {card} "
               f"({device_gib:.1f} GiB" + (f", JAX's default pool {pool:.0%}" if pool else "")
               + f"; --card for another{compiles})")
  where = (f"{record['topology']}, compiler record (jax {record.get('jax')}, "
           f"{record.get('compiler')})" if record else
           f"{compile_for.topology}, compiled now" if compile_for is not None else
           f"{tpu.topology}: no compiler record (launch/compile.py --output_json, or --compile)"
           if tpu is not None else assumed)
  on = f" on {dict(placement.mesh.shape)}" if placement.mesh is not run.mesh else ""
  placed = (f", evaluation's weights {weights}{on}"
            if any(aot.is_eval(p.name) for p in programs) else "")
  lines = [f"{spec}{' ' + ' '.join(overrides) if overrides else ''}  mesh {dict(run.mesh.shape)}"
           f"{placed}  [{where}]",
           f"  {'program':<20} {'estimate':>9} {'allocated':>10} {'ratio':>6} {'total':>8} "
           f"{'of HBM':>7}  GiB per device"]
  # A record of some programs only (compile.py --programs): the rest are another record's.
  only = (record or {}).get("programs") or [e.program for e in estimates]
  by_name = {p.name: p for p in programs}
  for e in [e for e in estimates if e.program in only]:
    row = rows.get(e.program)
    est = e.total / GiB
    allocated = (row["allocation_gib"] + row.get("held_gib", 0.0)
                 if row and row.get("allocation_gib") else None)
    inference = by_name[e.program].inference
    if row and "advice" in row and device_gib == hbm_gib:  # compile.py's own verdict
      verdict = _verdict(row["advice"], row.get("fits", True))
    elif row:  # judged now, as compile.py would: on --device_gib, or a record without verdicts
      advice = aot.fit_advice(e.program, row["total_gib"], device_gib, row.get("temp_gib", 0.0),
                              row.get("argument_gib", 0.0) + row.get("held_gib", 0.0),
                              inference, pool)
      verdict = _verdict(advice, row["total_gib"] <= aot.FIT_FRACTION * device_gib)
    else:
      advice = aot.fit_advice(e.program, est, device_gib, e.temporaries / GiB,
                              (e.arguments + e.held) / GiB, inference, pool)
      verdict = _verdict(advice, est <= aot.FIT_FRACTION * device_gib)
    out.append({"config": spec, "overrides": overrides, "mesh": dict(run.mesh.shape),
                "program": e.program, "estimate": e.to_json(), "eval_weights": weights,
                "eval_mesh": dict(placement.mesh.shape),
                "eval_batch": eval_batch, **(aot.rollout_fields(programs) if e.program == "rollout" else {}),
                "compiler": row, "allocated_gib": allocated,
                "ratio": est / allocated if allocated else None, "verdict": verdict,
                "topology": (record or {}).get("topology") or (tpu.topology if tpu else None)})
    if allocated:
      cells = (f"{_gib(allocated):>10} {est / allocated:>6.2f} {_gib(row['total_gib']):>8} "
               f"{row['total_gib'] / device_gib:>7.1%}  {verdict}")
    elif row:  # refused for lack of memory (nothing allocated), or a record without the figure
      what = "refused" if not row.get("compiled", True) else "?"
      cells = (f"{what:>10} {'':>6} {_gib(row['total_gib']):>8} "
               f"{row['total_gib'] / device_gib:>7.1%}  {verdict}")
    else:
      label = "estimate" if tpu is None else "not compiled"
      cells = f"{'-':>10} {'':>6} {'-':>8} {est / device_gib:>7.1%}  ({label}) {verdict}"
    lines.append(f"  {e.program:<20} {_gib(est):>9} {cells}")
    if _TERMS.value:
      lines.append(f"    arguments {e.arguments / GiB:.3f}, held {e.held / GiB:.3f}, "
                   f"temporaries {e.temporaries / GiB:.3f} (phase: {e.phase})")
      for phase, terms in e.phases.items():
        for t in terms:
          mark = "*" if phase == e.phase else " "
          lines.append(f"    {mark}{phase:<15} {t.bytes / GiB:7.3f}  {t.name}: {t.formula}")
  topology = (record or {}).get("topology") or getattr(compile_for, "topology", "")
  on_gpus = gpu_hosts.looks_like_gpu(topology) or card in gpu_hosts.CARDS
  # Loops whose weights stay sharded over fsdp: the rollout as rl.rollout_weights placed it,
  # the reference pass on training's mesh, evaluation as its placement says.
  loops = [(p.name, p.inference.weights if p.inference else weights if aot.is_eval(p.name)
            else "sharded", placement.mesh if aot.is_eval(p.name) else run.mesh)
           for p in programs if p.name != "train_step" and p.name in only]
  sharded_loops = [name for name, placed, on in loops
                   if placed == "sharded" and on.shape["fsdp"] > 1]
  if sharded_loops:
    lines.append(f"  ({', '.join(sharded_loops)}: weights sharded over fsdp, so every iteration "
                 "of their loops (a decode step, a block's pass) all-gathers the layers' weights "
                 "again; the estimate counts one layer gathered at a time, as the TPU compiler "
                 "lays them out" + ("; XLA's GPU compiler also gathers the whole model before "
                                    "the loops" if on_gpus else "")
                 + ": docs/2026-12-06-gpu-deviceless-compile.md)")
  updates = trainer.updates_per_step(config)
  if updates > 1 and "train_step" in only:
    lines.append(f"  (train_step: {updates} updates a step (rl.updates_per_batch); the estimate "
                 "leaves out what the update loop carries: +13% of a 0.5B RL step's "
                 "temporaries on a v5p-8, while the 7B step on 8 H100s took 5% less "
                 "temporaries at 2 updates than at 1, its updates having half the microbatches: "
                 "docs/2026-12-07-per-row-keys.md)")
  return lines


def _summary(argv_model: str) -> None:
  """--model: the older one-setup summary."""
  from configs import models
  from memrecall.capacity import aot, memory_plan
  from memrecall.models.config import ModelConfig
  from memrecall.train.state import SUBSETS
  try:
    shape = models.model_config(argv_model)
  except ValueError as e:
    raise app.UsageError(f"--model: {e}") from None
  # float32 master weights (and so Adam's moments), as every training recipe keeps them
  # (configs/lychee.py); the shape's bfloat16 storage is the inference checkpoint's.
  model = ModelConfig.from_dict(shape.to_dict()).replace(compressor=True, param_dtype="float32")
  value = lambda flag, default: default if flag.value is None else flag.value
  mesh = value(_MESH, "fsdp=8")
  try:
    sizes = {k.strip(): int(v) for k, v in (i.split("=") for i in mesh.split(","))}
  except ValueError:
    raise app.UsageError(f"--mesh must look like 'data=2,fsdp=4', got {mesh!r}") from None
  if any(v < 1 for v in sizes.values()):
    raise app.UsageError(f"--mesh={mesh}: planning needs explicit positive axis sizes (no 0 or -1)")
  unknown = set(sizes) - {"data", "fsdp", "tensor"}
  if unknown:
    raise app.UsageError(f"--mesh={mesh}: unknown axes {sorted(unknown)}; use data, fsdp, tensor")
  trainable = value(_TRAINABLE, "backbone")
  if trainable not in SUBSETS:
    raise app.UsageError(f"--trainable={trainable}: choose from {', '.join(SUBSETS)}")
  card, device, pool = _card(_CARD.value)
  result = memory_plan.plan(model, sizes, trainable=trainable, batch=value(_BATCH, 16),
                     turn_tokens=value(_TURN_TOKENS, 2560), bank_chunks=value(_BANK_CHUNKS, 0),
                     slots=value(_SLOTS, 1024), microbatches=value(_MICROBATCHES, 1))
  gib = lambda b: b / GiB
  print(f"mesh {sizes} ({result.devices} devices), per device of a train step (an estimate, "
        "float32 master weights):")
  for name in ("params", "optimizer", "gradients", "activations", "memory_bank"):
    print(f"  {name:<12}{gib(getattr(result, name)):10.2f} GiB")
    if _TERMS.value and name in ("gradients", "activations"):
      for t in result.terms:
        if (t.name == "gradients") == (name == "gradients"):
          print(f"    {gib(t.bytes):7.3f}  {t.name}: {t.formula}")
  # compile.py's rule (aot.fit_advice): within 90% of the device, on a GPU JAX's default pool.
  total = gib(result.total)
  advice = aot.fit_advice("train_step", total, device, gib(result.gradients + result.activations),
                          gib(result.params + result.optimizer + result.memory_bank),
                          pool_fraction=pool)
  print(f"  {'total':<12}{total:10.2f} GiB of {device:.1f} GiB ({card}): "
        + _verdict(advice, total <= aot.FIT_FRACTION * device))


def main(argv):
  del argv
  given = sum(bool(x) for x in (_CONFIG.value is not None, _ALL.value, _MODEL.value))
  if given != 1:
    raise app.UsageError("give one of --config, --all or --model")
  if _MODEL.value:
    return _summary(_MODEL.value)
  cli.writable("output_json", _OUTPUT_JSON.value)
  out: list = []
  if _ALL.value:
    records = _records(_RECORDS.value)
    if not records:
      raise app.UsageError(f"--records: no launch/compile.py records in {_RECORDS.value}")
    import math
    count = max(r.get("devices", 1) for r in records)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={count}")
    for record in sorted(records, key=lambda r: (r["config"], r.get("overrides", []))):
      config = load_recipe(record["config"], record.get("overrides", []))
      for line in _plan_recipe(record["config"], record.get("overrides", []), config, record,
                               None, _EVAL_BATCH.value, out):
        print(line, flush=True)
    return _write(out)
  spec = _recipe_spec()
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  config = _CONFIG.value
  mesh = _mesh_sizes(config)
  if any(v < -1 or v == 0 for v in mesh.values()):
    raise app.UsageError(f"mesh {mesh}: axis sizes are positive (or -1 to fill the slice)")
  compile_for = None
  from memrecall.capacity import targets
  if _COMPILE.value:
    try:
      compile_for = _target(spec, _COMPILE.value)
    except targets.TopologyError as e:
      raise app.UsageError(f"--compile: {e}") from None
    if compile_for is None:
      raise app.UsageError(f"--compile=recipe: the recipe's mesh names no TPU slice; give a "
                           "topology, e.g. --compile=v5e:2x2 or --compile=h100:8")
  if _GPU_TARGET_CONFIG.value and not (compile_for and targets.is_gpu(compile_for)):
    raise app.UsageError("--gpu_target_config goes with --compile for GPU hosts (e.g. h100:8)")
  tpu = compile_for or _target(spec, None)
  import math
  known = math.prod(v for v in mesh.values() if v != -1)
  if tpu is not None:
    if (-1 in mesh.values() and tpu.chips % known) or (-1 not in mesh.values()
                                                       and known != tpu.chips):
      raise app.UsageError(f"mesh {mesh} does not cover the {tpu.chips} devices of "
                           f"{tpu.topology}")
  elif -1 in mesh.values():
    raise app.UsageError(f"mesh {mesh}: the recipe names no TPU slice, so -1 (every device) has "
                         "no size to take: give the sizes (e.g. --config.mesh.fsdp=4) or a "
                         "target (--compile=v5e:2x2 or --compile=h100:8)")
  count = tpu.chips if tpu is not None else known
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={count}")
  record = None
  if compile_for is None:  # a GPU mesh's record names its hosts
    # The recipe's whole record (every program, the default evaluation weights) before a later
    # one of a few programs under other settings (`*_sharded_eval.json`); then the latest.
    mine = [r for r in _records(_RECORDS.value)
            if r["config"] == spec and r.get("overrides", []) == overrides]
    if mine:
      record = max(enumerate(mine), key=lambda ir: (not ir[1].get("programs"),
                                                    len(ir[1]["rows"]), ir[0]))[1]
  for line in _plan_recipe(spec, overrides, config, record, compile_for, _EVAL_BATCH.value, out):
    print(line, flush=True)
  _write(out)


def _write(rows: list) -> None:
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cli.run(main)
