"""memrecall/capacity/hlo_report.py: kernels and all-gathered bytes per loop iteration.

A hand-written module checks the counting rules exactly; the tiny recipe's evaluation,
compiled for a deviceless TPU slice, checks what the report is for: on an fsdp mesh the
inference loops gather the weights at every step, on a data mesh they gather none.
"""

import math

import numpy as np
import pytest

from memrecall.capacity import hlo_report
from tests.conftest import needs_libtpu

MODULE = """HloModule m, is_scheduled=true

%fused_gather (param_0: bf16[4,8]) -> bf16[16,8] {
  %param_0 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[16,8]{1,0} all-gather(%param_0), dimensions={0}
}

%branch (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  %all-gather-start.2 = ((f32[2]{0}, f32[2]{0}), (f32[8]{0}, f32[8]{0})) all-gather-start(%p, %p), dimensions={0}
  ROOT %r = f32[2]{0} negate(%p)
}

%small_branch (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  %g = f32[4]{0} all-gather(%p), dimensions={0}
  ROOT %r = f32[2]{0} negate(%p)
}

%async_collective_fusion.1 (p: bf16[4,8]) -> bf16[16,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  ROOT %ag = bf16[16,8]{1,0} all-gather(%p), dimensions={0}, frontend_attributes={chain_id="7"}
}

%async_collective_fusion.2 (p: bf16[4,8]) -> bf16[16,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  ROOT %ag = bf16[16,8]{1,0} all-gather(%p), dimensions={0}, frontend_attributes={chain_id="7"}
}

%sum (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

%inner_body (t: (s32[], f32[2])) -> (s32[], f32[2]) {
  %t = (s32[], f32[2]{0}) parameter(0)
  %g = f32[64]{0} all-gather(%t), dimensions={0}, metadata={op_name="jit(f)/jit(inner)/while"}
  %rs = f32[16]{0} reduce-scatter(%g), dimensions={0}, to_apply=%sum
  ROOT %x = (s32[], f32[2]{0}) tuple(%t)
}

%inner_cond (t: (s32[], f32[2])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%body (t: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %t = (s32[], bf16[4,8]{1,0}) parameter(0), metadata={op_name="jit(f)/while/body/x"}
  %gte = bf16[4,8]{1,0} get-tuple-element(%t), index=1
  %fusion.1 = bf16[16,8]{1,0} fusion(%gte), kind=kCustom, calls=%fused_gather, metadata={op_name="jit(f)/while/body/dot"}
  %cond.1 = f32[2]{0} conditional(%gte), branch_computations={%small_branch, %branch}
  %w = (s32[], f32[2]{0}) while(%t), condition=%inner_cond, body=%inner_body
  %copy.3 = bf16[4,8]{1,0} copy(%gte)
  %all-reduce.4 = bf16[4,8]{1,0} all-reduce(%gte), replica_groups={}, to_apply=%sum
  %part.1 = bf16[16,8]{1,0} fusion(%gte), kind=kOutput, calls=%async_collective_fusion.1
  %part.2 = bf16[16,8]{1,0} fusion(%gte), kind=kOutput, calls=%async_collective_fusion.2
  ROOT %out = (s32[], bf16[4,8]{1,0}) tuple(%t)
}

%cond (t: (s32[], bf16[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: bf16[4,8]) -> bf16[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %all-gather.9 = bf16[32,8]{1,0} all-gather(%a), dimensions={0}
  %w = (s32[], bf16[4,8]{1,0}) while(%a), condition=%cond, body=%body
  ROOT %r = bf16[4,8]{1,0} copy(%a)
}
"""


