"""Baselines: MemAgent's raw-chunk loop, full context, BM25 retrieval."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memrecall.method import prompts, reasoner, recall
from memrecall.models import sampling
from memrecall.readers import context as baselines, memagent as memagent_reader


def _setup(model):
  return recall.RecallSetup(model=model.run.model, prompts=model.run.prompts,
                            reasoner=reasoner.ReasonerConfig(memory_size=4, answer_tokens=4),
                            recall=recall.RecallConfig(mode="all"),
                            sampling=sampling.SamplingConfig(eos_ids=(2,), pad_id=0))


def test_memagent_equals_a_plain_loop_of_section_updates(lychee_model):
  setup = _setup(lychee_model)
  rng = np.random.default_rng(0)
  chunks = jnp.asarray(rng.integers(3, 259, (1, 3, 40)), jnp.int32)
  chunk_mask = jnp.ones((1, 3, 40), bool).at[0, 2, 25:].set(False)
  question, question_mask = prompts.pad_ids([[300, 301]])
  out = memagent_reader.memagent(lychee_model.params, setup, chunks, chunk_mask, question,
                                 question_mask, jax.random.key(0))
  memory = reasoner.WorkingMemory.initial(lychee_model.run.prompts.initial_memory, 1,
                                          setup.memory_capacity)
  empty = reasoner.no_prefix(lychee_model.run.model, 1)
  for n in range(3):
    memory, _, prompt, prompt_mask = reasoner.update_memory(
        lychee_model.params, lychee_model.run.model, lychee_model.run.prompts.memagent, setup.reasoner,
        setup.sampling, *empty, question, question_mask, memory, jax.random.key(0),
        chunks[:, n], chunk_mask[:, n])
    # The raw section is inside the prompt.
    text = np.asarray(prompt[0])[np.asarray(prompt_mask[0])]
    section = np.asarray(chunks[0, n])[np.asarray(chunk_mask[0, n])]
    assert any((text[i:i + len(section)] == section).all() for i in range(len(text)))
    np.testing.assert_array_equal(out.trace.memory_ids[0, n], memory.ids[0])
  assert out.trace.read.all()


def test_answer_from_context_equals_generate_on_the_rendered_prompt(lychee_model):
  setup = _setup(lychee_model)
  context, context_mask = prompts.pad_ids([[100, 101, 102, 103]])
  question, question_mask = prompts.pad_ids([[300, 301]])
  answer = baselines.answer_from_context(lychee_model.params, setup, context, context_mask,
                                         question, question_mask, jax.random.key(0))
  memory = reasoner.WorkingMemory.initial(lychee_model.run.prompts.initial_memory, 1,
                                          setup.memory_capacity)
  prompt, mask = lychee_model.run.prompts.context.render(question, question_mask, memory.ids,
                                                     memory.mask, context, context_mask)
  expected = sampling.generate(lychee_model.params, lychee_model.run.model, prompt, mask,
                               jax.random.key(0), max_new_tokens=4, sampling=setup.sampling)
  np.testing.assert_array_equal(answer.tokens, expected.tokens)


def test_middle_truncate():
  assert baselines.middle_truncate(range(10), 4) == [0, 1, 8, 9]
  assert baselines.middle_truncate(range(10), 5) == [0, 1, 7, 8, 9]
  assert baselines.middle_truncate([1, 2], 5) == [1, 2]


def test_bm25_by_hand():
  chunks = [[1, 2, 3], [4, 4, 5], [1, 6, 7, 8, 9, 10]]
  # Term 4: df=1 of 3 -> idf = ln(1 + 2.5/1.5); only chunk 1 has it (tf 2, length 3).
  avg = 4.0
  idf4 = math.log(1 + 2.5 / 1.5)
  score1 = idf4 * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 3 / avg))
  # Term 1: df=2 -> idf = ln(1 + 1.5/2.5); chunks 0 (len 3) and 2 (len 6).
  idf1 = math.log(1 + 1.5 / 2.5)
  score0 = idf1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 3 / avg))
  score2 = idf1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 6 / avg))
  assert score1 > score0 > score2
  assert baselines.bm25_top_chunks(chunks, [4, 1], k=2) == [0, 1]
  assert baselines.bm25_top_chunks(chunks, [4, 1], k=1) == [1]
  assert baselines.bm25_top_chunks([], [1], k=3) == []
  # A query term counts as often as it occurs (rank_bm25, Lucene): terms 1 and 2 tie alone.
  chunks = [[1, 5], [2, 5], [6, 7]]
  assert baselines.bm25_top_chunks(chunks, [1, 2], k=1) == [0]
  assert baselines.bm25_top_chunks(chunks, [2, 1, 2], k=1) == [1]


def test_the_tiny_memagent_config_trains_a_raw_reader_at_its_own_learning_rate():
  """At the method's 3e-3 the raw reader's lookup never formed (3000 SFT steps: 6% accuracy);
  `configs/tiny.py:STAGE,VARIANT,TASK,memagent` gives it the 1e-3 it learns at (100%)."""
  from configs import tiny
  method, baseline = tiny.get_config("sft,full"), tiny.get_config("sft,full,multihop,memagent")
  assert (method.agent, baseline.agent) == ("lychee", "memagent")
  assert baseline.optimizer.learning_rate == 1e-3 < method.optimizer.learning_rate
  assert baseline.task.curriculum_end == 0
  assert baseline.demo.sft_steps == method.demo.sft_steps  # the same step budget
  # Everything else, the backbone first, is the method's.
  for block in ("model", "compressor", "reasoner", "prompts", "train"):
    assert baseline[block].to_dict() == method[block].to_dict(), block
  assert tiny.get_config("rl,full,multihop,memagent").agent == "memagent"
  for stage in ("compressor", "gate"):
    with pytest.raises(ValueError, match="no .* stage"):
      tiny.get_config(f"{stage},full,multihop,memagent")
