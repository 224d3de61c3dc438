"""The gate: one prompt per memory state, a scoring token per chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memrecall.method import compressor, gate, prompts, reasoner
from memrecall.models.qwen2 import Qwen2, forward, init_cache, slots_to_cache


@pytest.fixture(scope="module")
def inputs(lychee_model, lychee_reference):
  ids, mask = compressor.chunk_document(lychee_reference["in/text_ids"][0], 1024, pad_id=0)
  memory = compressor.compress(lychee_model.params, lychee_model.run.model, lychee_model.run.compressor,
                               jnp.asarray(ids), jnp.asarray(mask))  # 3 chunks
  question, question_mask = prompts.pad_ids([lychee_reference["in/question_ids"][0].tolist()] * 3)
  working = reasoner.WorkingMemory(jnp.asarray([[5, 6, 7, 0], [8, 0, 9, 0], [5, 6, 0, 0]]),
                                   jnp.asarray([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0]], bool))
  return memory, question, question_mask, working


def _chunks_after_the_prompt(model, memory, question, question_mask, working):
  """The same computation laid out the other way: the prompt first, then the chunk's slots
  written into the cache by hand (causality keeps the prompt from seeing them), then the
  scoring token."""
  config, params = model.run.model, model.params
  prompt, prompt_mask = model.run.prompts.gate.render(question, question_mask, working.ids, working.mask)
  batch, length = prompt.shape
  slots = memory.k.shape[2]
  cache = init_cache(config, batch, length - 1 + slots + 1)
  cache = cache.replace(next_position=jnp.full((batch,), slots, jnp.int32))
  _, cache = forward(params, config, prompt[:, :-1], prompt_mask[:, :-1], cache, use_lora=True)
  at = length - 1
  cache = cache.replace(
      k=cache.k.at[:, :, :, at:at + slots].set(slots_to_cache(config, memory.k)),  # [L, B, K, S, D]
      v=cache.v.at[:, :, :, at:at + slots].set(slots_to_cache(config, memory.v)),
      key_mask=cache.key_mask.at[:, at:at + slots].set(memory.slot_mask), index=jnp.asarray(at + slots))
  hidden, _ = forward(params, config, prompt[:, -1:], prompt_mask[:, -1:], cache, use_lora=True,
                      return_hidden=True)
  return Qwen2(config).apply({"params": params}, hidden[:, 0], method=Qwen2.gate_logit)


def test_scoring_token_reads_the_prompt_and_the_chunk(lychee_model, inputs):
  memory, question, question_mask, working = inputs
  args = (lychee_model.params, lychee_model.run.model, lychee_model.run.prompts.gate)
  logits = gate.gate_logits(*args, memory.k, memory.v, memory.slot_mask, question, question_mask,
                            working)
  np.testing.assert_allclose(
      logits, _chunks_after_the_prompt(lychee_model, memory, question, question_mask, working),
      rtol=1e-5, atol=1e-5)
  # Each input counts: the chunk, the memory (each row's differs) and the question.
  other_chunk = gate.gate_logits(*args, memory.k[:, ::-1], memory.v[:, ::-1],
                                 memory.slot_mask[::-1], question, question_mask, working)
  same_memory = gate.gate_logits(*args, memory.k, memory.v, memory.slot_mask, question,
                                 question_mask, jax.tree.map(lambda x: x[:1].repeat(3, 0), working))
  assert np.abs(np.asarray(other_chunk - logits))[[0, 2]].min() > 1e-4
  assert np.abs(np.asarray(same_memory - logits))[1:].min() > 1e-4
  # Invalid slots are never read.
  masked = memory.slot_mask.at[:, -1].set(False)
  noisy_k = memory.k.at[:, :, -1].add(3.0)
  np.testing.assert_allclose(
      gate.gate_logits(*args, memory.k, memory.v, masked, question, question_mask, working),
      gate.gate_logits(*args, noisy_k, memory.v, masked, question, question_mask, working),
      rtol=1e-6)


def test_one_prompt_scores_many_chunks(lychee_model, inputs):
  memory, question, question_mask, working = inputs
  config, params = lychee_model.run.model, lychee_model.params
  context = gate.gate_context(params, config, lychee_model.run.prompts.gate, question[:2],
                              question_mask[:2], jax.tree.map(lambda x: x[:2], working),
                              slots=memory.k.shape[2])
  # Row 0 against chunks 0, 1, 2 and row 1 against the same three, in one call.
  chunks = jnp.asarray([0, 1, 2, 0, 1, 2])
  grouped = gate.score_chunks(params, config, context, memory.k[:, chunks],
                              memory.v[:, chunks], memory.slot_mask[chunks])
  for row in range(2):
    for c in range(3):
      alone = gate.gate_logits(params, config, lychee_model.run.prompts.gate, memory.k[:, c:c + 1],
                               memory.v[:, c:c + 1], memory.slot_mask[c:c + 1],
                               question[row:row + 1], question_mask[row:row + 1],
                               jax.tree.map(lambda x: x[row:row + 1], working))
      np.testing.assert_allclose(grouped[3 * row + c], alone[0], rtol=1e-5, atol=1e-5)


def test_an_untrained_relevance_head_is_warned_of_for_the_modes_that_read_by_it():
  """All-zero `gate_head` (no gate stage trained it): every chunk scores the same, said for
  gate and topk wherever the library evaluates (notebooks included), not for other modes."""
  import warnings
  zeros = {"gate_head": np.zeros((4,), np.float32)}
  with pytest.warns(UserWarning,
                    match="mode\\(s\\) gate,topk: the gate's relevance head is all zeros"):
    assert gate.warn_if_untrained(zeros, ["all", "gate", "topk"])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not gate.warn_if_untrained(zeros, ["all", "memagent"])
    assert not gate.warn_if_untrained({"gate_head": np.ones((4,), np.float32)}, ["gate"])
    assert not gate.warn_if_untrained({}, ["gate"])  # no gate at all: refused elsewhere
