"""A trajectory — every memory update of one question, then its answer — and its scores.

Readers that train (the method, MemAgent) walk the same loop and differ only in
what a block puts before its update prompt: compressed KV slots, or the raw
section inside the prompt.  `score_trajectory` teacher-forces every turn with
that one difference passed in (`BlockTurn`), so each reader's
`trajectory_logprobs` is a line, and the RL loss scores exactly what the reader's
rollout sampled.  A `lax.scan` over blocks whose backward pass recomputes each
block (`blocks_then_answer`) keeps activation memory to one block however many
chunks a document has (`ModelConfig.remat_blocks`).
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from memrecall.method.gate import gate_logits
from memrecall.method.prompts import PromptTemplate, Prompts
from memrecall.method.reasoner import WorkingMemory, no_prefix, prefix_cache
from memrecall.models.config import ModelConfig
from memrecall.models.qwen2 import forward, token_logprobs

Array = jax.Array
# (params, chunk ids [B, C], chunk mask [B, C]) -> (update template, (k, v, slot_mask) prefix,
# () or (section, section_mask)): what one block puts before and into its update prompt.
BlockTurn = Callable[[object, Array, Array], tuple]


@flax.struct.dataclass
class TurnBatch:
  """B trajectories over N blocks, teacher-forced.

  chunk_ids/chunk_mask:   [B, N, C] the document's chunks.
  question(_mask):        [B, Q].
  memory_ids/_mask:       [B, N, Mc] working memory *before* each block.
  targets/target_mask:    [B, N, M] tokens each block's update wrote (EOS included);
                          an all-False row means the block was not read.
  final_memory_ids/_mask: [B, Mc] memory after the last block.
  answer/answer_mask:     [B, A] the answer's tokens (EOS included).
  labels:                 [B, N] chunk relevance, for a gate trained jointly (optional).
  """
  chunk_ids: Array
  chunk_mask: Array
  question: Array
  question_mask: Array
  memory_ids: Array
  memory_mask: Array
  targets: Array
  target_mask: Array
  final_memory_ids: Array
  final_memory_mask: Array
  answer: Array
  answer_mask: Array
  labels: Array | None = None


def remat_block(body, config: ModelConfig):
  """A scan body over a document's blocks, under `jax.checkpoint` if `config.remat_blocks`."""
  return jax.checkpoint(body) if config.remat_blocks else body


def turn_logprobs(params, config: ModelConfig, template: PromptTemplate, k: Array, v: Array,
                  slot_mask: Array, question: Array, question_mask: Array, memory: WorkingMemory,
                  targets: Array, target_mask: Array, section: Array | None = None,
                  section_mask: Array | None = None, temperature: float = 1.0
                  ) -> tuple[Array, Array]:
  """Teacher-forced log-probs and entropies [B, M] of `targets` after [slots] + prompt, under
  `temperature` (`sampling.logprob_temperature`)."""
  prompt, prompt_mask = template.render(question, question_mask, memory.ids, memory.mask,
                                        section, section_mask)
  tokens = jnp.concatenate([prompt, targets], axis=1)
  mask = jnp.concatenate([prompt_mask, target_mask.astype(bool)], axis=1)
  cache = prefix_cache(config, k, v, slot_mask, tokens.shape[1])
  hidden, _ = forward(params, config, tokens, mask, cache, return_hidden=True)  # [B, P + M, E]
  p, m = prompt.shape[1], targets.shape[1]
  # The prompt ends with literal text and targets are contiguous, so token j is
  # predicted at position p - 1 + j: the head runs on those M positions only (over the
  # whole prompt its [B, P + M, V] output and gradient dwarfed the turn's other activations).
  return token_logprobs(params, config, hidden[:, p - 1:p - 1 + m], targets, temperature)


