"""GRPO maths against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memrecall.train import grpo


def test_group_advantages_by_hand():
  rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # groups of 3: [1,0,0], [1,1,1]
  np.testing.assert_allclose(grpo.group_advantages(rewards, 3, "grpo_no_std"),
                             [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], atol=1e-6)
  std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # sample std of [1, 0, 0] (verl's)
  np.testing.assert_allclose(grpo.group_advantages(rewards, 3, "grpo"),
                             [2 / 3 / std, -1 / 3 / std, -1 / 3 / std, 0, 0, 0], rtol=1e-5)
  # rloo: r_i - mean of the others: 1 - 0 = 1; 0 - 0.5 = -0.5.
  np.testing.assert_allclose(grpo.group_advantages(rewards, 3, "rloo"),
                             [1, -0.5, -0.5, 0, 0, 0], atol=1e-6)
  with pytest.raises(ValueError, match="do not form groups"):
    grpo.group_advantages(rewards, 4)
  with pytest.raises(ValueError, match="unknown advantage"):
    grpo.group_advantages(rewards, 3, "ppo")


def test_kl_estimators_by_hand():
  logp = jnp.asarray([-1.0, -2.0])
  ref = jnp.asarray([-1.5, -1.0])
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "kl"), [0.5, -1.0])
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "mse"), [0.125, 0.5])
  # k3 = exp(ref - logp) - (ref - logp) - 1
  expected = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "low_var_kl"), expected, rtol=1e-6)
  assert float(grpo.kl_penalty(logp, logp, "low_var_kl").sum()) == 0.0


def test_clipped_loss_by_hand():
  old = jnp.zeros(4)
  new = jnp.log(jnp.asarray([1.5, 0.5, 1.1, 0.7]))  # ratios
  adv = jnp.asarray([1.0, -1.0, -2.0, 2.0])
  loss, clipped = grpo.clipped_policy_loss(new, old, adv, eps_low=0.2, eps_high=0.28)
  # 1.5*1 vs clip 1.28*1 -> min 1.28 (clipped); 0.5*-1=-0.5 vs 0.8*-1=-0.8 -> -0.8 (clipped);
  # 1.1*-2=-2.2 vs 1.1*-2 -> -2.2; 0.7*2=1.4 vs 0.8*2=1.6 -> 1.4.
  np.testing.assert_allclose(loss, [-1.28, 0.8, 2.2, -1.4], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [True, True, False, False])
  # Dual clip: A = -1 at ratio 5 costs 5 by PPO's rule, capped at 3 * 1; at ratio e^30 (the
  # log-ratio clamped to 20) the same; A = +1 at ratio 5 is clipped to 1.28 as before.
  new = jnp.log(jnp.asarray([5.0, 5.0])).tolist() + [30.0]
  loss, clipped = grpo.clipped_policy_loss(jnp.asarray(new), jnp.zeros(3),
                                           jnp.asarray([-1.0, 1.0, -0.5]), 0.2, 0.28, 3.0)
  np.testing.assert_allclose(loss, [3.0, -1.28, 1.5], rtol=1e-6)
  grad = jax.grad(lambda x: grpo.clipped_policy_loss(x, jnp.zeros(3), jnp.asarray(
      [-1.0, 1.0, -0.5]))[0].sum())(jnp.asarray(new))
  np.testing.assert_array_equal(grad, [0, 0, 0])  # capped or clipped: no gradient


def test_aggregations_by_hand():
  values = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
  mask = jnp.asarray([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  assert float(grpo.aggregate(values, mask, "token_mean")) == pytest.approx(10 / 4)
  assert float(grpo.aggregate(values, mask, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)
  assert float(grpo.aggregate(values, mask, "seq_mean_token_sum")) == pytest.approx((6 + 4) / 2)
  with pytest.raises(ValueError, match="unknown aggregation"):
    grpo.aggregate(values, mask, "sum")