def test_a_loop_counts_its_kernels_and_what_it_gathers_and_reduces_per_iteration():
  loops, outside = hlo_report.loop_report(MODULE)
  by_body = {loop.body: loop for loop in loops}
  assert sorted(by_body) == ["body", "inner_body"]
  body = by_body["body"]
  # The fusion's gather (16 x 8 bf16), the conditional's larger branch's all-gather-start
  # results (two f32[8]; a conditional runs one branch: not both, nor the first's f32[4]), and
  # one gather of 16 x 8 bf16 that the TPU compiler split over two async collective fusions
  # (one chain, counted once): the nested loop is its own row.
  assert body.gathered_bytes == 16 * 8 * 2 + (8 + 8) * 4 + 16 * 8 * 2
  # The fusions (one kernel each, whatever they call), the copy and the all-reduce; one
  # branch's all-gather-start.
  assert body.kernels == 5 + 1
  assert body.reduced_bytes == 4 * 8 * 2
  assert by_body["inner_body"].gathered_bytes == 64 * 4
  assert by_body["inner_body"].reduced_bytes == 16 * 4
  assert by_body["inner_body"].op_name == "jit(f)/jit(inner)/while"
  assert outside == 32 * 8 * 2
  # The conditional's other form (true_computation / false_computation) counts the same.
  two_way = MODULE.replace("branch_computations={%small_branch, %branch}",
                           "true_computation=%small_branch, false_computation=%branch")
  assert two_way != MODULE
  same = lambda report: [(l.body, l.kernels, l.gathered_bytes, l.reduced_bytes) for l in report]
  assert same(hlo_report.loop_report(two_way)[0]) == same(loops)


def test_array_bytes_of_tuples_and_layouts():
  assert hlo_report.array_bytes("(bf16[2,3]{1,0:T(8,128)(2,1)}, s32[], pred[4])") == 12 + 4 + 4
  assert hlo_report.array_bytes("f32[0,5]{1,0}") == 0


def _tiny(stage: str):
  """The tiny recipe at 2 layers: the per-layer patterns these tests read hold at any depth,
  and 2 layers compile in about half the time of the recipe's 4 on this suite's CPU (the chunk
  loops' test keeps 4: at 2 the compiler places one outside gather differently)."""
  from configs import tiny
  config = tiny.get_config(stage)
  config.model.num_layers = 2
  return config


def _eval_program(run, params, weights: str, batch: int, memory: int | None = None):
  """Evaluation's gate loop placed as launch/eval.py --weights=`weights` places it."""
  from memrecall.capacity import aot
  placement = aot.eval_weights(run, weights, memory)
  (program,) = aot.eval_programs(run, params, batch=batch, tokens=run.num_chunks *
                                 run.compressor.chunk_size, mode="gate", placement=placement)
  return program