def score_trajectory(params, config: ModelConfig, prompts: Prompts, batch: TurnBatch,
                     block_turn: BlockTurn, with_gate: bool = False, temperature: float = 1.0):
  """Per-token log-probs and entropies of every turn: blocks [B, N, M] and answer [B, A],
  under `temperature`; with_gate also returns the gate's logit of every block [B, N] (on the
  same prefix).

  block_turn runs inside the block, so a compression there is differentiated (and, with
  `config.remat_blocks`, rematerialised) with the block."""

  def block(params, xs):
    ids, mask, mem_ids, mem_mask, targets, target_mask = xs
    memory = WorkingMemory(mem_ids, mem_mask)
    template, prefix, section = block_turn(params, ids, mask)
    logp, entropy = turn_logprobs(params, config, template, *prefix, batch.question,
                                  batch.question_mask, memory, targets, target_mask, *section,
                                  temperature=temperature)
    gate = (gate_logits(params, config, prompts.gate, *prefix, batch.question,
                        batch.question_mask, memory) if with_gate
            else jnp.zeros(logp.shape[:1]))
    return logp, entropy, gate

  def answer(params):
    return turn_logprobs(
        params, config, prompts.final, *no_prefix(config, batch.question.shape[0]),
        batch.question, batch.question_mask,
        WorkingMemory(batch.final_memory_ids, batch.final_memory_mask), batch.answer,
        batch.answer_mask, temperature=temperature)

  block_major = lambda x: jnp.moveaxis(x, 1, 0)
  xs = tuple(block_major(x) for x in (batch.chunk_ids, batch.chunk_mask, batch.memory_ids,
                                      batch.memory_mask, batch.targets, batch.target_mask))
  if config.remat_blocks:
    (logp, entropy, gate), (answer_logp, answer_entropy) = blocks_then_answer(
        block, answer, params, xs)
  else:  # every block's residuals kept: plain autodiff
    logp, entropy, gate = jax.lax.scan(lambda c, x: (c, block(params, x)), None, xs)[1]
    answer_logp, answer_entropy = answer(params)
  outputs = (jnp.moveaxis(logp, 0, 1), jnp.moveaxis(entropy, 0, 1)), (answer_logp, answer_entropy)
  return outputs + (gate.T,) if with_gate else outputs


def blocks_then_answer(block, answer, params, xs):
  """(`block(params, x)` for each x of xs, stacked; `answer(params)`), for the gradient of a
  rematerialised trajectory: each block recomputed in the backward pass, as `jax.checkpoint`
  on a scan's body does, but with the weight gradients summed in one buffer from the start.

  Under JAX's own rules the block loop's gradient carry starts at zero and the answer's weight
  gradients, made before the loop's backward pass, are added after it: a float32 buffer of
  the trainable weights' size held through every block's backward
  (docs/2026-12-06-compression-layer-loop.md).  Here the answer's backward runs first and its
  gradients are the carry the blocks' are added into.  Only the leaves being differentiated
  get gradients (a stage that trains the gate's adapters computes none for the backbone).
  """
  treedef = jax.tree.structure(params)
  differentiated: list[bool] = []  # per leaf of params, set while the forward rule is traced

  def primal(params, xs):
    return jax.lax.scan(lambda c, x: (c, block(params, x)), None, xs)[1], answer(params)

  def forward_rule(params, xs):
    differentiated[:] = [leaf.perturbed for leaf in treedef.flatten_up_to(params)]
    params, xs = jax.tree.map(lambda p: p.value, (params, xs))
    return primal(params, xs), (params, xs)

  def backward_rule(residuals, cotangents):
    params, xs = residuals
    (block_cts, answer_cts) = jax.tree.map(
        lambda ct: jnp.zeros(ct.shape, ct.dtype) if isinstance(ct, SymbolicZero) else ct,
        cotangents, is_leaf=lambda ct: isinstance(ct, SymbolicZero))
    flat = treedef.flatten_up_to(params)

    def with_trained(trained):  # params with the differentiated leaves replaced
      trained = iter(trained)
      return treedef.unflatten([next(trained) if d else leaf
                                for leaf, d in zip(flat, differentiated)])

    trained = [leaf for leaf, d in zip(flat, differentiated) if d]
    grads = jax.vjp(lambda t: answer(with_trained(t)), trained)[1](answer_cts)[0]

    def step(grads, x_and_ct):
      x, ct = x_and_ct
      block_grads = jax.vjp(lambda t: block(with_trained(t), x), trained)[1](ct)[0]
      return jax.tree.map(jnp.add, grads, block_grads), None

    grads = iter(jax.lax.scan(step, grads, (xs, block_cts), reverse=True)[0])
    return treedef.unflatten([next(grads) if d else None for d in differentiated]), None

  run = jax.custom_vjp(primal)
  run.defvjp(forward_rule, backward_rule, symbolic_zeros=True)
  return run(params, xs)
