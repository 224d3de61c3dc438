"""launch/compile.py: the tiny recipe compiled by the TPU compiler for deviceless v5e chips
(and by XLA's GPU compiler for deviceless H100s, where the `gpu-aot` extra is installed).

A change that stops the train step or evaluation's recall loop from compiling for a TPU
fails here, on a machine without one (libtpu comes with the `test` extra).  Bad input (an
unknown topology, a mesh for another slice, a recipe that does not fit) is one line, or a
row that says by how much it does not fit, never a traceback.
"""

import json
import math
import os

import numpy as np
import pytest

from memrecall.capacity import gpu_hosts, targets, tpu_slices
from tests import forked_launchers
from tests.conftest import needs_cuda_plugin, needs_libtpu, xla_defaults_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = xla_defaults_env()
ENV.pop("MEMRECALL_VERBOSE", None)


# The recipe at 2 of its 4 layers, where a test reads what a program places and gathers, not
# the recipe itself: the per-layer patterns are the same, and the compile about half.
TWO_LAYERS = "--config.model.num_layers=2"


def _compile(*args, timeout=300):
  return forked_launchers.run(os.path.join(ROOT, "launch", "compile.py"), args, ENV,
                              timeout=timeout)


@pytest.mark.parametrize("name,topology,chips", [
    ("v5p-64", "v5p:2x4x4", 32), ("v5p-8", "v5p:2x2x1", 4), ("v5p-128", "v5p:4x4x4", 64),
    ("v4-32", "v4:2x2x4", 16), ("v5e-16", "v5e:4x4", 16), ("v5litepod-8", "v5e:2x4", 8),
    ("v6e-4", "v6e:2x2", 4), ("v5p:2x2x2", "v5p:2x2x2", 8), ("v5e:2x2", "v5e:2x2", 4)])
def test_slice_names_give_cloud_tpu_topologies(name, topology, chips):
  tpu = tpu_slices.parse_slice(name)
  assert (tpu.topology, tpu.chips) == (topology, chips)
  assert tpu_slices.parse_slice(tpu.accelerator_type) == tpu


@pytest.mark.parametrize("name", ["v9x-8", "v5p", "v5p-12", "v5e:2x2x2", "v5p-3", "tpu"])
def test_bad_slice_names_are_refused(name):
  with pytest.raises(tpu_slices.TopologyError):
    tpu_slices.parse_slice(name)


@pytest.mark.parametrize("name,card,hosts,gpus,topology", [
    ("h100:8", "h100", 1, 8, "h100:8"), ("H200:2x8", "h200", 2, 8, "h200:2x8"),
    ("a100:1x4", "a100", 1, 4, "a100:4"), ("b200:1", "b200", 1, 1, "b200:1")])
def test_gpu_host_names(name, card, hosts, gpus, topology):
  target = targets.parse_target(name)
  assert targets.is_gpu(target)
  assert (target.card, target.hosts, target.gpus_per_host) == (card, hosts, gpus)
  assert (target.topology, target.chips) == (topology, hosts * gpus)
  assert targets.parse_target(target.topology) == target
  assert target.accelerator_type == gpu_hosts.CARDS[card]


@pytest.mark.parametrize("name", ["h100", "h100:0", "h100:2x0", "h100:8x", "gpu8", "h7:8"])
def test_bad_gpu_host_names_are_refused(name):
  with pytest.raises(targets.TopologyError):
    targets.parse_target(name)


def _spec(name: str, memory: int) -> bytes:
  return (b'gpu_device_info {\n  core_count: 132\n  device_memory_size: %d\n}\n'
          b'platform_name: "CUDA"\ndevice_description_str: "%s"\n' % (memory, name.encode()))


