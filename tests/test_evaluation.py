"""Evaluation: every mode at 1x, 8x and 64x the training length, resumable results and plots."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from memrecall import run_builder
from memrecall.evaluate import evaluator, report
from memrecall.models import qwen2 as model
from tests import forked_launchers
from tests.conftest import cpu_env
from tests.train.conftest import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(script: str, *flags: str, devices: int = 1):
  """`python launch/SCRIPT FLAGS` from the repository root on `devices` CPU devices."""
  return forked_launchers.run(os.path.join(ROOT, "launch", script), flags, cpu_env(devices),
                              cwd=ROOT, timeout=600)


def test_every_mode_at_two_lengths_with_plots(tmp_path):
  config = small_config("sft")
  config.task.length = 32  # one chunk; 64x = 2048 tokens
  config.compressor.chunk_size = 32
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0))
  baseline = evaluator.BaselineConfig(memagent_chunk=32, full_budget=128, rag_topk=2, rag_chunk=32)
  # Batches of one: a question timed alone runs the batches' compiled program (one compile per
  # mode and length, not two).
  kwargs = dict(model_name="lychee", lengths=[1, 64], examples=2, batch_size=1,
                latency_examples=1, output_dir=str(tmp_path), baseline=baseline,
                log=lambda *a: None)
  rows = evaluator.evaluate_suite(params, run, modes=list(evaluator.MODES), **kwargs)
  assert len(rows) == 12
  assert {(r["mode"], r["context_tokens"]) for r in rows} == {
      (m, t) for m in evaluator.MODES for t in (32, 2048)}
  for r in rows:
    assert 0 <= r["accuracy"] <= 100 and r["peak_bytes"] > 0
    assert r["latency_s"] > 0 and r["batched_s"] > 0
  by = {(r["mode"], r["length_multiple"]): r for r in rows}
  assert by[("all", 64)]["blocks_read"] == 64 and by[("memagent", 64)]["blocks_read"] == 64
  assert by[("topk", 64)]["blocks_read"] == 4  # RecallConfig's default budget
  assert by[("rag", 64)]["blocks_read"] is None and by[("full", 64)]["blocks_read"] is None
  # Resuming recomputes nothing; the files hold every row.
  again = evaluator.evaluate_suite(params, run, modes=["all", "gate"], **kwargs)
  assert json.dumps(again) == json.dumps(rows)
  # Rows timed on other devices are not reused (keys.json names them).
  keys_path = tmp_path / "keys.json"
  keys = json.load(open(keys_path))
  (key,) = keys.values()
  assert key["timed_on"] == f"1 x {jax.local_devices()[0].device_kind}"
  kept = keys_path.read_text()
  keys_path.write_text(json.dumps({g: {**k, "timed_on": "8 x NVIDIA H100 80GB HBM3"}
                                   for g, k in keys.items()}))
  with pytest.raises(Exception, match="timed_on"):
    evaluator.evaluate_suite(params, run, modes=["all"], **kwargs)
  keys_path.write_text(kept)
  assert len(json.load(open(tmp_path / "results.json"))) == 12
  assert open(tmp_path / "results.csv").read().count("\n") == 13
  plots = report.plot(rows, str(tmp_path))
  assert len(plots) == 3
  for path, labels in plots.items():
    assert os.path.getsize(path) > 1000
    assert sorted(labels) == sorted(f"lychee {m}" for m in evaluator.MODES)
  traces = json.load(open(tmp_path / "traces" / "lychee-gate-64x.json"))
  assert len(traces) == 2 and len(traces[0]["gate_scores"]) == 64
  # A data evaluation would rewrite results.json, where the sweep's rows live: refused.
  written = open(tmp_path / "results.json").read()
  with pytest.raises(ValueError, match="holds a synthetic sweep's results"):
    evaluator.evaluate_data(params, run, [], modes=["all"], output_dir=str(tmp_path))
  assert open(tmp_path / "results.json").read() == written
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "results.json").write_text(json.dumps(
      [{"model": "lychee", "data": "rows.json", "mode": "all", "num_docs": None}]))
  with pytest.raises(ValueError, match="holds a data evaluation's results"):
    evaluator.evaluate_suite(params, run, modes=["all"], **{**kwargs,
                                                            "output_dir": str(tmp_path / "data")})


def test_latency_is_timed_one_question_at_a_time():
  calls = []
  def prepare(group, first=0):
    calls.append(len(group))
    return jax.jit(lambda x: x + 1), (np.zeros(3),)
  examples = list(range(5))
  latency = evaluator._latency_alone(prepare, examples, 3)
  assert calls == [1, 1, 1] and latency > 0  # each timed 3 times; the first compiled untimed
  groups, seconds, _ = evaluator._in_batches(prepare, examples, 2)
  assert calls[3:] == [2, 2, 2] and [g for g, _ in groups] == [[0, 1], [2, 3], [4]]
  assert np.isnan(evaluator._latency_alone(prepare, examples, 0))


def test_latency_keeps_each_questions_fastest_run(monkeypatch):
  """A stray pause (here the first two of three runs) does not move the latency: the mean of
  each question's fastest run, on a clock that each run advances by its duration."""
  import types
  from memrecall.evaluate import timing
  clock = [0.0]
  monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  # The untimed compile, then 3 runs of each of 3 questions: fastest 0.02, 0.03, 0.01.
  durations = iter([0.0] + [0.06, 0.06, 0.02] + [0.03, 0.05, 0.04] + [0.01, 0.09, 0.02])
  def run():
    clock[0] += next(durations)
  latency = evaluator._latency_alone(lambda group, first=0: (run, ()), list(range(3)), 3)
  assert latency == pytest.approx(0.02)


