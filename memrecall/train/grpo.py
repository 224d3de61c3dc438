"""Group-relative policy-gradient maths, as pure functions of arrays.

The recipe: docs/architecture.md#reward-and-policy-gradient.

A trajectory is every memory update of one question plus its final answer;
G trajectories share a question.  One scalar reward per trajectory becomes an
advantage that is broadcast to every token of every turn; the loss is PPO's
clipped ratio with separate low/high epsilon, plus a KL penalty to a frozen
reference policy, aggregated over tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
ADVANTAGES = ("grpo", "grpo_no_std", "rloo")
KL_ESTIMATORS = ("kl", "low_var_kl", "mse")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
# The ratio's denominator: the training pass's own log-probs held constant, or the sampler's.
OLD_LOGPROBS = ("policy", "rollout")


def group_advantages(rewards: Array, group_size: int, kind: str = "grpo_no_std",
                     eps: float = 1e-6) -> Array:
  """Per-trajectory advantages from rewards [B] laid out as B/G consecutive groups of G.

  grpo:        (r - mean_group) / (std_group + eps), the sample std (ddof 1, as verl's)
  grpo_no_std: r - mean_group  (the released MemAgent recipe; Dr. GRPO's choice)
  rloo:        r - mean of the *other* G - 1 rewards of the group
  """
  if kind not in ADVANTAGES:
    raise ValueError(f"unknown advantage estimator {kind!r}; choose from {ADVANTAGES}")
  if rewards.shape[0] % group_size:
    raise ValueError(f"{rewards.shape[0]} rewards do not form groups of {group_size}")
  r = rewards.reshape(-1, group_size).astype(jnp.float32)
  mean = r.mean(axis=1, keepdims=True)
  if group_size < 2 and kind != "grpo_no_std":
    raise ValueError(f"{kind} needs groups of at least 2")
  if kind == "grpo":
    adv = (r - mean) / (r.std(axis=1, ddof=1, keepdims=True) + eps)
  elif kind == "grpo_no_std":
    adv = r - mean
  else:
    adv = (r - mean) * group_size / (group_size - 1)
  return adv.reshape(-1)


def kl_penalty(logprobs: Array, ref_logprobs: Array, estimator: str = "low_var_kl") -> Array:
  """Per-token KL(policy || reference) estimates from sampled tokens' log-probs.

  kl (k1): logp - logp_ref;  mse (k2): (logp - logp_ref)^2 / 2;
  low_var_kl (k3): exp(logp_ref - logp) - (logp_ref - logp) - 1, clipped to [-10, 10]
  as in common GRPO recipes (unbiased, non-negative, low variance).
  """
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {estimator!r}; choose from {KL_ESTIMATORS}")
  delta = logprobs - ref_logprobs
  if estimator == "kl":
    return delta
  if estimator == "mse":
    return 0.5 * delta * delta
  log_ratio = jnp.clip(-delta, -20.0, 20.0)
  return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)


def aggregate(values: Array, mask: Array, mode: str = "token_mean") -> Array:
  """Reduces per-token values [S, T] (S sequences) over masked tokens.

  token_mean: mean over every real token of the batch;
  seq_mean_token_mean: mean over sequences of their token means;
  seq_mean_token_sum: mean over sequences of their token sums.
  """
  if mode not in AGGREGATIONS:
    raise ValueError(f"unknown aggregation {mode!r}; choose from {AGGREGATIONS}")
  mask = mask.astype(values.dtype)
  sums = (values * mask).sum(axis=-1)  # [S]; 0 for a sequence without tokens
  if mode == "seq_mean_token_mean":
    sums = sums / jnp.maximum(mask.sum(axis=-1), 1.0)
  return sums.sum() / jnp.maximum(aggregate_weight(mask, mode), 1.0).astype(sums.dtype)


def aggregate_weight(mask: Array, mode: str = "token_mean") -> Array:
  """What `aggregate` divides by: the real tokens (token_mean) or the sequences with one (the
  train step weighs microbatches by it, `state.LOSS_WEIGHT`)."""
  mask = mask.astype(jnp.float32)
  if mode == "token_mean":
    return mask.sum()
  return (mask.sum(axis=-1) > 0).astype(jnp.float32).sum()


def clipped_policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array,
                        eps_low: float = 0.2, eps_high: float = 0.2, ratio_cap: float = 3.0
                        ) -> tuple[Array, Array]:
  """PPO's per-token clipped surrogate (to minimise) and whether the clip was active.

  loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), ratio = exp(logp - logp_old),
  and for A < 0 at most -ratio_cap * A (dual clip, verl's `clip_ratio_c`): a token the rollout
  found far less likely than the policy now does (a large ratio; the rollout's bfloat16 decode
  and the training pass differ a little) cannot dominate a step.  The log-ratio is clamped to
  +-20 before the exponential, as verl's is.
  """
  ratio = jnp.exp(jnp.clip(logprobs - old_logprobs, -20.0, 20.0))
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
  loss = -jnp.minimum(unclipped, clipped)
  loss = jnp.where(advantages < 0, jnp.minimum(loss, -ratio_cap * advantages), loss)
  return loss, (clipped < unclipped)