def test_target_configs_are_read_from_the_plugins_library(tmp_path):
  """XLA compiles its cards' target configs into the plugin as NUL-ended text protos; a
  format string that starts the same way but is not a config is passed over."""
  library = tmp_path / "xla_cuda_plugin.so"
  library.write_bytes(b"\x7fELF\0junk\0" + _spec("NVIDIA H100 80GB HBM3", 84942979072) + b"\0"
                      + b"gpu_device_info {\n%s\0" + _spec("NVIDIA B200", 191) + b"\0tail")
  configs = gpu_hosts.embedded_target_configs(str(library))
  assert sorted(configs) == ["NVIDIA B200", "NVIDIA H100 80GB HBM3"]
  assert gpu_hosts.device_memory_bytes(configs["NVIDIA H100 80GB HBM3"]) == 84942979072
  assert configs["NVIDIA B200"].endswith('device_description_str: "NVIDIA B200"\n')
  given = tmp_path / "h100.txtpb"
  given.write_bytes(_spec("NVIDIA H100 80GB HBM3", 5))
  h100 = targets.parse_target("h100:8")
  assert gpu_hosts.device_memory_bytes(gpu_hosts.target_config(h100, str(given))) == 5
  with pytest.raises(targets.TopologyError, match="no device_memory_size"):
    gpu_hosts.device_memory_bytes("gpu_device_info {\n}\n")


@needs_cuda_plugin
def test_the_cuda_plugin_carries_a_target_config_for_every_named_card():
  configs = gpu_hosts.embedded_target_configs(gpu_hosts._plugin_library(gpu_hosts.plugin()[0]))
  assert set(gpu_hosts.CARDS.values()) <= set(configs)
  h100 = gpu_hosts.device_memory_bytes(configs[gpu_hosts.CARDS["h100"]])
  assert 79 * 2**30 < h100 < 80 * 2**30  # "80GB": 80e9 bytes less what the driver keeps