def test_evaluation_shards_the_weights_as_training_does():
  """`on_mesh` places the recall loop's per-layer weights by training's rules: each layer's
  sharding is the stacked tree's less its (replicated) layer axis, and the rest is the same."""
  import flax.traverse_util
  config = small_config("sft")
  config.mesh.fsdp, config.mesh.tensor = 2, 2
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0), None)  # on one device
  placed, setup, mesh = evaluator.on_mesh(params, run.recall_setup("all"), run.mesh)
  assert not setup.model.scan_layers and mesh is run.mesh
  training = flax.traverse_util.flatten_dict(run.param_shardings())
  leaves = flax.traverse_util.flatten_dict(placed)
  split = 0
  for path, leaf in leaves.items():
    if path[0].startswith("layers_"):
      want = training[("layers",) + path[1:]].spec
      assert want[0] is None and tuple(leaf.sharding.spec) == tuple(want[1:]), path
    else:
      assert leaf.sharding.spec == training[path].spec, path
    assert leaf.sharding.mesh == run.mesh
    split += any(axis is not None for axis in leaf.sharding.spec)
  assert split > len(leaves) // 2, (split, len(leaves))  # most are split over fsdp or tensor


def test_replicated_and_tensor_weights_answer_as_the_sharded_ones(monkeypatch):
  """--weights=replicated puts a whole copy on every device of an fsdp x tensor mesh, and
  --weights=tensor splits it over a tensor axis of two (the mesh re-formed as data 2 x tensor
  2: the most devices up to fsdp x tensor that split the tiny model's 2 KV heads); both
  answer every question as the sharded weights do.  auto replicates where a device reports
  memory for three copies, splits over a tensor axis where a third holds a share, and keeps
  them sharded where the device reports no memory (CPUs)."""
  from memrecall.models import placement
  from memrecall.runtime import sharding
  config = small_config("sft")
  config.task.length = 32
  config.compressor.chunk_size = 32
  config.mesh.fsdp, config.mesh.tensor = 2, 2
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0), run.mesh)
  setup = run.recall_setup("all")
  placed, layer_setup, mesh = evaluator.on_mesh(params, setup, run.mesh, "replicated")
  assert mesh is run.mesh
  for leaf in jax.tree.leaves(placed):
    assert leaf.sharding.mesh == run.mesh and leaf.sharding.is_fully_replicated
  split, _, tensor_mesh = evaluator.on_mesh(params, setup, run.mesh, "tensor")
  assert dict(tensor_mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert {d.id for d in tensor_mesh.devices.flat} == {d.id for d in run.mesh.devices.flat}
  assert any("tensor" in leaf.sharding.spec for leaf in jax.tree.leaves(split))
  examples = run.examples(0, 4)
  common = dict(batch_size=4, question_tokens=run.question_tokens, latency_examples=0,
                timed=False, mesh=run.mesh)
  answers = {weights: evaluator.evaluate_mode(params, setup, run.compressor, examples,
                                              run.score, mode="gate", weights=weights,
                                              **common).rows
             for weights in ("sharded", "replicated", "tensor")}
  assert answers["sharded"] == answers["replicated"] == answers["tensor"]
  copy = sum(x.nbytes for x in jax.tree.leaves(placed))
  model_config = layer_setup.model  # the per-layer layout's
  assert placement.placement(placed, model_config, run.mesh).weights == "sharded"  # no memory
  monkeypatch.setattr(sharding, "device_memory", lambda device: 3 * copy)
  chosen = placement.placement(placed, model_config, run.mesh)
  assert chosen.weights == "replicated"
  assert chosen.line.startswith("weights replicated over 4 device(s), "), chosen.line
  auto, _, _ = evaluator.on_mesh(params, setup, run.mesh)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(auto))
  monkeypatch.setattr(sharding, "device_memory", lambda device: 3 * copy - 1)
  chosen = placement.placement(placed, model_config, run.mesh)
  assert chosen.weights == "tensor" and chosen.line.startswith(
      "weights tensor over 4 device(s) as data 2 x tensor 2, "), chosen.line


