"""The recall loop: parity with the reference, the three block sources, modes, batching, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memrecall.method import compressor, gate, prompts, reasoner, recall
from memrecall.models import sampling
from memrecall.runtime import sharding
from tests.conftest import Loaded


def _setup(model, mode="all", memory_size=8, answer_tokens=8, **kw):
  return recall.RecallSetup(
      model=model.run.model, prompts=model.run.prompts,
      reasoner=reasoner.ReasonerConfig(memory_size=memory_size, answer_tokens=answer_tokens),
      recall=recall.RecallConfig(mode=mode, **kw),
      sampling=sampling.SamplingConfig(eos_ids=(2,), pad_id=0))


@pytest.fixture(scope="module")
def document(lychee_model, lychee_reference):
  ids, mask = compressor.chunk_document(lychee_reference["in/text_ids"][0], 1024, pad_id=0)
  memory = compressor.compress(lychee_model.params, lychee_model.run.model, lychee_model.run.compressor,
                               jnp.asarray(ids), jnp.asarray(mask))
  question, question_mask = prompts.pad_ids([lychee_reference["in/question_ids"][0].tolist()])
  return ids, mask, memory, question, question_mask


def _stream_inputs(ids, mask, group):
  pad = -ids.shape[0] % group
  return (jnp.asarray(np.pad(ids, ((0, pad), (0, 0)))[:, None]),
          jnp.asarray(np.pad(mask, ((0, pad), (0, 0)))[:, None]))


def test_read_all_reproduces_the_reference_and_every_source_agrees(lychee_model, document,
                                                                   lychee_reference):
  ids, mask, memory, question, question_mask = document
  setup = _setup(lychee_model, "all", group_size=2)
  params = lychee_model.params
  bank = recall.DocumentBank.from_chunks([memory])
  on_device = recall.recall(params, setup, bank, question, question_mask, jax.random.key(0))
  np.testing.assert_array_equal(on_device.answer.tokens[0], lychee_reference["out/generated_ids"][0, 12:])
  host = recall.recall_from_host(params, setup, jax.tree.map(np.asarray, bank), question,
                                 question_mask, jax.random.key(0))
  s_ids, s_mask = _stream_inputs(ids, mask, 2)
  streamed = recall.recall_streaming(params, setup, lychee_model.run.compressor, s_ids, s_mask, question,
                                     question_mask, jax.random.key(0))
  for other in (host, streamed):
    np.testing.assert_array_equal(other.answer.tokens, on_device.answer.tokens)
    np.testing.assert_array_equal(other.trace.memory_ids[:, :3], on_device.trace.memory_ids)
    np.testing.assert_array_equal(other.trace.read[:, :3], on_device.trace.read)
  assert on_device.trace.read.all()
  # The streaming padding chunk was never read.
  assert not streamed.trace.read[0, 3]


def test_sampled_reads_agree_on_every_source(lychee_model, document):
  """At temperature 1 a block samples with a key of its own index and the answer with one split
  off before the loop: the device bank, a host bank in padded groups and streaming (more
  loop steps) write the same memories and sample the same answer."""
  ids, mask, memory, question, question_mask = document
  setup = _setup(lychee_model, "all", group_size=2)
  setup = dataclasses.replace(setup, sampling=dataclasses.replace(setup.sampling,
                                                                  temperature=1.0))
  params, key = lychee_model.params, jax.random.key(3)
  bank = recall.DocumentBank.from_chunks([memory])
  on_device = recall.recall(params, setup, bank, question, question_mask, key)
  host = recall.recall_from_host(params, setup, jax.tree.map(np.asarray, bank), question,
                                 question_mask, key)
  s_ids, s_mask = _stream_inputs(ids, mask, 2)
  streamed = recall.recall_streaming(params, setup, lychee_model.run.compressor, s_ids, s_mask,
                                     question, question_mask, key)
  for other in (host, streamed):
    np.testing.assert_array_equal(other.trace.memory_ids[:, :3], on_device.trace.memory_ids)
    np.testing.assert_array_equal(other.answer.tokens, on_device.answer.tokens)
  greedy = recall.recall(params, _setup(lychee_model, "all"), bank, question, question_mask, key)
  assert not np.array_equal(greedy.trace.memory_ids, on_device.trace.memory_ids)  # it sampled


def test_a_host_bank_of_any_length_reads_through_one_compiled_group(lychee_model, document,
                                                                   monkeypatch):
  """The last group is padded to the group size: banks of 3 and 4 blocks in groups of 2 send
  the loop groups of one shape (one compiled program), with the results of the
  device-resident bank, and progress is reported per group in real blocks."""
  _, _, memory, question, question_mask = document
  setup = _setup(lychee_model, "all", group_size=2)
  params = lychee_model.params
  shapes, loop = set(), recall._scan_blocks_jit
  def recorded(*args):
    shapes.add(jax.tree.map(lambda x: (x.shape, x.dtype), args[4]))
    return loop(*args)
  monkeypatch.setattr(recall, "_scan_blocks_jit", recorded)
  for blocks in (3, 4):  # the fixture's 3 chunks, then a fourth (the first again)
    chunks = memory
    if blocks == 4:
      chunks = compressor.ChunkMemory(k=jnp.concatenate([memory.k, memory.k[:, :1]], axis=1),
                                      v=jnp.concatenate([memory.v, memory.v[:, :1]], axis=1),
                                      slot_mask=jnp.concatenate([memory.slot_mask,
                                                                 memory.slot_mask[:1]]))
    bank = recall.DocumentBank.from_chunks([chunks])
    seen = []
    host = recall.recall_from_host(params, setup, jax.tree.map(np.asarray, bank), question,
                                   question_mask, jax.random.key(0),
                                   progress=lambda done, total: seen.append((done, total)))
    on_device = recall.recall(params, setup, bank, question, question_mask, jax.random.key(0))
    assert seen == [(2, blocks), (blocks, blocks)]
    assert host.trace.read.shape == (1, blocks)
    np.testing.assert_array_equal(host.trace.memory_ids, on_device.trace.memory_ids)
    np.testing.assert_array_equal(host.answer.tokens, on_device.answer.tokens)
  assert len(shapes) == 1, shapes


def test_gate_mode_scores_with_the_current_memory_and_skips_below_threshold(lychee_model, document):
  ids, mask, memory, question, question_mask = document
  params, config = lychee_model.params, lychee_model.run.model
  bank = recall.DocumentBank.from_chunks([memory])
  all_scores = recall.recall(params, _setup(lychee_model, "gate", threshold=0.0), bank, question,
                             question_mask, jax.random.key(0)).trace.gate_scores[0]
  # Halfway between the two lowest scores: the lowest block is skipped.  (Not
  # at a score itself: the loop's and `gate_probability`'s computations of one score may
  # differ in the last bit, and `>=` at the boundary then decides either way.)
  lowest = np.sort(np.asarray(all_scores))
  threshold = float(lowest[0] + lowest[1]) / 2
  programs = recall.recall._cache_size()
  out = recall.recall(params, _setup(lychee_model, "gate", threshold=threshold), bank, question,
                      question_mask, jax.random.key(0))
  # The threshold is traced: another threshold reuses the compiled loop.
  assert recall.recall._cache_size() == programs
  trace = out.trace
  # Recompute each block's score from the memory before it.
  memory_before = reasoner.WorkingMemory.initial(lychee_model.run.prompts.initial_memory, 1, 18)
  for c in range(3):
    expected = gate.gate_probability(params, config, lychee_model.run.prompts.gate, memory.k[:, c:c + 1],
                                     memory.v[:, c:c + 1], memory.slot_mask[c:c + 1], question,
                                     question_mask, memory_before)
    np.testing.assert_allclose(trace.gate_scores[0, c], expected[0], rtol=1e-5)
    assert bool(trace.read[0, c]) == bool(expected[0] >= threshold)
    if not trace.read[0, c]:  # a skipped block leaves the memory as it was
      np.testing.assert_array_equal(trace.memory_ids[0, c], memory_before.ids[0])
      np.testing.assert_array_equal(trace.memory_mask[0, c], memory_before.mask[0])
    memory_before = reasoner.WorkingMemory(trace.memory_ids[:, c], trace.memory_mask[:, c])
  assert 0 < int(trace.read.sum()) < 3


def test_gate_mode_streaming_equals_the_device_bank(lychee_model, document):
  """Gate mode as million-token documents run it (compressed group by group inside the loop)
  makes the device-resident bank's decisions, scores, memories and answer."""
  ids, mask, memory, question, question_mask = document
  params = lychee_model.params
  bank = recall.DocumentBank.from_chunks([memory])
  scores = recall.recall(params, _setup(lychee_model, "gate", threshold=0.0), bank, question,
                         question_mask, jax.random.key(0)).trace.gate_scores[0]
  threshold = float(np.sort(np.asarray(scores))[1])  # some blocks read, some skipped
  setup = _setup(lychee_model, "gate", threshold=threshold, group_size=2)
  on_device = recall.recall(params, setup, bank, question, question_mask, jax.random.key(0))
  s_ids, s_mask = _stream_inputs(ids, mask, 2)
  streamed = recall.recall_streaming(params, setup, lychee_model.run.compressor, s_ids, s_mask,
                                     question, question_mask, jax.random.key(0))
  n = on_device.trace.read.shape[1]
  assert 0 < int(on_device.trace.read.sum()) < n
  np.testing.assert_array_equal(streamed.trace.read[:, :n], on_device.trace.read)
  np.testing.assert_allclose(streamed.trace.gate_scores[:, :n], on_device.trace.gate_scores,
                             rtol=1e-5)
  np.testing.assert_array_equal(streamed.trace.memory_ids[:, :n], on_device.trace.memory_ids)
  np.testing.assert_array_equal(streamed.answer.tokens, on_device.answer.tokens)
  assert not streamed.trace.read[0, n:].any()  # the padding chunk
  # Sampled (gated groups, the default gate_group; every block read): each group's blocks keep
  # their document index in the key, so streaming samples the memories of the device bank.
  hot = _setup(lychee_model, "gate", threshold=0.0, group_size=2)
  hot = dataclasses.replace(hot, sampling=dataclasses.replace(hot.sampling, temperature=1.0))
  key = jax.random.key(4)
  on_device = recall.recall(params, hot, bank, question, question_mask, key)
  streamed = recall.recall_streaming(params, hot, lychee_model.run.compressor, s_ids, s_mask,
                                     question, question_mask, key)
  assert on_device.trace.read.all()  # the second streamed group's block too
  np.testing.assert_array_equal(streamed.trace.read[:, :n], on_device.trace.read)
  np.testing.assert_array_equal(streamed.trace.memory_ids[:, :n], on_device.trace.memory_ids)
  np.testing.assert_array_equal(streamed.answer.tokens, on_device.answer.tokens)