@needs_cuda_plugin
def test_tiny_recipe_compiles_for_two_deviceless_h100s(tmp_path):
  out = tmp_path / "plan.json"
  proc = _compile("--config=configs/tiny.py:sft", "--config.mesh.fsdp=2", TWO_LAYERS,
                  "--topology=h100:2", "--eval_modes=gate", "--programs=eval_recall_gate",
                  f"--output_json={out}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stderr == "", proc.stderr
  report = json.load(open(out))
  assert (report["topology"], report["devices"], report["chips"]) == ("h100:2", 2, 2)
  assert report["compiler"] == gpu_hosts.plugin()[1]
  assert report["accelerator_type"] == "NVIDIA H100 80GB HBM3"
  assert 79 < report["hbm_gib_per_device"] < 80
  (row,) = report["rows"]
  assert row["program"] == "eval_recall_gate" and row["fits"]
  assert min(row["argument_gib"], row["temp_gib"], row["compile_s"]) > 0


@needs_libtpu
def test_evaluation_compiles_on_one_process_s_chips_with_tensor_weights_and_plan_reads_it(
    tmp_path):
  """A v5e:4x4 is four hosts of four chips: evaluation is compiled on one host's four, as
  launch/eval.py runs each process on its own devices.  --weights=tensor forms them into
  data 2 x tensor 2 (the fewest chips per group whose share fits a third of 16 GiB: two) and
  the record says so; its loops gather no weights, they all-reduce activations.  plan.py
  estimates the record's rows on the mesh they were compiled on: 16 questions split over
  data 2, eight a device.  (The tiny model's estimate is not compared with the compiler's:
  fixed buffers outweigh its few KiB; the 7B records are, in tests/test_plan.py.)"""
  out = tmp_path / "tensor.json"
  proc = _compile("--config=configs/tiny.py:sft", TWO_LAYERS, "--topology=v5e:4x4",
                  "--eval_modes=gate",
                  "--weights=tensor", "--programs=eval_recall_gate", f"--output_json={out}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.load(open(out))
  assert report["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
  assert (report["eval_weights"], report["eval_mesh"]) == (
      "tensor", {"data": 2, "fsdp": 1, "tensor": 2})
  assert ("evaluation on one process's devices, as launch/eval.py runs it: weights tensor over "
          "4 device(s) as data 2 x tensor 2") in proc.stdout
  (row,) = report["rows"]
  assert row["loop_reduce_gib"] > 0 and row["loop_gather_gib"] < row["loop_reduce_gib"]
  plan = tmp_path / "plan.json"
  proc = forked_launchers.run(os.path.join(ROOT, "launch", "plan.py"),
                              ["--all", f"--records={tmp_path}", f"--output_json={plan}"], ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "evaluation's weights tensor on {'data': 2, 'fsdp': 1, 'tensor': 2}" in proc.stdout
  (estimate,) = json.load(open(plan))
  bank = estimate["estimate"]["phases"]["memory updates"][0]
  assert bank["name"] == "evaluation: the bank" and " x 8 rows x " in bank["formula"], bank


@needs_libtpu
def test_tiny_recipe_compiles_for_v5e_with_the_compilers_memory_plan(tmp_path):
  out = tmp_path / "plan.json"
  proc = _compile("--config=configs/tiny.py:sft", "--topology=v5e:2x2", "--eval_modes=gate",
                  f"--output_json={out}", f"--hlo_dir={tmp_path / 'hlo'}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stderr == "", proc.stderr  # libtpu's own logs stay quiet too
  # --hlo_dir: each program's HLO; its costliest loop's gathers are the row's last column.
  from memrecall.capacity import hlo_report
  for row in json.load(open(out))["rows"]:
    loops, _ = hlo_report.loop_report((tmp_path / "hlo" / f"{row['program']}.hlo").read_text())
    assert row["loop_gather_gib"] == pytest.approx(
        max(loop.gathered_bytes for loop in loops) / 2**30)
    assert row["loop_reduce_gib"] == pytest.approx(
        max(loop.reduced_bytes for loop in loops) / 2**30)
    assert row["program"] != "eval_recall_gate" or row["loop_gather_gib"] > 0
  report = json.load(open(out))
  assert (report["topology"], report["devices"], report["mesh"]["fsdp"]) == ("v5e:2x2", 4, 4)
  # Evaluation's weights as launch/eval.py --weights=auto places them on a 16 GiB chip.
  assert report["eval_weights"] == "replicated"
  assert "evaluation: weights replicated over 4 device(s)" in proc.stdout
  assert report["eval_mesh"] == report["mesh"]
  assert report["compiler"] == f"libtpu {tpu_slices.libtpu_version()}"
  assert report["config"] == "configs/tiny.py:sft" and report["overrides"] == []
  rows = {r["program"]: r for r in report["rows"]}
  assert list(rows) == ["train_step", "eval_recall_gate"]
  for row in rows.values():
    assert min(row["argument_gib"], row["temp_gib"], row["output_gib"], row["compile_s"]) > 0
    assert row["held_gib"] == 0  # nothing stays on device besides an SFT step's own state
    assert row["total_gib"] == pytest.approx(row["argument_gib"] + row["temp_gib"]
                                             + row["output_gib"] - row["alias_gib"])
    assert row["share_of_hbm"] == pytest.approx(row["total_gib"] / 16.0)
    assert row["fits"] and not row["advice"]
  step = rows["train_step"]
  # The state is donated: its outputs alias its arguments (updated in place).
  assert step["alias_gib"] == pytest.approx(step["output_gib"], rel=0.05)
  # Parameters (f32) and AdamW's two moments of the backbone, over 4 devices: each device's
  # arguments hold its share of them, about 3 x (a quarter of the parameters) plus the batch.
  assert step["argument_gib"] > 2.5 * _param_bytes() / 4 / 2**30
  assert step["argument_gib"] < 3.5 * _param_bytes() / 2**30
  # The printed table: a header, then one line per program with the JSON's numbers.
  lines = proc.stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("program"))
  for line, row in zip(lines[header + 1:], report["rows"]):
    name, args, temp, output, held, total = line.split()[:6]
    assert name == row["program"]
    assert float(total) == pytest.approx(row["total_gib"], abs=1e-3)
  assert "v5e:2x2" in proc.stdout and "libtpu" in proc.stdout


@needs_libtpu
def test_a_tensor_rollout_is_placed_with_the_targets_memory_and_recorded(tmp_path):
  """rl.rollout_weights=tensor with 4 KV heads on a v5e:2x2 (fsdp 4).  Deviceless chips report
  no memory; compile.py decides with the target's 16 GiB, as a run on the chips would: the
  tiny copy fits groups of 2 (memory unknown would take all 4 that split the heads).  The
  line and the record say so, and no loop gathers weights."""
  out = tmp_path / "rollout.json"
  proc = _compile("--config=configs/tiny.py:rl", TWO_LAYERS, "--topology=v5e:2x2",
                  "--programs=rollout",
                  "--config.rl.rollout_weights=tensor", "--config.model.num_heads=4",
                  "--config.model.num_kv_heads=4", "--config.model.head_dim=16",
                  f"--output_json={out}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "rollout weights tensor over 4 device(s) as data 2 x tensor 2" in proc.stdout
  report = json.load(open(out))
  assert report["rollout_weights"] == "tensor"
  assert report["rollout_mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  (row,) = report["rows"]
  assert row["loop_gather_gib"] * 2**30 < 1024 < row["loop_reduce_gib"] * 2**30, row


def _param_bytes() -> int:
  from configs import tiny
  from memrecall.models.config import ModelConfig
  from memrecall.models.qwen2 import abstract_params
  import jax
  config = ModelConfig.from_dict(tiny.get_config("sft").model.to_dict())
  leaves = jax.tree.leaves(jax.tree.map(lambda x: x.value, abstract_params(config),
                                        is_leaf=lambda x: hasattr(x, "names")))
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


@needs_libtpu
def test_a_recipe_that_does_not_fit_says_by_how_much(tmp_path):
  """A vocabulary of 60M tokens: the reference pass's parameters and float32 logits outgrow a
  v5e chip's 16 GiB.  The row says by how much and the command exits with status 3."""
  out = tmp_path / "over.json"
  proc = _compile("--config=configs/tiny.py:rl", "--topology=v5e:2x2",
                  "--programs=reference_logprobs", "--config.model.vocab_size=60000000",
                  f"--output_json={out}")
  assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
  (row,) = json.load(open(out))["rows"]
  over = row["total_gib"] - 0.9 * 16
  assert not row["fits"] and over > 0
  assert row["advice"].startswith(f"does not fit by {over:.2f} GiB")
  line = next(l for l in proc.stdout.splitlines() if l.startswith("reference_logprobs"))
  assert f"does not fit by {over:.2f} GiB" in line
  err = proc.stderr.strip().splitlines()
  assert err == [f"compile.py: error: 1 of 1 programs do not fit: reference_logprobs by "
                 f"{over:.2f} GiB"], proc.stderr
  assert json.load(open(out))["overrides"] == ["--config.model.vocab_size=60000000"]




def test_a_program_over_90_percent_of_hbm_says_by_how_much_and_what_to_change():
  from memrecall.capacity import aot
  fits = aot.Row("train_step", 10.0, 70.0, 10.0, 10.0, 80.0, 95.0, 1.0)
  assert fits.fits and fits.share == pytest.approx(80 / 95)
  over = aot._advice("train_step", 90.0, 95.0, temp=70.0, argument=20.0)
  assert over.startswith(f"does not fit by {90 - 0.9 * 95:.2f} GiB") and "microbatches" in over
  assert "fsdp" in aot._advice("rollout", 20.0, 16.0, temp=2.0, argument=18.0)
  assert aot._advice("train_step", 14.0, 16.0, temp=10.0, argument=4.0) == ""
  # A rollout split over tensor holds more rows a device than sharded: say so.
  from memrecall.models.placement import Placement
  split = Placement("tensor", type("Mesh", (), {"shape": {"tensor": 2}})(), "")
  advice = aot._advice("rollout", 83.5, 79.1, temp=71.0, argument=12.4, inference=split)
  assert advice.endswith("or rl.rollout_weights=sharded (on data x tensor 2 the rows split "
                         "over data alone)"), advice
  row = aot.Row("rollout", 18.0, 2.0, 0.0, 0.0, 20.0, 16.0, 1.0, "does not fit by 5.60 GiB")
  assert not row.fits and row.to_json()["share_of_hbm"] == pytest.approx(1.25)
  assert aot.format_row(row).endswith("does not fit by 5.60 GiB")


def test_a_gpu_program_above_jaxs_default_pool_says_which_fraction_it_needs():
  """JAX preallocates 75% of a GPU: a program that fits the card (<= 90%) but not that pool
  says which XLA_PYTHON_CLIENT_MEM_FRACTION to run with; below it, or without a pool, nothing."""
  import jax
  import jax.numpy as jnp
  from memrecall.capacity import aot
  from memrecall.train.trainer import Program
  x = jax.ShapeDtypeStruct((256, 1024), jnp.float32)  # 1 MiB in, 1 MiB out
  program = Program("rollout", jax.jit(lambda a: a * 2), (x,))
  mesh = jax.sharding.Mesh(jax.devices()[:1], ("x",))
  device = aot.compile_program(program, mesh, 2**40).total_gib / 0.8 * 2**30  # 80% of it
  row = aot.compile_program(program, mesh, device, pool_fraction=0.75)
  assert row.fits and row.share == pytest.approx(0.8)
  assert row.advice == ("above JAX's default pool (75% of 0 GiB): run with "
                        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.85")
  assert aot.compile_program(program, mesh, device).advice == ""
  assert aot.compile_program(program, mesh, device * 2, pool_fraction=0.75).advice == ""


@pytest.mark.parametrize("stage", ["sft", "gate"])
def test_training_compression_keeps_no_attention_scores_per_layer(stage):
  """The train step differentiates through compression (the gate stage too: its adapters
  sit in the layer stack compression scans over): under full remat it keeps each layer's
  input, not each layer's float32 attention scores (a `lax.cond` in the layer scan made JAX
  keep those: 27 GiB per chip of configs/lychee.py:rl,7b,v5p-64's step, 24 of gate's)."""
  import re
  import jax
  from configs import tiny
  from memrecall.models.qwen2 import QUERY_BLOCK
  from memrecall.run_builder import build_run
  from memrecall.train import trainer
  config = tiny.get_config(stage)
  config.model.remat = "full"
  # Windows of 512 tokens: attention runs in blocks of QUERY_BLOCK query rows.
  config.compressor.chunk_size, config.compressor.window = 1024, 512
  config.mesh.fsdp = 1
  run = build_run(config, jax.devices()[:1])
  step = trainer.stage_programs(run)[0]
  with jax.set_mesh(run.mesh):
    text = step.jitted.lower(*step.args).as_text()
  m = run.model
  rows = m.num_heads // m.num_kv_heads * QUERY_BLOCK
  # [layers, chunks, kv heads, query rows, keys] float32: one block's scores for every layer.
  stacked = re.findall(rf"tensor<{m.num_layers}x\d+x{m.num_kv_heads}x{rows}x(\d+)xf32>", text)
  assert [k for k in stacked if int(k) > m.head_dim] == [], stacked


@needs_libtpu
def test_a_refused_programs_figure_includes_its_arguments():
  """The TPU compiler's "required for HLO temporaries (X)" grows with the arguments: the row's
  total is X (plus what is held), its temporaries X less the arguments (counted twice before)."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from memrecall.capacity import aot
  from memrecall.train.trainer import Program
  device = topologies.get_topology_desc("v5e:1x1", "tpu").devices[:1]
  mesh = Mesh(np.array(device), ("data",))
  whole = NamedSharding(mesh, PartitionSpec())
  program = jax.jit(lambda a, b: jnp.sort(jnp.outer(b, b).ravel())[:4] + a.sum())
  rows = []
  for arguments_gib in (0.5, 3.0):
    a = jax.ShapeDtypeStruct((int(arguments_gib * 2**30) // 4,), jnp.float32, sharding=whole)
    b = jax.ShapeDtypeStruct((45000,), jnp.float32, sharding=whole)  # 7.5 GiB outer product
    rows.append(aot.compile_program(Program("p", program, (a, b)), mesh, 16 * 2**30))
  assert not any(r.compiled for r in rows)
  assert rows[1].total_gib - rows[0].total_gib == pytest.approx(2.5, abs=0.01)
  assert rows[1].temp_gib == pytest.approx(rows[0].temp_gib, abs=0.01)
  assert rows[0].total_gib == pytest.approx(rows[0].argument_gib + rows[0].temp_gib, abs=0.01)