def test_runs_score_uses_the_shared_metric():
  from memrecall.data import example as example_lib
  from memrecall.models.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  run = run_builder.build_run(small_config("sft"))
  ids = example_lib.tokenize(example_lib.Example("q", "t", ((5, 6, 7),), (), (5,), ((5, 6),)))
  assert run.score([5, 6], ids) == {"em": 1.0, "sub_em": 1.0, "strict_sub_em": 1.0}
  assert run.score([5], ids)["sub_em"] == 0.0
  # Text: MemAgent's sub-EM (containment after normalisation) beside the strict form; the
  # golds are the example's own strings, not a decoding of their ids.
  text = dataclasses.replace(run, task=None)
  ex = example_lib.tokenize(example_lib.Example("q", "t", ("ctx",), (), "q?", ("Paris", "Lyon")), tok)
  assert text.score(tok.encode("It is Paris."), ex) == {"em": 0.0, "sub_em": 1.0,
                                                        "strict_sub_em": 1.0}
  assert text.score(tok.encode("the"), ex) == {"em": 0.0, "sub_em": 1.0, "strict_sub_em": 0.0}
  assert text.reward(tok.encode("the"), ex) == 0.0  # the RL default is strict


def test_eval_launcher_errors(tmp_path):
  proc = _launch("eval.py", "--config=configs/tiny.py:sft", f"--checkpoint={tmp_path}")
  assert proc.returncode != 0 and "has no checkpoints/ directory" in proc.stderr


def test_analysis_draws_one_question(tmp_path):
  from memrecall.evaluate import traces
  trace = {"id": "q", "correct": 1.0, "gate_scores": [0.1, 0.9, None, 0.7],
           "read": [False, True, False, True], "relevant": [False, True, False, False],
           "memory_ids": [[1], [2, 3], [2, 3], [4]]}
  assert traces.memory_changes(trace) == [(0, [1]), (1, [2, 3]), (3, [4])]
  path = tmp_path / "traces.json"
  path.write_text(json.dumps([trace]))
  loaded = traces.load_trace(str(path), 0)
  png = traces.plot_question(loaded, str(tmp_path / "q.png"), decode=lambda ids: str(ids))
  assert os.path.getsize(png) > 1000
  with pytest.raises(IndexError, match="holds 1 traced questions"):
    traces.load_trace(str(path), 3)


def _untrained_workdir(directory, config) -> None:
  """A training workdir holding one checkpoint of `config`'s random parameters (no training)."""
  from memrecall.runtime.checkpoint import Checkpointer
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0), None)
  checkpointer = Checkpointer(str(directory), save_every=1, keep=1, async_save=False)
  checkpointer.save(1, {"params": params, "step": np.int32(1)},
                    json.loads(config.to_json_best_effort()), {"step": 1}, force=True)
  checkpointer.close()


