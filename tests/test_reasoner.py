"""Reasoner and prompts against the public reference: prompt ids, logits and greedy ids."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memrecall.method import compressor, prompts, reasoner
from memrecall.models import hf_checkpoint, qwen2 as model, sampling, tokenizer


@pytest.fixture(scope="module")
def lychee(lychee_reference, lychee_dir):
  params, config = hf_checkpoint.load_hf_checkpoint(lychee_dir, matmul_precision="highest")
  tok = tokenizer.load_tokenizer(lychee_dir, eos_ids=(2,), pad_id=0)
  meta = json.loads(str(lychee_reference["meta_json"]))
  bank = prompts.Prompts.build(tok, meta["chat_template"])
  settings = compressor.CompressorConfig.from_hf_dict(
      json.loads(str(lychee_reference["config_json"])), chunk_size=1024)
  ids, mask = compressor.chunk_document(lychee_reference["in/text_ids"][0], 1024, pad_id=0)
  memory = compressor.compress(params, config, settings, jnp.asarray(ids), jnp.asarray(mask))
  return params, config, bank, memory


def test_prompts_logits_and_greedy_ids_match_the_reference(lychee, lychee_reference):
  params, config, bank, memory = lychee
  z = lychee_reference
  assert bank.initial_memory == tuple(z["gf0/input_ids"][0][-50 - 18:-50])
  settings = reasoner.ReasonerConfig(memory_size=8, answer_tokens=8)
  greedy = sampling.SamplingConfig(eos_ids=(2,), pad_id=0)
  question, question_mask = prompts.pad_ids([z["in/question_ids"][0].tolist()])
  work = reasoner.WorkingMemory.initial(bank.initial_memory, 1,
                                        reasoner.memory_capacity(bank.initial_memory, settings))
  for chunk in range(3):
    k, v, slots = memory.k[:, chunk:chunk + 1], memory.v[:, chunk:chunk + 1], memory.slot_mask[chunk:chunk + 1]
    prompt, prompt_mask = bank.update.render(question, question_mask, work.ids, work.mask)
    np.testing.assert_array_equal(np.asarray(prompt[0])[np.asarray(prompt_mask[0])],
                                  z[f"gf{9 * chunk}/input_ids"][0])
    # The prefill's next-token logits equal the reference's (prefix unrotated, positions from C/r).
    cache = reasoner.prefix_cache(config, k, v, slots, prompt.shape[1] + 8)
    logits, _ = model.forward(params, config, prompt, prompt_mask, cache)
    np.testing.assert_allclose(logits[0, -1], z[f"gf{9 * chunk}/logits"][0], atol=2e-4, rtol=1e-4)
    work, sample, _, _ = reasoner.update_memory(params, config, bank.update, settings, greedy, k, v,
                                                slots, question, question_mask, work,
                                                jax.random.key(0))
    assert int(z[f"gf{9 * chunk}/past_len"]) == 256
  expected_memory = z["gf27/input_ids"][0][-38 - 8:-38]
  np.testing.assert_array_equal(np.asarray(work.ids[0])[np.asarray(work.mask[0])], expected_memory)
  answer, prompt, prompt_mask = reasoner.final_answer(params, config, bank.final, settings, greedy,
                                                      question, question_mask, work,
                                                      jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(prompt[0])[np.asarray(prompt_mask[0])], z["gf27/input_ids"][0])
  np.testing.assert_array_equal(answer.tokens[0], z["out/generated_ids"][0, 12:])


def test_memory_keeps_generated_tokens_without_pad_and_eos(lychee):
  params, config, bank, memory = lychee
  settings = reasoner.ReasonerConfig(memory_size=6, answer_tokens=4)
  # A likelier EOS (300) and a high temperature: some rows end early, others run on.
  params = {**params, "lm_head": params["lm_head"].at[:, 300].add(3.0)}
  hot = sampling.SamplingConfig(temperature=3.0, eos_ids=(2, 300), pad_id=0)
  question, question_mask = prompts.pad_ids([[300, 301, 302]] * 8)
  work = reasoner.WorkingMemory.initial(bank.initial_memory, 8,
                                        reasoner.memory_capacity(bank.initial_memory, settings))
  k = jnp.broadcast_to(memory.k[:, :1], (2, 8) + memory.k.shape[2:])
  v = jnp.broadcast_to(memory.v[:, :1], (2, 8) + memory.v.shape[2:])
  slots = jnp.broadcast_to(memory.slot_mask[:1], (8, memory.slot_mask.shape[1]))
  new, sample, _, _ = reasoner.update_memory(params, config, bank.update, settings, hot, k, v, slots,
                                             question, question_mask, work, jax.random.key(3))
  tokens = np.asarray(sample.tokens)
  expected = (tokens != 0) & ~np.isin(tokens, [2, 300])
  assert expected.any() and (~expected).any() and np.isin(tokens, [2, 300]).any(), tokens
  np.testing.assert_array_equal(np.asarray(new.mask)[:, :6], expected)
  assert not np.asarray(new.mask)[:, 6:].any()


def test_template_errors():
  tok = tokenizer.ByteTokenizer()
  with pytest.raises(ValueError, match="unknown slots"):
    prompts.PromptTemplate.build("{question} {context}", tok)
  with pytest.raises(ValueError, match="end with literal text"):
    prompts.PromptTemplate.build("Q: {question}", tok)
  with pytest.raises(ValueError, match="exceeds the budget"):
    prompts.pad_ids([[1, 2, 3]], length=2)
  template = prompts.PromptTemplate.build("a{question}b{memory}c", tok, prompts.QWEN2_CHAT_TEMPLATE)
  ids, mask = template.render(jnp.asarray([[7, 8]]), jnp.asarray([[True, False]]),
                              jnp.asarray([[9]]), jnp.asarray([[True]]))
  text = tok.decode(np.asarray(ids[0]))
  assert text.startswith("<|im_start|>system\nYou are Qwen") and text.endswith(
      "<|im_end|>\n<|im_start|>assistant\n")
  assert int(mask.sum()) == template.literal_length + 2