@pytest.mark.parametrize("gate_group", [3, 64])
def test_gate_groups_make_the_decisions_of_the_block_by_block_loop(lychee_model, document,
                                                                   gate_group):
  """Scoring several blocks per step against the current memory reads and writes exactly what
  the one-block-at-a-time scan does, for rows that read at different places."""
  _, _, memory, question, question_mask = document
  noise = np.random.default_rng(0)
  def variant(blocks):  # a longer document: the 3 blocks repeated, perturbed so scores differ
    picks = [c % 3 for c in range(blocks)]
    jitter = lambda x: x[:, picks] + 0.5 * noise.standard_normal(x[:, picks].shape).astype(x.dtype)
    return compressor.ChunkMemory(k=jitter(memory.k), v=jitter(memory.v),
                                  slot_mask=memory.slot_mask[jnp.asarray(picks)])
  bank = recall.DocumentBank.from_chunks([variant(11), variant(7), variant(11)])
  q, m = jnp.tile(question, (3, 1)), jnp.tile(question_mask, (3, 1))
  # A threshold at the median of the scores when every block is read (the memory changing
  # after each) makes rows read several blocks at different places.
  # (gate_group=1: the program `one` below runs, the threshold being traced)
  probe = recall.recall(lychee_model.params,
                        _setup(lychee_model, "gate", threshold=0.0, gate_group=1), bank, q, m,
                        jax.random.key(0)).trace.gate_scores
  ranked = np.sort(np.asarray(probe)[np.asarray(bank.chunk_valid).T])
  middle = len(ranked) // 2
  threshold = float(ranked[middle - 1] + ranked[middle]) / 2  # between scores: rounding can't flip
  one = recall.recall(lychee_model.params,
                      _setup(lychee_model, "gate", threshold=threshold, gate_group=1), bank, q, m,
                      jax.random.key(0))
  grouped = recall.recall(lychee_model.params,
                          _setup(lychee_model, "gate", threshold=threshold, gate_group=gate_group),
                          bank, q, m, jax.random.key(0))
  reads = np.asarray(one.trace.read)
  assert (reads.sum(axis=1) >= 2).all() and not reads.all()  # several reads, and skips
  assert not reads[1, 7:].any()  # the shorter document's padding blocks
  for name in ("gate_scores", "read", "memory_ids", "memory_mask", "update_tokens",
               "update_lengths"):
    np.testing.assert_allclose(getattr(grouped.trace, name), getattr(one.trace, name),
                               rtol=1e-5, err_msg=name)
  np.testing.assert_array_equal(grouped.answer.tokens, one.answer.tokens)
  if gate_group != 3:  # the rest compiles the same paths at any group size: checked once
    return
  # Forced decisions (benchmarks) replace the threshold the same way.
  picks = jnp.asarray(np.random.default_rng(1).random((3, 11)) < 0.3)
  forced = [recall.recall(lychee_model.params, _setup(lychee_model, "gate", gate_group=group), bank,
                          q, m, jax.random.key(0), forced_read=picks) for group in (1, gate_group)]
  np.testing.assert_array_equal(forced[1].trace.read, forced[0].trace.read)
  np.testing.assert_array_equal(forced[1].trace.read, picks & bank.chunk_valid.T)
  np.testing.assert_array_equal(forced[1].trace.memory_ids, forced[0].trace.memory_ids)
  np.testing.assert_allclose(forced[1].trace.gate_scores, forced[0].trace.gate_scores, rtol=1e-5)
  host = recall.recall_from_host(
      lychee_model.params, _setup(lychee_model, "gate", threshold=threshold,
                                  gate_group=gate_group, group_size=4),
      jax.tree.map(np.asarray, bank), q, m, jax.random.key(0))
  np.testing.assert_array_equal(host.trace.read, one.trace.read)
  np.testing.assert_array_equal(host.answer.tokens, one.answer.tokens)
  # Sampled, a row's update of the block it reads draws from that block's key, as in the
  # block-by-block loop: in groups and from a host bank in groups of 4 (keys offset by 4, 8).
  hot = lambda **kw: dataclasses.replace(
      _setup(lychee_model, "gate", threshold=threshold, **kw),
      sampling=sampling.SamplingConfig(eos_ids=(2,), pad_id=0, temperature=1.0))
  key = jax.random.key(5)
  by_block = recall.recall(lychee_model.params, hot(gate_group=1), bank, q, m, key)
  for other in (recall.recall(lychee_model.params, hot(gate_group=gate_group), bank, q, m, key),
                recall.recall_from_host(lychee_model.params,
                                        hot(gate_group=gate_group, group_size=4),
                                        jax.tree.map(np.asarray, bank), q, m, key)):
    np.testing.assert_array_equal(other.trace.read, by_block.trace.read)
    np.testing.assert_array_equal(other.trace.memory_ids, by_block.trace.memory_ids)
    np.testing.assert_array_equal(other.answer.tokens, by_block.answer.tokens)
  assert not np.array_equal(by_block.trace.memory_ids, one.trace.memory_ids)  # it sampled