@needs_libtpu
def test_an_fsdp_mesh_gathers_the_weights_at_every_decode_step():
  """The tiny recipe's evaluation compiled for a deviceless v5e:2x2 four times: with the
  parameters sharded over fsdp its costliest loop all-gathers, per iteration, the layers'
  weights on top of what it gathers with the devices on data (activations only); with the
  same fsdp mesh and the weights replicated (`evaluator.on_mesh`'s "replicated", what
  launch/eval.py --weights=auto picks where a copy fits), no more than on data; with them
  split over a tensor axis of the same devices ("tensor"), no weights either: an iteration
  all-reduces the layers' partial activations instead."""
  import jax
  from memrecall.capacity import aot, tpu_slices
  from memrecall.run_builder import build_run
  from memrecall.train import trainer
  devices = tpu_slices.deviceless_devices(tpu_slices.parse_slice("v5e:2x2"))
  gathered, reduced = {}, {}
  for name, axis, weights in (("fsdp", "fsdp", "sharded"), ("data", "data", "sharded"),
                              ("fsdp, replicated", "fsdp", "replicated"),
                              ("fsdp, tensor", "fsdp", "tensor")):
    config = _tiny("sft")
    config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, axis: 4})
    run = build_run(config, devices)
    params = trainer.stage_programs(run)[0].args[0].params
    program = _eval_program(run, params, weights, batch=4)
    row = aot.compile_program(program, run.mesh, 16 * 2**30)
    gathered[name], reduced[name] = row.loop_gather_gib * 2**30, row.loop_reduce_gib * 2**30
    if weights == "sharded":
      layers = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(program.args[0])
                if "layers" in jax.tree_util.keystr(path)]
    if weights == "tensor":  # memory unknown: the most up to fsdp's 4 that split 2 KV heads
      assert dict(program.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  layer_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in layers)
  assert gathered["fsdp"] - gathered["data"] >= layer_bytes, (gathered, layer_bytes)
  assert gathered["fsdp, replicated"] <= gathered["data"], gathered
  # Tensor's rows split over data 2, not 4: its gathers are activations, as data's are, of a
  # few rows more, and no weight.
  assert gathered["fsdp, tensor"] <= 2 * gathered["data"] < layer_bytes / 100, gathered
  # Even at the tiny model's shapes, where a prefill's activations are a sizeable part of a
  # layer, the all-reduces move under a quarter of what the fsdp loop gathers.
  assert 0 < reduced["fsdp, tensor"] < gathered["fsdp"] / 4, (reduced, gathered)
  # With the rows split over data, each device reads blocks from its own rows of the bank: a
  # loop iteration gathers less than one block of the other devices' rows (indexing the bank's
  # row axis made every iteration gather all of it).
  m, c = run.model, run.compressor
  block = 3 * (c.chunk_size // c.ratio) * m.num_layers * 2 * m.num_kv_heads * m.head_dim * (
      np.dtype(m.jnp_dtype).itemsize)
  assert gathered["data"] < block, (gathered, block)
  # And the tiny model's copy is what launch/eval.py's auto replicates on a v5e chip; on one
  # whose third holds 60% of it, auto splits it over a tensor axis of two devices.
  run = build_run(_tiny("sft"), devices)
  assert aot.eval_weights(run, "auto", 16 * 2**30).weights == "replicated"
  copy = aot.device_bytes(_eval_program(run, params, "replicated", batch=4).args[0])
  auto = aot.eval_weights(run, "auto", int(1.8 * copy))
  assert (auto.weights, dict(auto.mesh.shape)) == ("tensor", {"data": 2, "fsdp": 1, "tensor": 2})
  # Where no share fits (a third of a device under a quarter of the copy): sharded.
  assert aot.eval_weights(run, "auto", copy // 4).weights == "sharded"


@needs_libtpu
def test_the_bank_moves_to_its_rows_once_when_they_split_over_fewer_devices_than_its_chunks():
  """Two rows on data 2 x fsdp 2: the rows split over data only, compression's chunks over
  all four devices.  The bank is moved to its rows' devices once, before the recall loop:
  an iteration gathers less than one row's block (left to the loop, every iteration
  gathered the bank again)."""
  from memrecall.capacity import aot, tpu_slices
  from memrecall.run_builder import build_run
  from memrecall.train import trainer
  devices = tpu_slices.deviceless_devices(tpu_slices.parse_slice("v5e:2x2"))
  config = _tiny("sft")
  config.mesh.update({"data": 2, "fsdp": 2, "tensor": 1})
  run = build_run(config, devices)
  params = trainer.stage_programs(run)[0].args[0].params
  program = _eval_program(run, params, "replicated", batch=2)
  gathered = aot.compile_program(program, run.mesh, 16 * 2**30).loop_gather_gib * 2**30
  m, c = run.model, run.compressor
  block = (c.chunk_size // c.ratio) * m.num_layers * 2 * m.num_kv_heads * m.head_dim * (
      np.dtype(m.jnp_dtype).itemsize)
  assert gathered < block, (gathered, block)


@needs_libtpu
def test_replicated_or_tensor_rollout_weights_are_moved_once_not_gathered_at_every_step():
  """rl.rollout_weights="replicated": the RL rollout on an fsdp mesh gathers the inference
  copy once, before its loops; no loop gathers the layers' weights per iteration any more.
  "tensor": the copy is split over a tensor axis of the same devices (data 2 x tensor 2), and
  a loop iteration all-reduces activations instead of gathering weights."""
  import jax
  from memrecall.capacity import aot, tpu_slices
  from memrecall.run_builder import build_run
  from memrecall.train import trainer
  devices = tpu_slices.deviceless_devices(tpu_slices.parse_slice("v5e:2x2"))
  gathered, reduced = {}, {}
  for weights in ("sharded", "replicated", "tensor"):
    config = _tiny("rl")
    config.mesh.update({"data": 1, "fsdp": 4, "tensor": 1})
    config.rl.rollout_weights = weights
    run = build_run(config, devices)
    (rollout,) = [p for p in trainer.stage_programs(run) if p.name == "rollout"]
    compiled = aot.compile_program(rollout, run.mesh, 16 * 2**30)
    gathered[weights], reduced[weights] = compiled.loop_gather_gib, compiled.loop_reduce_gib
  params = rollout.args[0]
  # What a decode step reads of the sharded weights: every layer's split leaves but the
  # compressor's beacon projections (compression's own loop reads those), from the training
  # layout's float32 stack, gathered as the compute dtype's (2 bytes) per-layer copy.
  read = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
          if "layers" in jax.tree_util.keystr(path) and "beacon" not in jax.tree_util.keystr(path)
          and not leaf.sharding.is_fully_replicated]
  layer_bytes = sum(math.prod(x.shape) for x in read) * 2
  assert gathered["sharded"] * 2**30 >= layer_bytes, (gathered, layer_bytes)
  assert gathered["replicated"] == 0, gathered
  # Split over tensor: what a loop iteration gathers is activations (rows, under a tenth of the
  # layers' weights); what it all-reduces, the heads' and MLP columns' partial sums, is more
  # than nothing and, at the tiny model's shapes, still under the weights the sharded loop
  # gathers.
  assert gathered["tensor"] * 2**30 < layer_bytes / 10, (gathered, layer_bytes)
  assert 0 < reduced["tensor"] < gathered["sharded"], (reduced, gathered)


