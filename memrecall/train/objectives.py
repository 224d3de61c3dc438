"""The stages' objectives, all differentiable end to end through the compressed memory.

Every memory-update turn of every question is teacher-forced by the run's reader
(`memrecall.readers`, `Reader.trajectory_logprobs`): for the method the chunk is
compressed (with gradients), its slots prefix the update prompt rendered from
the memory *before* the chunk, and the log-probabilities of the tokens the
turn wrote are read off.  SFT maximises those log-probabilities on oracle
traces; RL weights them with advantages (PPO clip + KL); the gate is a BCE on
per-chunk labels.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from memrecall.method.compressor import CompressorConfig, compress, compressor_hidden
from memrecall.method.gate import gate_logits
from memrecall.method.prompts import Prompts
from memrecall.method.reasoner import WorkingMemory
from memrecall.models.config import ModelConfig
from memrecall.models.qwen2 import token_logprobs
from memrecall.readers import Reader
from memrecall.readers.trajectory import (TurnBatch, remat_block,  # noqa: F401  (re-exported)
                                          turn_logprobs)
from memrecall.train import grpo
from memrecall.train.state import LOSS_WEIGHT, Ratio

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What the objectives need to know statically.

  reader: the `memrecall.readers.Reader` the run trains: its `trajectory_logprobs` says
  what a block puts before its update (compressed KV, or the raw section in the prompt).
  """
  model: ModelConfig
  compressor: CompressorConfig
  prompts: Prompts
  reader: Reader

  @classmethod
  def of_run(cls, run) -> "TrainSetup":
    """The setup of a `run_builder.Run` (its model, compressor, prompts and agent's reader)."""
    return cls(run.model, run.compressor, run.prompts, reader=run.reader())


def trajectory_logprobs(params, setup: TrainSetup, batch: TurnBatch, with_gate: bool = False,
                        temperature: float = 1.0):
  """Per-token log-probs and entropies of every turn: blocks [B, N, M] and answer [B, A],
  under `temperature`; with_gate also returns the gate's logit of every block [B, N] (same
  compressed chunks)."""
  return setup.reader.trajectory_logprobs(params, batch, with_gate, temperature)


def _turn_rows(blocks: Array, answer: Array) -> Array:
  """[B, N, M] and [B, A] -> [B*N + B, max(M, A)]: one row per turn, each block's update
  then each answer, zero-padded.  A sequence-level aggregation's sequence is a turn, as in
  verl's multi-conversation batches, where every memory update is a sample of its own."""
  b, n, m = blocks.shape
  width = max(m, answer.shape[1])
  pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
  return jnp.concatenate([pad(blocks.reshape(b * n, m)), pad(answer)], axis=0)


def trajectory_mask(batch: TurnBatch) -> Array:
  """Which tokens of `_turn_rows` were written [B*N + B, max(M, A)]."""
  return _turn_rows(batch.target_mask, batch.answer_mask).astype(jnp.float32)


