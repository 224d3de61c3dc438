"""The reader registry: a reader defined here, registered by name, runs through evaluation's
own path; unknown names are refused with the registered ones listed."""

import json

import jax
import numpy as np
import pytest

from memrecall import readers, run_builder
from memrecall.evaluate import evaluator
from memrecall.method.prompts import pad_ids
from memrecall.models import qwen2 as model
from memrecall.readers import context
from tests.train.conftest import small_config


class FirstChunk(readers.Reader):
  """Answers from the document's first `compressor.chunk_size` tokens in one prompt."""

  summary = "reads the first chunk only"

  def inputs(self, examples, *, question_tokens, max_tokens):
    del max_tokens
    c = self.compressor.chunk_size
    first, first_mask = pad_ids([list(map(int, ex.context[:c])) for ex in examples], c)
    question, question_mask = pad_ids([ex.question for ex in examples], question_tokens)
    return first, first_mask, question, question_mask

  def call(self, params, inputs, rng):
    return context.answer_from_context, (params, self.setup, *inputs, rng)

  def answer(self, output):
    return output

  def trace(self, output):
    return None


@pytest.fixture
def first_chunk():
  readers.register("first_chunk")(FirstChunk)
  yield "first_chunk"
  readers.unregister("first_chunk")


def test_builtin_readers_are_registered_in_order():
  assert readers.names() == ("gate", "all", "topk", "memagent", "full", "rag")
  assert readers.reader_class("gate") is readers.reader_class("topk")
  assert readers.reader_class("memagent").trains and not readers.reader_class("full").trains
  assert not readers.reader_class("memagent").compressed


def test_a_registered_reader_is_evaluated_through_the_suite(tmp_path, first_chunk):
  config = small_config("sft")
  config.task.length = 32
  config.compressor.chunk_size = 16
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0))
  rows = evaluator.evaluate_suite(
      params, run, model_name="lychee", lengths=[1, 2], modes=[first_chunk], examples=2,
      batch_size=2, output_dir=str(tmp_path), baseline=evaluator.BaselineConfig(),
      latency_examples=1, log=lambda *a: None)
  assert [(r["mode"], r["length_multiple"]) for r in rows] == [(first_chunk, 1), (first_chunk, 2)]
  for r in rows:
    # No block loop: no blocks read to count (None; 0 before, as if it had read nothing).
    assert r["examples"] == 2 and 0 <= r["accuracy"] <= 100 and r["blocks_read"] is None
    assert r["gate_recall"] is None and r["latency_s"] > 0 and r["peak_bytes"] > 0  # NaN: None
  saved = json.load(open(tmp_path / "results.json"))
  assert {r["mode"] for r in saved} == {first_chunk}
  traces = json.load(open(tmp_path / "traces" / f"lychee-{first_chunk}-2x.json"))
  assert len(traces) == 2 and set(traces[0]) == {"id", "answer_ids", "gold_ids", "correct"}


def test_the_same_reader_answers_like_the_full_baseline_cut_to_one_chunk(first_chunk):
  """Its rows through `evaluate_mode` equal the `full` reader's with a budget of one chunk
  whenever the document fits in it: the registry adds no behaviour of its own."""
  config = small_config("sft")
  config.task.length = 32
  config.compressor.chunk_size = 32
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0))
  examples = [ex for ex in run.examples(0, 6) if len(ex.context) <= 32][:2]
  assert examples
  common = dict(batch_size=2, question_tokens=run.question_tokens, latency_examples=0,
                timed=False)
  mine = evaluator.evaluate_mode(params, run.recall_setup(), run.compressor, examples,
                                 run.score, mode=first_chunk, **common)
  full = evaluator.evaluate_mode(params, run.recall_setup(), run.compressor, examples,
                                 run.score, mode="full",
                                 baseline=evaluator.BaselineConfig(full_budget=32), **common)
  assert mine.rows == full.rows


def test_unknown_reader_names_are_refused_listing_the_registered(tmp_path):
  run = run_builder.build_run(small_config("sft"))
  listed = "registered: gate, all, topk, memagent, full, rag"
  with pytest.raises(readers.UnknownReaderError, match=f"unknown reader 'fast'; {listed}"):
    readers.get("fast", run.recall_setup(), run.compressor)
  with pytest.raises(ValueError, match=r"unknown mode 'fast'; registered: gate, all"):
    evaluator.evaluate_suite(None, run, model_name="m", lengths=[1], modes=["all", "fast"],
                             examples=1, batch_size=1, output_dir=str(tmp_path),
                             baseline=evaluator.BaselineConfig(), log=lambda *a: None)