@needs_libtpu
# The unchunked program is the one an earlier test compiled: jax finds it in the persistent
# cache, cannot load a deviceless executable, says so and compiles it again.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
@pytest.mark.parametrize("setting,program,chunk_tokens", [
    ("mlp_chunk_tokens", "rollout", 8), ("head_chunk_tokens", "reference_logprobs", 4)])
def test_chunk_loops_gather_their_weights_once_not_per_chunk(tmp_path, setting, program,
                                                             chunk_tokens):
  """The tiny RL recipe on an fsdp mesh, its rollout's prefills' MLP in chunks
  (`model.mlp_chunk_tokens=8`) or its reference pass's LM head (`model.head_chunk_tokens=4`,
  8 rows a device x 3 written tokens: 3 chunks a turn): the chunk loops gather nothing per
  iteration (their weights are gathered before them; seen failing without that: each chunk
  gathered its layer's 48 KiB, or the 64 KiB head), and every other loop, and the program
  outside its loops, gathers what it gathers in one piece (seen failing without the MLP's
  barrier: the decode loops read a copy gathered for the prefill, per block)."""
  from configs import tiny
  from memrecall.capacity import aot, tpu_slices
  from memrecall.run_builder import build_run
  from memrecall.train import trainer
  devices = tpu_slices.deviceless_devices(tpu_slices.parse_slice("v5e:2x2"))
  reports = {}
  for tokens in (0, chunk_tokens):
    config = tiny.get_config("rl")
    config.mesh.update({"data": 1, "fsdp": 4, "tensor": 1})
    config.model[setting] = tokens
    run = build_run(config, devices)
    (compiled,) = [p for p in trainer.stage_programs(run) if p.name == program]
    out = tmp_path / str(tokens)
    out.mkdir()
    aot.compile_program(compiled, run.mesh, 16 * 2**30, hlo_dir=str(out))
    reports[tokens] = hlo_report.loop_report((out / f"{program}.hlo").read_text())
  (whole, whole_outside), (chunked, chunked_outside) = reports[0], reports[chunk_tokens]
  assert len(chunked) > len(whole)
  gathering = lambda loops: sorted(loop.gathered_bytes for loop in loops if loop.kernels > 10)
  assert gathering(chunked) == gathering(whole) and min(gathering(whole)) > 0
  chunk_loops = [loop for loop in chunked if loop.kernels <= 10]
  assert len(chunk_loops) == len(chunked) - len(whole)
  assert all(loop.gathered_bytes == 0 for loop in chunk_loops), chunk_loops
  assert chunked_outside == whole_outside