def sft_loss(params, setup: TrainSetup, batch: TurnBatch, gate_weight: float = 0.0,
             threshold: float = 0.5, positive_weight: float = 1.0):
  """Token-mean negative log-likelihood of the oracle memory updates and answers.

  gate_weight > 0 adds the gate's BCE on the same compressed chunks (the gate trained
  jointly, as in the prototype of docs/architecture.md#the-toy-task: relevance is a
  direct signal for the memory), positives weighted by `positive_weight`, its metrics at
  `threshold`, as the gate stage's.
  """
  outputs = trajectory_logprobs(params, setup, batch, with_gate=gate_weight > 0)
  (logp, _), (answer_logp, _) = outputs[:2]
  mask = trajectory_mask(batch)
  token_logp = _turn_rows(logp, answer_logp)
  nll = -grpo.aggregate(token_logp, mask, "token_mean")
  answer_mask = batch.answer_mask.astype(jnp.float32)
  metrics = {"nll": nll,
             "answer_nll": Ratio(-(answer_logp * answer_mask).sum(), answer_mask.sum()),
             LOSS_WEIGHT: grpo.aggregate_weight(mask)}
  loss = nll
  if gate_weight > 0:
    bce, gate_metrics = _gate_bce(outputs[2], batch.labels, batch.chunk_mask.any(-1),
                                  threshold, positive_weight)
    loss = nll + gate_weight * bce
    # The step weighs microbatches by the NLL's tokens; the BCE's mean is over its own chunks.
    counted = gate_metrics.pop(LOSS_WEIGHT)
    gate_metrics["bce"] = Ratio(bce * counted, counted)
    metrics.update({f"gate_{k}": v for k, v in gate_metrics.items()})
  return loss, {"loss": loss, **metrics}


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The policy-gradient objective's settings (docs/architecture.md#reward-and-policy-gradient)."""
  eps_low: float = 0.2
  eps_high: float = 0.2
  clip_ratio_c: float = 3.0  # dual clip: a negative advantage's loss is at most c * |A|
  kl_coef: float = 1e-3
  kl_estimator: str = "low_var_kl"
  aggregation: str = "token_mean"
  # The rollout's `sampling.logprob_temperature`: the policy and the reference are scored
  # under the distribution the rollout sampled from, as its recorded log-probs are.
  temperature: float = 1.0
  # The ratio's denominator.  "policy": the training pass's own log-probs, held constant —
  # verl's old log-probs, recomputed by the actor before its updates, for a batch with one
  # update, whose ratios are then all 1.  "recomputed": the batch's `old_logprobs` hold those
  # of a scoring pass before the first of several updates (`rl.updates_per_batch` with
  # "policy"), so later updates' ratios move and the clip binds.  "rollout": the sampler's
  # recorded log-probs, so the clip also bounds the rollout/training numerical mismatch
  # (bfloat16 decode against the training pass), logged as `rollout_logprob_gap` (by the
  # stage under "recomputed").
  old_logprobs: str = "policy"


@flax.struct.dataclass
class RLBatch:
  """Rollouts plus what the update needs: sampling-time and reference log-probs per token
  ([B, N, M] for blocks, [B, A] for the answer) and one advantage per trajectory [B]."""
  turns: TurnBatch
  old_logprobs: Array
  old_answer_logprobs: Array
  ref_logprobs: Array
  ref_answer_logprobs: Array
  advantages: Array


def rl_loss(params, setup: TrainSetup, rl: RLConfig, batch: RLBatch):
  """Clipped policy-gradient loss with a KL penalty, over every token of every turn."""
  (logp, entropy), (answer_logp, answer_entropy) = trajectory_logprobs(
      params, setup, batch.turns, temperature=rl.temperature)
  if rl.old_logprobs not in grpo.OLD_LOGPROBS + ("recomputed",):
    raise ValueError(f"unknown rl.old_logprobs {rl.old_logprobs!r}; choose from "
                     f"{grpo.OLD_LOGPROBS}")
  mask = trajectory_mask(batch.turns)  # [B*N + B, L]: one row per turn
  logp = _turn_rows(logp, answer_logp)
  recorded = _turn_rows(batch.old_logprobs, batch.old_answer_logprobs)
  old = jax.lax.stop_gradient(logp) if rl.old_logprobs == "policy" else recorded
  ref = _turn_rows(batch.ref_logprobs, batch.ref_answer_logprobs)
  n = batch.old_logprobs.shape[1]
  advantages = jnp.concatenate([jnp.repeat(batch.advantages, n), batch.advantages])
  advantages = jnp.broadcast_to(advantages[:, None], logp.shape)
  policy, clipped = grpo.clipped_policy_loss(logp, old, advantages, rl.eps_low, rl.eps_high,
                                             rl.clip_ratio_c)
  kl = grpo.kl_penalty(logp, ref, rl.kl_estimator)
  policy_loss = grpo.aggregate(policy, mask, rl.aggregation)
  kl_loss = grpo.aggregate(kl, mask, rl.aggregation)
  loss = policy_loss + rl.kl_coef * kl_loss
  # Token means whatever the loss's aggregation: summed over microbatches, then divided.
  mean = lambda x: Ratio((x.astype(jnp.float32) * mask).sum(), mask.sum())
  metrics = {"loss": loss, "policy_loss": policy_loss, "kl": kl_loss,
             "clip_fraction": mean(clipped),
             # How far the updated policy moved from the old one (verl's `ppo_kl`): 0 at a
             # batch's first update.
             "ppo_kl": mean(old - logp),
             "entropy": mean(_turn_rows(entropy, answer_entropy)),
             LOSS_WEIGHT: grpo.aggregate_weight(mask, rl.aggregation)}
  if rl.old_logprobs != "recomputed":  # `recorded` are the sampler's
    metrics["rollout_logprob_gap"] = mean(jnp.abs(logp - recorded))
  return loss, metrics