def test_registering_a_taken_name_for_another_class_is_refused():
  class Other(FirstChunk):
    pass
  with pytest.raises(ValueError, match="'all' is already registered"):
    readers.register("all")(Other)
  assert readers.reader_class("all").__name__ == "MethodReader"


def _toy_trajectory(layers=6, width=64, hidden=512):
  """A block and an answer in the shape of a trajectory's: each a scan over stacked layers."""
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"up": 0.05 * jax.random.normal(keys[0], (layers, width, hidden)),
            "down": 0.05 * jax.random.normal(keys[1], (layers, hidden, width)),
            "head": 0.05 * jax.random.normal(keys[2], (width,))}

  def layers_of(params, x):  # [T, width]
    def layer(x, w):
      return x + jnp.tanh(x @ w[0]) @ w[1], None
    x = jax.lax.scan(jax.checkpoint(layer), x, (params["up"], params["down"]))[0]
    return x @ params["head"]

  block = lambda params, x: (layers_of(params, x), jnp.zeros(()))
  answer = lambda params: layers_of(params, jnp.ones((16, width)))
  xs = jax.random.normal(jax.random.key(1), (5, 16, width))
  return params, block, answer, xs


def test_blocks_then_answer_has_autodiffs_gradient_in_one_accumulator():
  """The trajectory's hand-written backward: the gradient of plain autodiff (a rematerialised
  block scan, then the answer) for every leaf or for one alone, with no float32 buffer of the
  weights' size beside the block loop's carry (JAX's rules hold the answer's gradients
  through the whole loop's backward, `trajectory.blocks_then_answer`)."""
  import jax.numpy as jnp
  from memrecall.readers import trajectory
  params, block, answer, xs = _toy_trajectory()

  def plain(params):
    outs = jax.lax.scan(jax.checkpoint(lambda c, x: (c, block(params, x))), None, xs)[1]
    return outs, answer(params)

  def loss(run, params):
    (blocks, _), final = run(params)
    return jnp.sum(jnp.sin(blocks)) + jnp.sum(final ** 2)

  ours = lambda params: trajectory.blocks_then_answer(block, answer, params, xs)
  np.testing.assert_allclose(ours(params)[1], plain(params)[1], rtol=1e-6)

  def compiled(run, head_only=False):  # the gradient program, compiled once
    if head_only:  # only the head differentiated
      grad = jax.grad(lambda head: loss(run, {**params, "head": head}))
      return jax.jit(grad).lower(params["head"]).compile()
    return jax.jit(jax.grad(lambda p: loss(run, p))).lower(params).compile()

  programs = {(name, head): compiled(run, head) for name, run in (("ours", ours), ("plain", plain))
              for head in (False, True)}
  same = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  jax.tree.map(same, programs["ours", False](params), programs["plain", False](params))
  same(programs["ours", True](params["head"]), programs["plain", True](params["head"]))
  temp = {key: program.memory_analysis().temp_size_in_bytes for key, program in programs.items()}
  stack = params["up"].nbytes + params["down"].nbytes
  assert temp["ours", False] <= temp["plain", False] - 0.75 * stack, (temp, stack)
  assert temp["ours", True] < 0.25 * stack, (temp, stack)


def test_the_methods_blocks_have_labels_only_where_the_data_names_supporting_facts():
  """A synthetic example's chunk labels; the same text without supporting facts (a `rows:` file,
  MemAgent's eval file without --hotpotqa_dev): None, so its gate recall is unknown, not 0."""
  import dataclasses
  from memrecall.data.example import tokenize
  run = run_builder.build_run(small_config("sft"))
  (labelled,) = run.examples(0, 1)
  reader = run.reader("gate")
  labels = reader.block_labels(labelled)
  np.testing.assert_array_equal(labels, labelled.chunk_labels(run.compressor.chunk_size))
  assert labels.any() and not labels.all()
  bare = tokenize(dataclasses.replace(labelled.example, supporting=(), oracle_memory=()))
  assert reader.block_labels(bare) is None
