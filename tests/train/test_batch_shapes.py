"""Each stage's `batch_shapes` (what launch/compile.py compiles the step for, with no data)
against the batch the stage really builds: same tree, shapes and dtypes."""

import jax
import numpy as np
import pytest

from memrecall import run_builder
from memrecall.train import state as state_lib, trainer
from tests.train.conftest import small_config


def _assert_same_layout(real, shapes):
  assert jax.tree.structure(real) == jax.tree.structure(shapes)
  for path, x, want in zip(jax.tree_util.tree_leaves_with_path(real),
                           jax.tree.leaves(real), jax.tree.leaves(shapes)):
    assert (x.shape, x.dtype) == (want.shape, want.dtype), jax.tree_util.keystr(path[0])


@pytest.mark.parametrize("stage,recall", [("compressor", True), ("compressor", False),
                                          ("sft", None), ("gate", None)])
def test_batch_shapes_match_the_built_batch(stage, recall):
  config = small_config(stage)
  if recall is not None:
    config.pretrain.recall = recall
  run = run_builder.build_run(config)
  built = trainer._STAGES[stage](run)
  batch, _ = built.batch(0, None, slice(0, 4))
  _assert_same_layout(batch, built.batch_shapes(4))


def test_rl_batch_shapes_match_a_batch_built_from_rollouts():
  run = run_builder.build_run(small_config("rl"))
  stage = trainer.RLStage(run)
  optimizer = trainer.make_optimizer(run.config)
  with jax.set_mesh(run.mesh):
    params = run.params()
    state = state_lib.create_train_state(params, run.config.train.trainable, optimizer, 0)
    stage.start(params)
    batch, _ = stage.batch(0, state, slice(0, stage.batch_size))
  _assert_same_layout(batch, stage.batch_shapes(stage.batch_size))
  # The abstract state `stage_programs` compiles the step for is the one `train` creates.
  abstract = trainer.abstract_train_state(run, optimizer)
  _assert_same_layout(state, abstract)


def test_recall_pretraining_rows_are_the_same_whichever_process_builds_them():
  """A batch built by two processes (rows 0-1 and 2-3) is the batch one process builds: each
  example's shuffles are seeded by its own global row."""
  import numpy as np
  config = small_config("compressor")
  config.pretrain.recall = True
  stage = trainer._STAGES["compressor"](run_builder.build_run(config))
  whole, _ = stage.batch(3, None, slice(0, 4))
  halves = [stage.batch(3, None, rows)[0] for rows in (slice(0, 2), slice(2, 4))]
  for one, *parts in zip(whole, *halves):
    np.testing.assert_array_equal(one, np.concatenate(parts))
  ids, _, target = whole
  half = ids.shape[1] // 2
  assert target[:, :half].sum() == 0 and target[:, half:].any()


def test_a_row_over_its_budget_names_the_setting_that_bounds_it():
  from memrecall.readers import BatchError
  config = small_config("sft")
  config.reasoner.memory_size = 1  # no oracle update of the tiny tasks fits one token and EOS
  run = run_builder.build_run(config)
  with pytest.raises(BatchError, match=r"an oracle memory update \(with EOS; "
                                       r"reasoner.memory_size\) of \d+ tokens exceeds its budget of 1"):
    trainer._STAGES["sft"](run).batch(0, None, slice(0, 4))


def test_the_gate_reads_both_memories_a_gate_mode_reader_can_hold_before_a_block():
  """Half the rows (by their id's hash): the memory of a reader that follows the labels, the
  initial memory until the first relevant block (a gate that skips what it should); the other
  half: the oracle trace's, which assumes every earlier block read (a gate that read an
  irrelevant block first).  Trained on the second alone, a precise gate read irrelevant blocks
  at length; on the first alone, a less precise one lost relevant ones."""
  import zlib
  from memrecall.train import batches
  run = run_builder.build_run(small_config("gate"))
  examples = run.examples(0, 16)
  size, initial = run.compressor.chunk_size, run.prompts.initial_memory
  batch = batches.gate_batch(examples, chunk_size=size, num_chunks=run.num_chunks,
                             question_tokens=run.question_tokens,
                             memory_capacity=run.memory_capacity, initial_memory=initial,
                             pad_id=run.model.pad_token_id)
  kinds = {"skipped": 0, "read": 0}
  for i, ex in enumerate(examples):
    labels, trace = ex.chunk_labels(size), ex.oracle_trace(size, initial)
    first = int(np.argmax(labels))
    assert labels.any()
    skipped = zlib.crc32(ex.example.id.encode()) % 2 == 0
    for n in range(len(labels)):
      held = tuple(batch.memory_ids[i, n][batch.memory_mask[i, n]])
      relevant = [c for c in range(n) if labels[c]]
      if skipped:
        want = tuple(trace[relevant[-1]]) if relevant else tuple(initial)
      else:
        want = tuple(trace[n - 1]) if n else tuple(initial)
      assert held == want, (i, n, skipped)
    np.testing.assert_array_equal(batch.labels[i, :len(labels)], labels)
    # Rows where the two memories differ before the first relevant block, of each kind.
    if first > 0 and tuple(trace[first - 1]) != tuple(initial):
      kinds["skipped" if skipped else "read"] += 1
  assert kinds["skipped"] and kinds["read"], kinds