def test_launchers_evaluate_with_the_runs_own_threshold_and_precision(tmp_path):
  """--threshold and --matmul_precision left out mean the run's own (gate.threshold,
  model.matmul_precision), not the flags' former defaults 0.5 and `default`."""
  config = small_config("sft")
  config.gate.threshold = 0.75  # the fresh gate scores every block 0.5: none passes
  config.model.matmul_precision = "highest"
  _untrained_workdir(tmp_path / "run", config)
  launch = lambda script, *flags: _launch(script, f"--checkpoint={tmp_path / 'run'}", *flags)
  proc = launch("eval.py", "--lengths=1", "--examples=2", "--modes=gate", "--batch_size=2",
                "--latency_examples=0", f"--output_dir={tmp_path / 'eval'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "relevance head is all zeros" in proc.stderr  # no gate stage trained it: said
  key, = json.load(open(tmp_path / "eval" / "keys.json")).values()
  assert (key["threshold"], key["matmul_precision"]) == (0.75, "highest")  # resolved, not null
  doc = tmp_path / "doc.json"
  doc.write_text(json.dumps([300 + (i % 60) for i in range(100)]))
  out = tmp_path / "answer.json"
  # One checkpoint's folder names the run too.
  proc = launch("answer.py", f"--document={doc}", "--question_ids=261,300,278", "--mode=gate",
                f"--output_json={out}", f"--checkpoint={tmp_path / 'run' / 'checkpoints' / '1'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "relevance head is all zeros" in proc.stderr
  trace = json.load(open(out))["trace"]
  assert max(t["gate_score"] for t in trace) >= 0.5  # 0.5 would read a block
  assert not any(t["read"] for t in trace)


def test_tables_leave_a_latency_that_was_not_measured_blank():
  """--latency_examples=0 (allowed) gives no latency: null in results.json, blank in the tables."""
  row = report.json_safe({"model": "m", "task": "t", "mode": "all", "length_multiple": 1,
                          "context_tokens": 64, "examples": 2, "accuracy": 50.0, "stderr": 1.0,
                          "latency_s": float("nan"), "blocks_read": 2.0})
  assert row["latency_s"] is None
  assert "50.0" in report.table([row]) and "| 50.0 | 1.0 |  |" in report.markdown_table([row])


def test_config_sweep_takes_the_size_flags(tmp_path):
  """--config replaces the checkpoint's config, and --chunk_size, --memory_size and
  --answer_tokens still apply to it (they were dropped: only --question_tokens was kept).
  One checkpoint's folder as --checkpoint writes beside the workdir's other results
  (WORKDIR/eval_stepN), not into orbax's folder."""
  _untrained_workdir(tmp_path / "run", small_config("sft"))
  shapes = ["--config.model.num_layers=2", "--config.task.length=64", "--config.mesh.fsdp=1"]
  proc = _launch(
      "eval.py", f"--checkpoint={tmp_path / 'run' / 'checkpoints' / '1'}",
      "--config=configs/tiny.py:sft", *shapes, "--chunk_size=32", "--memory_size=6",
      "--answer_tokens=5", "--question_tokens=4", "--lengths=1", "--examples=2", "--modes=all",
      "--batch_size=2", "--latency_examples=0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "relevance head" not in proc.stderr  # mode all reads no gate: nothing to say
  assert "eval" not in os.listdir(tmp_path / "run" / "checkpoints" / "1")
  key, = json.load(open(tmp_path / "run" / "eval_step1" / "keys.json")).values()
  assert [key[k] for k in ("chunk_size", "memory_size", "answer_tokens", "question_tokens")] == [
      32, 6, 5, 4]


def test_a_pod_runs_workdir_is_evaluated_on_the_devices_this_process_has(tmp_path):
  """A run trained on fsdp=4, evaluated by a process with 2 devices: without --mesh the run's
  mesh does not fit, so eval.py puts its 2 devices on fsdp and says so; an explicit --mesh it
  cannot form stays a one-line error."""
  config = small_config("sft")
  config.mesh.fsdp = 4
  _untrained_workdir(tmp_path / "run", config)
  launch = lambda *flags: _launch(
      "eval.py", f"--checkpoint={tmp_path / 'run'}", "--lengths=1", "--examples=2",
      "--modes=all", "--batch_size=2", "--latency_examples=0", f"--output_dir={tmp_path / 'eval'}",
      *flags, devices=2)
  proc = launch()
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "the run's mesh does not fit this process" in proc.stderr
  assert "its 2 device(s) on fsdp instead" in proc.stderr
  assert "weights sharded over 2 device(s)" in proc.stdout
  assert json.load(open(tmp_path / "eval" / "results.json"))[0]["mode"] == "all"
  proc = launch("--mesh=fsdp=4")
  assert proc.returncode == 2 and "needs 4 devices" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("unlabelled", [(), (2, 3), (0, 1, 2, 3)])
def test_reported_metrics_are_the_rows_means_and_counts(unlabelled):
  """accuracy, its standard error, blocks read, gate recall and skip rate against hand counts,
  through `evaluate_mode` with a reader whose answers and reads are scripted.  Gate recall and
  the skip rate count the rows with labels only (data without supporting facts has none), and
  are NaN when no row has them."""
  import types
  from memrecall import readers
  from memrecall.models.sampling import SampleOutput

  # Per question: answer ids, the blocks read, the relevant blocks (4 blocks each).
  answers = [[5], [6, 7], [5], [9]]
  reads = [[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]
  relevant = [[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0]]

  class Scripted(readers.Reader):
    def inputs(self, examples, *, question_tokens, max_tokens):
      return (np.asarray([ex.row for ex in examples], np.int32),)

    def call(self, params, inputs, rng):
      tokens = np.zeros((4, 3), np.int32)
      for i, a in enumerate(answers):
        tokens[i, :len(a)] = a
      table = (jax.numpy.asarray(tokens), jax.numpy.asarray([len(a) for a in answers]),
               jax.numpy.asarray(reads, bool))
      program = jax.jit(lambda rows: jax.tree.map(lambda x: x[rows], table))
      return program, inputs

    def answer(self, output):
      tokens, lengths, _ = output
      return SampleOutput(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32),
                          lengths=lengths, done=np.ones(len(lengths), bool))

    def trace(self, output):
      return types.SimpleNamespace(read=output[2])

    def block_labels(self, example):
      return None if example.row in unlabelled else np.asarray(relevant[example.row], bool)

  readers.register("scripted")(Scripted)
  try:
    run = run_builder.build_run(small_config("sft"))
    params = model.init_params(run.model, jax.random.key(0))
    examples = [types.SimpleNamespace(row=i, context=np.zeros(8, np.int32)) for i in range(4)]
    gold = [[5], [6], [5], [8]]  # exact answers: rows 0 and 2
    score = lambda predicted, ex: {"sub_em": float(predicted == gold[ex.row])}
    result = evaluator.evaluate_mode(params, run.recall_setup("all"), run.compressor, examples,
                                     score, mode="scripted", batch_size=2, latency_examples=0,
                                     timed=False)
  finally:
    readers.unregister("scripted")
  assert result.accuracy == pytest.approx(50.0)
  assert result.stderr == pytest.approx(100 * np.std([1, 0, 1, 0], ddof=1) / 2)
  assert result.blocks_read == pytest.approx((2 + 4 + 0 + 1) / 4)
  if not unlabelled:
    assert result.gate_recall == pytest.approx((1 + 2 + 0 + 1) / (1 + 2 + 2 + 1))
    assert result.skip_rate == pytest.approx(1 - 7 / 16)
  elif len(unlabelled) == 2:  # rows 0 and 1 alone
    assert result.gate_recall == pytest.approx((1 + 2) / (1 + 2))
    assert result.skip_rate == pytest.approx(1 - (2 + 4) / 8)
  else:
    assert np.isnan(result.gate_recall) and np.isnan(result.skip_rate)


def test_eval_launcher_runs_memagents_harness_protocol(tmp_path):
  """--prompts=memagent_recurrent --temperature --top_p --seed reach the evaluation: the rows
  are keyed by the harness's answer extraction and the samples' seed."""
  from tests.conftest import LYCHEE_TEXT
  proc = _launch(
      "eval.py", f"--hf_checkpoint={os.path.join(LYCHEE_TEXT, 'hf')}",
      f"--data=rows:{os.path.join(LYCHEE_TEXT, 'rows.json')}", "--limit=1", "--modes=memagent",
      "--prompts=memagent_recurrent", "--chunk_size=1024", "--memory_size=4",
      "--answer_tokens=4", "--temperature=0.7", "--top_p=0.95", "--seed=3",
      f"--output_dir={tmp_path / 'eval'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  key, = json.load(open(tmp_path / "eval" / "keys.json")).values()
  assert key["answer_scoring"].endswith("after 'the answer is'") and key["sample_seed"] == 3