def test_topk_reads_the_k_best_blocks(lychee_model, document):
  _, _, memory, question, question_mask = document
  bank = recall.DocumentBank.from_chunks([memory])
  out = recall.recall(lychee_model.params, _setup(lychee_model, "topk", topk=2), bank, question,
                      question_mask, jax.random.key(0))
  scores, read = np.asarray(out.trace.gate_scores[0]), np.asarray(out.trace.read[0])
  assert read.sum() == 2
  assert set(np.flatnonzero(read)) == set(np.argsort(-scores)[:2])
  host = recall.recall_from_host(lychee_model.params, _setup(lychee_model, "topk", topk=2,
                                                             group_size=2),
                                 jax.tree.map(np.asarray, bank), question, question_mask,
                                 jax.random.key(0))
  np.testing.assert_array_equal(host.trace.read, out.trace.read)


def test_questions_in_a_batch_are_independent(lychee_model, document, lychee_reference):
  _, _, memory, question, _ = document
  short = [500, 501, 502]
  batch_q, batch_m = prompts.pad_ids([question[0].tolist(), short])
  bank = recall.DocumentBank.from_chunks([memory])
  setup = _setup(lychee_model, "all")
  both = recall.recall(lychee_model.params, setup, bank, batch_q, batch_m, jax.random.key(0))
  alone_q, alone_m = prompts.pad_ids([short])
  alone = recall.recall(lychee_model.params, setup, bank, alone_q, alone_m, jax.random.key(0))
  np.testing.assert_array_equal(both.answer.tokens[0], lychee_reference["out/generated_ids"][0, 12:])
  np.testing.assert_array_equal(both.answer.tokens[1], alone.answer.tokens[0])
  np.testing.assert_array_equal(both.trace.memory_ids[1], alone.trace.memory_ids[0])