def compressor_loss(params, setup: TrainSetup, chunk_ids: Array, chunk_mask: Array,
                    target_mask: Array | None = None):
  """Next-token cross-entropy on raw tokens, conditioned on earlier windows' beacons only.

  chunk_ids/chunk_mask: [B, C] (any text cut into chunks); target_mask [B, C]: the
  tokens scored (default: all).
  """
  hidden = compressor_hidden(params, setup.model, setup.compressor, chunk_ids, chunk_mask)
  token_logp, _ = token_logprobs(params, setup.model, hidden[:, :-1], chunk_ids[:, 1:])
  mask = chunk_mask[:, 1:] & chunk_mask[:, :-1]
  if target_mask is not None:
    mask = mask & target_mask[:, 1:]
  mask = mask.astype(jnp.float32)
  loss = -grpo.aggregate(token_logp, mask, "token_mean")
  # The first token of each later window sees only the beacons of what came before (and
  # itself): the predictions from there (index j predicts token j + 1) test the beacons.
  w = setup.compressor.window
  boundary = jnp.zeros_like(mask).at[:, w::w].set(1.0) * mask
  boundary_nll = -grpo.aggregate(token_logp, boundary, "token_mean")
  return loss, {"loss": loss, "boundary_nll": boundary_nll, LOSS_WEIGHT: mask.sum()}


@flax.struct.dataclass
class GateBatch:
  """chunk_ids/chunk_mask [B, N, C]; question [B, Q]; memory before each block [B, N, Mc];
  labels [B, N] (the chunk holds a needed fact); valid [B, N] (the chunk exists)."""
  chunk_ids: Array
  chunk_mask: Array
  question: Array
  question_mask: Array
  memory_ids: Array
  memory_mask: Array
  labels: Array
  valid: Array


def gate_block_logits(params, setup: TrainSetup, batch: GateBatch) -> Array:
  """The gate's logit for every block [B, N], memory teacher-forced."""
  cfg = setup.model

  def block(carry, xs):
    ids, mask, mem_ids, mem_mask = xs
    # Differentiated (the adapters ride in the layer stack), so no `lax.cond` skip: see
    # `compress`.
    chunk = compress(params, cfg, setup.compressor, ids, mask, for_gradients=True)
    return carry, gate_logits(params, cfg, setup.prompts.gate, chunk.k, chunk.v, chunk.slot_mask,
                              batch.question, batch.question_mask, WorkingMemory(mem_ids, mem_mask))

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (batch.chunk_ids, batch.chunk_mask, batch.memory_ids,
                                             batch.memory_mask))
  _, logits = jax.lax.scan(remat_block(block, cfg), None, xs)
  return jnp.moveaxis(logits, 0, 1)


def gate_loss(params, setup: TrainSetup, batch: GateBatch, threshold: float = 0.5,
              positive_weight: float = 1.0):
  """Binary cross-entropy on chunk relevance, with precision/recall/skip rate at `threshold`."""
  logits = gate_block_logits(params, setup, batch)
  loss, metrics = _gate_bce(logits, batch.labels, batch.valid, threshold, positive_weight)
  return loss, {"loss": loss, **metrics}


def _gate_bce(logits, labels, valid, threshold: float = 0.5, positive_weight: float = 1.0):
  """BCE of block logits [B, N] and precision / recall / skip rate at `threshold`."""
  valid = valid.astype(jnp.float32)
  weights = valid * jnp.where(labels, positive_weight, 1.0)
  labels = labels.astype(jnp.float32)
  losses = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  loss = (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  predicted = (jax.nn.sigmoid(logits) >= threshold).astype(jnp.float32) * valid
  tp = (predicted * labels).sum()
  return loss, {"bce": loss, LOSS_WEIGHT: weights.sum(),
                "precision": Ratio(tp, predicted.sum()),
                "recall": Ratio(tp, (labels * valid).sum()),
                "skip_rate": Ratio(valid.sum() - predicted.sum(), valid.sum())}
