"""The optimizer: its learning-rate schedules and refused settings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memrecall.models.config import ConfigError
from memrecall.train import state as state_lib


def test_the_learning_rate_schedules_by_hand():
  """Step k's update under each schedule: without warmup the first step trains at the peak;
  with it, linearly from 0 (Hugging Face's convention); cosine to final_fraction at
  decay_steps.  Every schedule keeps one optimizer-state structure, so a resume may change
  them; a clip norm of 0 (optax would zero every gradient) is refused."""
  def lrs(steps, **kw):
    """Each step's learning rate: AdamW's bias-corrected update of a constant gradient is -lr
    (no weight decay here)."""
    opt = state_lib.make_optimizer(state_lib.OptimizerConfig(weight_decay=0.0, **kw))
    state, out = opt.init(jnp.zeros(())), []
    for _ in range(steps):
      updates, state = opt.update(jnp.ones(()), state, jnp.zeros(()))
      out.append(-float(updates))
    return np.asarray(out)

  np.testing.assert_allclose(lrs(3, learning_rate=0.1), [0.1, 0.1, 0.1], rtol=1e-4)
  np.testing.assert_allclose(lrs(3, learning_rate=0.1, warmup_steps=2), [0, 0.05, 0.1], rtol=1e-4)
  cosine = lrs(11, learning_rate=0.1, decay_steps=10, final_fraction=0.1)
  expected = [0.01 + 0.09 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(11)]
  np.testing.assert_allclose(cosine, expected, rtol=1e-4)
  structures = {jax.tree.structure(state_lib.make_optimizer(state_lib.OptimizerConfig(
      **kw)).init(jnp.zeros(()))) for kw in (
          {}, {"warmup_steps": 3}, {"decay_steps": 9}, {"warmup_steps": 3, "decay_steps": 9})}
  assert len(structures) == 1
  with pytest.raises(ConfigError, match="grad_clip=0"):
    state_lib.OptimizerConfig(grad_clip=0.0)