def test_documents_of_different_lengths_in_one_batch(lychee_model, document):
  _, _, memory, question, question_mask = document
  two = jax.tree.map(lambda x: x[:, :2] if x.ndim == 5 else x[:2], memory)
  bank = recall.DocumentBank.from_chunks([memory, two])
  assert bank.chunk_valid.tolist() == [[True, True], [True, True], [True, False]]
  q = jnp.concatenate([question, question])
  m = jnp.concatenate([question_mask, question_mask])
  out = recall.recall(lychee_model.params, _setup(lychee_model, "all"), bank, q, m, jax.random.key(0))
  assert out.trace.read.tolist() == [[True, True, True], [True, True, False]]
  alone = recall.recall(lychee_model.params, _setup(lychee_model, "all"),
                        recall.DocumentBank.from_chunks([two]), question, question_mask,
                        jax.random.key(0))
  np.testing.assert_array_equal(out.answer.tokens[1], alone.answer.tokens[0])


@pytest.mark.multidevice
def test_sharded_loop_matches_one_device(lychee_dir, document):
  from memrecall import run_builder
  ids, mask, _, question, question_mask = document
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  single = Loaded(*run_builder.load_hf_checkpoint(lychee_dir, chunk_size=1024, gate_lora_rank=4,
                                                  matmul_precision="highest"))
  sharded = Loaded(*run_builder.load_hf_checkpoint(lychee_dir, chunk_size=1024, gate_lora_rank=4,
                                                   mesh=mesh, matmul_precision="highest"))
  assert sharded.params["layers"]["mlp"]["up_kernel"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")
  setup = _setup(single, "gate", threshold=0.0)
  ids4 = np.concatenate([ids, ids[:1]])  # 4 chunks, so the chunk axis splits over data x fsdp
  mask4 = np.concatenate([mask, mask[:1]])
  expected_memory = compressor.compress(single.params, single.run.model, single.run.compressor,
                                        jnp.asarray(ids4), jnp.asarray(mask4))
  expected = recall.recall(single.params, setup, recall.DocumentBank.from_chunks([expected_memory]),
                           question, question_mask, jax.random.key(0))
  with jax.set_mesh(mesh):
    chunks = jax.device_put(jnp.asarray(ids4), sharding.logical_sharding(("chunks", None), ids4.shape, mesh))
    chunk_mask = jax.device_put(jnp.asarray(mask4), chunks.sharding)
    memory = compressor.compress(sharded.params, sharded.run.model, sharded.run.compressor, chunks, chunk_mask)
    out = recall.recall(sharded.params, setup, recall.DocumentBank.from_chunks([memory]), question,
                        question_mask, jax.random.key(0))
  np.testing.assert_allclose(memory.k, expected_memory.k, atol=1e-5)
  np.testing.assert_array_equal(out.answer.tokens, expected.answer.tokens)
  np.testing.assert_array_equal(out.trace.memory_ids, expected.trace.memory_ids)
  np.testing.assert_allclose(out.trace.gate_scores, expected.trace.gate_scores, atol=1e-5)


@pytest.mark.multidevice
def test_streaming_documents_split_over_devices_read_their_own_chunks(lychee_model, document,
                                                                    lychee_reference):
  """Two different documents streamed in groups of 2 chunks on a mesh that splits them over
  devices read what a bank of each document reads: no chunk of one reaches the other."""
  ids, mask, memory, question, question_mask = document
  other_ids, other_mask = compressor.chunk_document(lychee_reference["in/text_ids"][0][::-1], 1024,
                                                    pad_id=0)
  other = compressor.compress(lychee_model.params, lychee_model.run.model,
                              lychee_model.run.compressor, jnp.asarray(other_ids),
                              jnp.asarray(other_mask))
  setup = _setup(lychee_model, "gate", threshold=0.0, group_size=2)  # scores every chunk
  questions, question_masks = jnp.tile(question, (2, 1)), jnp.tile(question_mask, (2, 1))
  expected = recall.recall(lychee_model.params, setup, recall.DocumentBank.from_chunks(
      [memory, other]), questions, question_masks, jax.random.key(0))
  s_ids, s_mask = (jnp.concatenate(pair, axis=1) for pair in zip(
      _stream_inputs(ids, mask, 2), _stream_inputs(other_ids, other_mask, 2)))  # [4, 2, C]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  with jax.set_mesh(mesh):
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params, questions, question_masks = jax.device_put(
        (lychee_model.params, questions, question_masks), everywhere)
    streamed = recall.recall_streaming(params, setup, lychee_model.run.compressor,
                                       jax.device_put(s_ids, split), jax.device_put(s_mask, split),
                                       questions, question_masks,
                                       jax.device_put(jax.random.key(0), everywhere))
  scores = np.asarray(expected.trace.gate_scores)
  assert np.abs(scores[0] - scores[1]).min() > 1e-3  # every chunk of one differs from the other's
  np.testing.assert_allclose(streamed.trace.gate_scores[:, :3], scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(streamed.trace.memory_ids[:, :3], expected.trace.memory_ids)
  np.testing.assert_array_equal(streamed.answer.tokens, expected.answer.tokens)


def test_streaming_peak_memory_does_not_grow_with_the_document(lychee_model):
  """Compiled device memory (temporaries + arguments + outputs) in streaming mode grows with the
  document only by a few times its token ids and mask, never by its compressed memory, which a
  device-resident bank holds whole.

  The token stream is the program's argument, and the GPU image's jax 0.11.2 also lays it out
  once more (a copy of the ids and mask before the loop: 12% of this toy program's memory, a
  few bytes a token at any size); the rest is the temporaries' packing."""
  setup = _setup(lychee_model, "gate", group_size=2, memory_size=4, answer_tokens=4)
  question, question_mask = prompts.pad_ids([[300, 301, 302]])

  def peak(fn, *args):
    stats = fn.lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes

  def streaming_peak(n):
    ids = jax.ShapeDtypeStruct((n, 1, 1024), jnp.int32)
    mask = jax.ShapeDtypeStruct((n, 1, 1024), bool)
    return peak(recall.recall_streaming, lychee_model.params, setup, lychee_model.run.compressor, ids,
                mask, question, question_mask, jax.random.key(0))

  def bank_peak(n):
    bank = recall.DocumentBank(
        k=jax.ShapeDtypeStruct((n, 2, 1, 256, 2, 16), jnp.float32),
        v=jax.ShapeDtypeStruct((n, 2, 1, 256, 2, 16), jnp.float32),
        slot_mask=jax.ShapeDtypeStruct((n, 1, 256), bool),
        chunk_valid=jax.ShapeDtypeStruct((n, 1), bool))
    return peak(recall.recall, lychee_model.params, setup, bank, question, question_mask,
                jax.random.key(0))

  small, large = streaming_peak(2), streaming_peak(128)  # one group vs 64 groups
  token_bytes = 126 * 1024 * (4 + 1)  # the 126 extra chunks' int32 ids and boolean mask
  bank_bytes = 2 * 126 * (2 * 256 * 2 * 16 * 4)  # their k and v: 26x their tokens
  assert large - small <= 4 * token_bytes, (small, large)  # 0.12: 1.8x, 0.11.2: 2.8x
  assert bank_peak(128) - bank_peak(2) >= bank_bytes


def test_bad_recall_settings():
  with pytest.raises(ValueError, match="positive"):
    recall.RecallConfig(gate_group=0)
  with pytest.raises(ValueError, match="mode must be one of"):
    recall.RecallConfig(mode="some")
  with pytest.raises(ValueError, match="positive"):
    recall.RecallConfig(topk=0)
  with pytest.raises(ValueError, match="no documents"):
    recall.DocumentBank.from_chunks([])


def test_streaming_refuses_topk_and_ragged_groups(lychee_model):
  question, question_mask = prompts.pad_ids([[300]])
  ids = jnp.zeros((3, 1, 1024), jnp.int32)
  with pytest.raises(ValueError, match="topk mode needs every block"):
    recall.recall_streaming(lychee_model.params, _setup(lychee_model, "topk"),
                            lychee_model.run.compressor, ids, ids > 0, question, question_mask,
                            jax.random.key(0))
  with pytest.raises(ValueError, match="not a multiple of group_size"):
    recall.recall_streaming(lychee_model.params, _setup(lychee_model, "all", group_size=2),
                            lychee_model.run.compressor, ids, ids > 0, question, question_mask,
                            jax.random.key(0))
