"""Every stage's loss falls on a fixed batch; the RL gradient reaches the compressor."""

import re

import flax.traverse_util
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
import optax
import pytest

from memrecall import run_builder
from memrecall.method import reasoner
from memrecall.models import qwen2 as model
from memrecall.train import objectives, state as state_lib, trainer
from tests.train.conftest import small_config


def _fit(stage_name, steps, lr, trainable=None):
  config = small_config(stage_name)
  config.optimizer.learning_rate = lr
  if trainable:
    config.train.trainable = trainable
  run = run_builder.build_run(config)
  stage = trainer._STAGES[stage_name](run)
  params = model.init_params(run.model, jax.random.key(0))
  paths = state_lib.trainable_paths(params, config.train.trainable)
  optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(**config.optimizer.to_dict()))
  state = state_lib.create_train_state(params, config.train.trainable, optimizer, 0)
  stage.start(state.params)
  batch, _ = stage.batch(0, state, slice(0, config.train.batch_size))
  step = jax.jit(state_lib.make_train_step(stage.objective(), optimizer, paths))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, params, state


@pytest.mark.parametrize("stage,trainable,steps", [
    ("compressor", "backbone", 15),  # random ids: beacons alone on a random backbone learn little
    ("sft", None, 15), ("gate", None, 30)])
def test_loss_falls_on_a_fixed_batch(stage, trainable, steps):
  losses, _, _ = _fit(stage, steps, 1e-2, trainable)
  assert losses[-1] < 0.7 * losses[0], losses


def _rl_batch(run, params, seed=0):
  """A fixed RL batch: SFT-shaped turns as the 'rollout', with fixed advantages."""
  turns = jax.tree.map(jnp.asarray, trainer.oracle_turns(run, run.examples(0, 4)))
  (lp, _), (alp, _) = objectives.trajectory_logprobs(params, objectives.TrainSetup.of_run(run), turns)
  return objectives.RLBatch(turns=turns, old_logprobs=lp, old_answer_logprobs=alp,
                            ref_logprobs=lp, ref_answer_logprobs=alp,
                            advantages=jnp.asarray([1.0, -1.0, 0.5, -0.5]))


def _token_weighted(batch, values=None, answer_values=None):
  """Sum over every written token of advantage x value, and the token count, by a loop over
  trajectories (values default to 1)."""
  total, count = 0.0, 0
  for b, advantage in enumerate(np.asarray(batch.advantages)):
    for tokens, mask in ((values, batch.turns.target_mask),
                         (answer_values, batch.turns.answer_mask)):
      mask = np.asarray(mask[b], bool)
      tokens = np.ones(mask.shape) if tokens is None else np.asarray(tokens[b])
      total += advantage * float(tokens[mask].sum())
      count += int(mask.sum())
  return total, count


def test_rl_loss_falls_on_a_fixed_batch():
  """With the rollout's log-probs as the ratio's denominator (ratios away from 1 once the
  policy moves), the clipped loss falls and the clip binds."""
  config = small_config("rl")
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0))
  batch = _rl_batch(run, params)
  rl = objectives.RLConfig(eps_low=0.2, eps_high=0.2, kl_coef=1e-3, old_logprobs="rollout")
  optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(learning_rate=3e-3))
  paths = state_lib.trainable_paths(params, "backbone")
  state = state_lib.create_train_state(params, "backbone", optimizer, 0)
  step = jax.jit(state_lib.make_train_step(
      lambda p, b, rng: objectives.rl_loss(p, objectives.TrainSetup.of_run(run), rl, b), optimizer, paths))
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  # Starts at minus the token-weighted mean advantage (every ratio is 1), then falls as the
  # policy follows the advantages.
  total, count = _token_weighted(batch)
  start = -total / count
  assert losses[0] == pytest.approx(start, abs=1e-5)
  assert losses[-1] < start - 0.05, losses
  assert float(metrics["clip_fraction"]) > 0


def _rl_loss_and_grads(run, params, batch, **settings):
  rl = objectives.RLConfig(**{"kl_coef": 0.0, **settings})
  setup = objectives.TrainSetup.of_run(run)
  (loss, metrics), grads = jax.value_and_grad(lambda p: objectives.rl_loss(p, setup, rl, batch),
                                              has_aux=True)(params)
  return (loss, state_lib.resolve_ratios(metrics)), grads


def test_the_policy_as_its_own_old_logprobs_gives_the_policy_gradient():
  """rl.old_logprobs=policy (verl's recomputed old log-probs, one update per batch): every
  ratio is 1 whatever the rollout recorded, and the gradient is that of minus the
  token-weighted mean of advantage x log-prob, computed here by a loop over trajectories;
  the rollout/training gap is still measured."""
  run = run_builder.build_run(small_config("rl"))
  params = model.init_params(run.model, jax.random.key(0))
  batch = _rl_batch(run, params)
  shifted = batch.replace(old_logprobs=batch.old_logprobs - 0.5)
  (loss, metrics), grads = _rl_loss_and_grads(run, params, shifted, old_logprobs="policy")
  total, count = _token_weighted(batch)
  assert float(loss) == pytest.approx(-total / count, abs=1e-6)
  assert float(metrics["clip_fraction"]) == 0
  blocks = float(np.asarray(batch.turns.target_mask).sum())
  assert float(metrics["rollout_logprob_gap"]) == pytest.approx(0.5 * blocks / count, rel=1e-4)

  def surrogate(p):
    (lp, _), (alp, _) = objectives.trajectory_logprobs(p, objectives.TrainSetup.of_run(run),
                                                       batch.turns)
    a = batch.advantages
    total = ((a[:, None, None] * lp * batch.turns.target_mask).sum()
             + (a[:, None] * alp * batch.turns.answer_mask).sum())
    return -total / count

  expected = jax.grad(surrogate)(params)
  for key, value in flax.traverse_util.flatten_dict(expected).items():
    got = flax.traverse_util.flatten_dict(grads)[key]
    np.testing.assert_allclose(got, value, atol=1e-6, rtol=1e-5, err_msg=str(key))
  # The rollout's log-probs as the denominator see the shift: ratios of e^0.5 on every block
  # token, beyond the clip for positive advantages.
  (_, metrics), _ = _rl_loss_and_grads(run, params, shifted, old_logprobs="rollout")
  assert float(metrics["clip_fraction"]) > 0


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "seq_mean_token_sum"])
def test_sequence_level_aggregations_count_each_turn_as_a_sequence(aggregation):
  """As in verl's multi-conversation batches, every memory update and every answer is a
  sequence of its own: with ratios of 1 and no KL, the loss is minus the mean over turns
  that wrote something of the advantage (x the turn's tokens for token_sum), by a loop."""
  run = run_builder.build_run(small_config("rl"))
  params = model.init_params(run.model, jax.random.key(0))
  batch = _rl_batch(run, params)
  # Trajectories of different turn counts (the first one's first block skipped, as the gate
  # skips) and advantages that do not average to 0.
  batch = batch.replace(turns=batch.turns.replace(
      target_mask=batch.turns.target_mask.at[0, 0].set(False)),
      advantages=jnp.asarray([1.0, -1.0, 0.5, 0.25]))
  turns = []
  for b, advantage in enumerate(np.asarray(batch.advantages)):
    lengths = list(np.asarray(batch.turns.target_mask[b]).sum(-1)) + [
        np.asarray(batch.turns.answer_mask[b]).sum()]
    turns += [(advantage, n) for n in lengths if n > 0]
  assert len(turns) > len(batch.advantages)  # several turns per trajectory
  per_turn = [a * (n if aggregation.endswith("sum") else 1) for a, n in turns]
  (loss, _), _ = _rl_loss_and_grads(run, params, batch, aggregation=aggregation)
  assert float(loss) == pytest.approx(-np.mean(per_turn), abs=1e-5)
  # A whole trajectory as one sequence (the old reading) gives another value here.
  lengths = (np.asarray(batch.turns.target_mask).sum((1, 2))
             + np.asarray(batch.turns.answer_mask).sum(1))
  advantages = np.asarray(batch.advantages)
  per_trajectory = advantages * (lengths if aggregation.endswith("sum") else 1)
  assert abs(np.mean(per_trajectory) - np.mean(per_turn)) > 0.01


def test_rl_gradient_reaches_the_compressor_and_not_frozen_parameters():
  run = run_builder.build_run(small_config("rl"))
  params = model.init_params(run.model, jax.random.key(0))
  batch = _rl_batch(run, params)
  # Perturb the old log-probs so the ratio is not 1 everywhere.
  batch = batch.replace(old_logprobs=batch.old_logprobs - 0.1)
  rl = objectives.RLConfig()
  grads = jax.grad(lambda p: objectives.rl_loss(p, objectives.TrainSetup.of_run(run), rl, batch)[0])(params)
  flat = flax.traverse_util.flatten_dict(grads)
  beacon = [k for k in flat if k[-1].startswith("beacon_")]
  assert len(beacon) == 7  # embedding + q/k/v kernels and biases
  for key in beacon:
    assert float(jnp.abs(flat[key]).max()) > 0, key
  # The gate's parameters play no part in the reasoner's loss.
  for key in [k for k in flat if "_lora_" in k[-1] or k[-1] in ("gate_head", "gate_bias")]:
    assert float(jnp.abs(flat[key]).max()) == 0, key


@pytest.mark.parametrize("subset", ["beacon", "gate"])
def test_a_step_changes_only_the_trainable_subset(subset):
  stage = "compressor" if subset == "beacon" else "gate"
  _, before, state = _fit(stage, 2, 1e-2)
  flat_before = flax.traverse_util.flatten_dict(before)
  flat_after = flax.traverse_util.flatten_dict(state.params)
  trainable = set(state_lib.trainable_paths(before, subset))
  for key, value in flat_after.items():
    changed = not np.array_equal(np.asarray(value), np.asarray(flat_before[key]))
    if key in trainable and not key[-1].endswith("lora_b"):
      assert changed, key
    if key not in trainable:
      assert not changed, key


@pytest.mark.parametrize("agent,temperature", [("lychee", 1.0), ("memagent", 1.0),
                                               ("lychee", 0.5)])
def test_rollout_logprobs_equal_the_teacher_forced_scores(agent, temperature):
  """The RL stage's sampled turns, re-scored by the objective, give the sampler's own
  log-probs: the loop and the loss see the same prompts (compressed or raw chunks), and the
  same distribution at any rollout temperature, so the first update's ratios are 1."""
  config = small_config("rl")
  config.agent = agent
  config.rl.temperature = temperature
  run = run_builder.build_run(config)
  stage = trainer._STAGES["rl"](run)
  params = model.init_params(run.model, jax.random.key(0))
  optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(learning_rate=1e-3))
  state = state_lib.create_train_state(params, "backbone", optimizer, 0)
  stage.start(state.params)
  batch, _ = stage.batch(0, state, slice(0, config.train.batch_size))
  mask = np.asarray(batch.turns.target_mask)
  assert mask.sum() > 0
  # The reference policy is the initial one, so its teacher-forced scores are the sampler's.
  np.testing.assert_allclose(np.asarray(batch.ref_logprobs)[mask],
                             np.asarray(batch.old_logprobs)[mask], atol=2e-4)
  answer = np.asarray(batch.turns.answer_mask)
  np.testing.assert_allclose(np.asarray(batch.ref_answer_logprobs)[answer],
                             np.asarray(batch.old_answer_logprobs)[answer], atol=2e-4)
  _, metrics = objectives.rl_loss(state.params, stage.setup, stage.rl, batch)
  metrics = state_lib.resolve_ratios(metrics)
  assert float(metrics["clip_fraction"]) == 0
  assert abs(float(metrics["kl"])) < 1e-6
  if temperature != 1.0:  # ... and that distribution is the tempered one, not the model's own
    (raw, _), _ = objectives.trajectory_logprobs(state.params, stage.setup, batch.turns)
    assert np.abs(np.asarray(raw)[mask] - np.asarray(batch.old_logprobs)[mask]).max() > 0.1


def test_rollouts_are_the_same_whichever_way_their_weights_are_placed():
  """rl.rollout_weights on 8 devices (data 2 x fsdp 4): the inference copy sharded as training
  shards it, whole on every device, or split over a tensor axis of the same devices re-formed
  as data x tensor samples the same tokens with the same log-probs from the same key."""
  batches = {}
  for weights in ("sharded", "replicated", "tensor"):
    config = small_config("rl", batch_size=8)
    config.mesh.data, config.mesh.fsdp = 2, 4
    config.rl.rollout_weights = weights
    run = run_builder.build_run(config)
    stage = trainer._STAGES["rl"](run)
    assert stage.rollout_weights.weights == weights
    with jax.set_mesh(run.mesh):
      params = model.init_params(run.model, jax.random.key(0), run.mesh)
      optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(learning_rate=1e-3))
      state = state_lib.create_train_state(params, "backbone", optimizer, 0)
      stage.start(state.params)
      batches[weights], _ = stage.batch(0, state, slice(0, 8))
  # On a CPU no device reports its memory: the tensor axis is the widest up to what training
  # splits the weights over (fsdp 4) that splits the tiny model's 2 KV heads evenly; the rows
  # split over the other 4.
  assert run.model.num_kv_heads == 2
  assert dict(stage.rollout_weights.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert "rollout weights tensor over 8 device(s) as data 4 x tensor 2" in (
      stage.rollout_weights.line)
  sharded = batches["sharded"]
  assert np.asarray(sharded.turns.target_mask).sum() > 0
  for weights in ("replicated", "tensor"):
    other = batches[weights]
    for field in ("targets", "target_mask", "answer", "answer_mask", "memory_ids"):
      np.testing.assert_array_equal(getattr(other.turns, field), getattr(sharded.turns, field),
                                    err_msg=f"{weights}: {field}")
    np.testing.assert_allclose(other.old_logprobs, sharded.old_logprobs, atol=1e-5,
                               err_msg=weights)
    np.testing.assert_allclose(other.old_answer_logprobs, sharded.old_answer_logprobs,
                               atol=1e-5, err_msg=weights)


def test_memagent_agent_learns_from_raw_chunks_and_has_no_gate():
  config = small_config("sft")
  config.agent = "memagent"
  run = run_builder.build_run(config)
  assert not objectives.TrainSetup.of_run(run).reader.compressed  # raw chunks
  stage = trainer._STAGES["sft"](run)
  params = model.init_params(run.model, jax.random.key(0))
  batch, _ = stage.batch(0, None, slice(0, config.train.batch_size))
  loss = lambda p: objectives.sft_loss(p, objectives.TrainSetup.of_run(run), batch)[0]
  grads = jax.grad(loss)(params)
  flat = flax.traverse_util.flatten_dict(grads)
  # Raw chunks: nothing flows through the beacon parameters.
  assert all(float(jnp.abs(g).max()) == 0 for k, g in flat.items() if k[-1].startswith("beacon_"))
  assert float(jnp.abs(flat[("embedding",)]).max()) > 0
  gate = small_config("gate")
  gate.agent = "memagent"
  with pytest.raises(Exception, match="memagent agent reads raw chunks"):
    run_builder.build_run(gate)


def test_microbatches_give_the_whole_batch_step():
  """A loss that is a mean over rows: k microbatches make the same step as one batch."""
  config = small_config("sft")
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0))
  paths = state_lib.trainable_paths(params, "backbone")
  optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(**config.optimizer.to_dict()))

  def loss_fn(p, batch, rng):
    w = p["final_norm"]["scale"]  # [E]
    per_row = jnp.tanh(batch["x"] @ w + batch["y"][:, 0]) ** 2  # [B]
    return per_row.mean(), {"loss": per_row.mean(), "mean_x": batch["x"].mean()}

  width = params["final_norm"]["scale"].shape[0]
  batch = {"x": jax.random.normal(jax.random.key(1), (8, width)),
           "y": jnp.arange(16.0).reshape(8, 2) / 16}
  out = {}
  for k in (1, 4):
    state = state_lib.create_train_state(params, "backbone", optimizer, 0)
    step = jax.jit(state_lib.make_train_step(loss_fn, optimizer, paths, microbatches=k))
    out[k] = step(state, batch)
  (s1, m1), (s4, m4) = out[1], out[4]
  for key in ("loss", "grad_norm", "mean_x"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5)
  np.testing.assert_allclose(s4.params["final_norm"]["scale"], s1.params["final_norm"]["scale"],
                             rtol=1e-6, atol=1e-7)
  assert not np.allclose(s1.params["final_norm"]["scale"], params["final_norm"]["scale"])
  with pytest.raises(ValueError, match="does not split into 3 microbatches"):
    jax.jit(state_lib.make_train_step(loss_fn, optimizer, paths, microbatches=3))(
        state_lib.create_train_state(params, "backbone", optimizer, 0), batch)


def test_updates_per_batch_update_on_consecutive_parts_under_a_schedule_of_steps():
  """u updates a step (RL's mini-batches) are u single updates on the batch's consecutive
  parts in turn, each from the parameters the last left; the schedule counts steps (2 steps of
  2 updates: rates lr(0), lr(0), lr(1), lr(1) of a 2-step warmup, not lr(0) .. lr(3)); the
  metrics are the updates' means; a non-finite update ends the step there, uncounted."""
  config = small_config("sft")
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0))
  paths = state_lib.trainable_paths(params, "backbone")
  settings = state_lib.OptimizerConfig(learning_rate=0.1, warmup_steps=2)

  def loss_fn(p, batch, rng):
    w = p["final_norm"]["scale"]  # [E]
    per_row = jnp.tanh(batch["x"] @ w + batch["y"][:, 0]) ** 2  # [B]
    return per_row.mean(), {"loss": per_row.mean()}

  width = params["final_norm"]["scale"].shape[0]
  batch = {"x": jax.random.normal(jax.random.key(1), (8, width)),
           "y": jnp.arange(16.0).reshape(8, 2) / 16}
  halves = [jax.tree.map(lambda x: x[:4], batch), jax.tree.map(lambda x: x[4:], batch)]
  per_step = state_lib.make_optimizer(settings, updates_per_step=2)
  new = lambda optimizer: state_lib.create_train_state(params, "backbone", optimizer, 0)
  two = jax.jit(state_lib.make_train_step(loss_fn, per_step, paths, updates=2))
  one = jax.jit(state_lib.make_train_step(loss_fn, per_step, paths))
  state, by_hand, losses = new(per_step), new(per_step), []
  for _ in range(2):
    state, metrics = two(state, batch)
    for half in halves:
      by_hand, m = one(by_hand, half)
      losses.append(float(m["loss"]))
  scale = lambda s: np.asarray(s.params["final_norm"]["scale"])
  np.testing.assert_allclose(scale(state), scale(by_hand), rtol=1e-6, atol=1e-7)
  assert int(state.step) == 2 and float(metrics["finite"]) == 1
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses[2:]), rtol=1e-6)
  per_update = state_lib.make_optimizer(settings)  # the schedule counting updates
  other = new(per_update)
  for half in halves * 2:
    other, _ = jax.jit(state_lib.make_train_step(loss_fn, per_update, paths))(other, half)
  assert not np.allclose(scale(other), scale(state), rtol=1e-4)
  assert not np.allclose(scale(state), np.asarray(params["final_norm"]["scale"]))
  # The second part non-finite: the first update stays, the second does not, the step is not
  # counted.
  bad = {"x": batch["x"], "y": batch["y"].at[6, 0].set(jnp.nan)}
  after, metrics = two(state, bad)
  assert float(metrics["finite"]) == 0 and int(after.step) == 2
  first, _ = one(state, halves[0])
  np.testing.assert_allclose(scale(after), scale(first), rtol=1e-6, atol=1e-7)
  assert not np.allclose(scale(after), scale(state))
  # Every update finite, whatever their count: the flag is not a rounded mean (41 updates'
  # mean of 1s is 0.99999994 in float32).
  many = {"x": jnp.tile(batch["x"], (41, 1)), "y": jnp.tile(batch["y"], (41, 1))}
  _, metrics = jax.jit(state_lib.make_train_step(loss_fn, per_step, paths, updates=41))(
      new(per_step), many)
  assert float(metrics["finite"]) == 1
  with pytest.raises(ValueError, match="does not split into 3 updates"):
    jax.jit(state_lib.make_train_step(loss_fn, per_step, paths, updates=3))(new(per_step), batch)


def test_recomputed_old_logprobs_give_the_policy_gradient_then_move_the_ratio():
  """rl.updates_per_batch > 1 with "policy": the old log-probs come from a scoring pass before
  the first update ("recomputed").  At the parameters that scored them, loss and gradient are
  the "policy" mode's (ratios 1); after an update the ratios move, and `ppo_kl` says how far."""
  run = run_builder.build_run(small_config("rl"))
  params = model.init_params(run.model, jax.random.key(0))
  batch = _rl_batch(run, params)  # old log-probs: these parameters' teacher-forced scores
  (loss, metrics), grads = _rl_loss_and_grads(run, params, batch, old_logprobs="recomputed")
  (loss_p, metrics_p), grads_p = _rl_loss_and_grads(run, params, batch, old_logprobs="policy")
  assert float(loss) == pytest.approx(float(loss_p), abs=1e-6)
  assert "rollout_logprob_gap" not in metrics and "rollout_logprob_gap" in metrics_p
  assert abs(float(metrics["ppo_kl"])) < 1e-6
  for key, value in flax.traverse_util.flatten_dict(grads_p).items():
    np.testing.assert_allclose(flax.traverse_util.flatten_dict(grads)[key], value, atol=1e-6,
                               rtol=1e-5, err_msg=str(key))
  moved = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  (_, metrics), _ = _rl_loss_and_grads(run, moved, batch, old_logprobs="recomputed")
  (_, metrics_p), _ = _rl_loss_and_grads(run, moved, batch, old_logprobs="policy")
  assert abs(float(metrics["ppo_kl"])) > 1e-4
  assert float(metrics["clip_fraction"]) > float(metrics_p["clip_fraction"]) == 0


def test_ratio_metrics_over_microbatches_are_the_whole_batchs_ratio():
  """A precision over 2 parts is summed hits over summed predictions, not a weighted mean of
  the parts' precisions; a part that predicts nothing adds nothing."""
  config = small_config("sft")
  params = model.init_params(run_builder.build_run(config).model, jax.random.key(0))
  paths = state_lib.trainable_paths(params, "backbone")
  optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(learning_rate=1e-3))

  def loss_fn(p, batch, rng):
    loss = (p["final_norm"]["scale"] ** 2).sum() * batch["w"].mean()
    hits, said = batch["hit"].sum(), batch["said"].sum()
    return loss, {"loss": loss, "precision": state_lib.Ratio(hits, said),
                  state_lib.LOSS_WEIGHT: jnp.float32(batch["w"].shape[0])}

  # Part 1: 1 hit of 1 predicted; part 2: 1 hit of 3; part 3 predicts nothing; part 4: 0 of 4.
  batch = {"w": jnp.ones(8), "hit": jnp.asarray([1, 0, 1, 0, 0, 0, 0, 0], jnp.float32),
           "said": jnp.asarray([1, 0, 2, 1, 0, 0, 2, 2], jnp.float32)}
  for k in (1, 4):
    state = state_lib.create_train_state(params, "backbone", optimizer, 0)
    _, metrics = jax.jit(state_lib.make_train_step(loss_fn, optimizer, paths, k))(state, batch)
    np.testing.assert_allclose(metrics["precision"], 2 / 8, rtol=1e-6)  # not mean(1, 1/3, 0, 0)
  nothing = state_lib.resolve_ratios({"p": state_lib.Ratio(jnp.float32(0), jnp.float32(0))})
  assert float(nothing["p"]) == 0.0


def test_sft_trains_the_gate_jointly_with_its_weighted_bce():
  """sft.gate_weight > 0 (with the gate's parameters trainable): the BCE, its positives
  weighted by gate.positive_weight, moves the relevance head and falls; with the backbone
  alone trainable the config is refused (a frozen zero head passes no gradient)."""
  config = small_config("sft")
  config.sft.gate_weight, config.train.trainable = 1.0, "all"
  config.gate.positive_weight = 3.0
  run = run_builder.build_run(config)
  stage = trainer._STAGES["sft"](run)
  params = model.init_params(run.model, jax.random.key(0))
  optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(learning_rate=1e-2))
  paths = state_lib.trainable_paths(params, "all")
  state = state_lib.create_train_state(params, "all", optimizer, 0)
  batch, _ = stage.batch(0, state, slice(0, config.train.batch_size))
  labels, valid = np.asarray(batch.labels), np.asarray(batch.chunk_mask).any(-1)
  assert 0 < labels[valid].sum() < valid.sum()
  metrics = state_lib.resolve_ratios(stage.objective()(state.params, batch, None)[1])
  # The head starts at zero: every logit 0, each chunk's BCE log 2 whatever its weight; the
  # weight shows in the gradient, which pushes positives up 3x as hard as negatives down.
  np.testing.assert_allclose(metrics["gate_bce"], np.log(2), rtol=1e-6)
  step = jax.jit(state_lib.make_train_step(stage.objective(), optimizer, paths))
  bces = []
  for _ in range(5):
    state, metrics = step(state, batch)
    bces.append(float(metrics["gate_bce"]))
  assert float(jnp.abs(state.params["gate_head"]).max()) > 0
  assert bces[-1] < bces[0]
  logits = objectives.trajectory_logprobs(state.params, stage.setup, batch, with_gate=True)[2]
  pos, neg = np.asarray(logits)[valid & labels].mean(), np.asarray(logits)[valid & ~labels].mean()
  assert pos > neg
  bce = lambda w: float(state_lib.resolve_ratios(
      objectives.sft_loss(state.params, stage.setup, batch, 1.0, 0.5, w)[1])["gate_bce"])
  staged = state_lib.resolve_ratios(stage.objective()(state.params, batch, None)[1])
  staged = float(staged["gate_bce"])
  assert staged == pytest.approx(bce(3.0), rel=1e-6) and abs(bce(1.0) - staged) > 1e-4
  frozen = small_config("sft")
  frozen.sft.gate_weight = 1.0  # train.trainable stays "backbone"
  with pytest.raises(run_builder.ConfigError, match="freezes the gate's relevance head"):
    run_builder.build_run(frozen)
  lonely = small_config("rl")
  lonely.rl.group_size = 1
  with pytest.raises(run_builder.ConfigError, match="at least 2 rollouts"):
    run_builder.build_run(lonely)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_microbatches_of_unequal_turns_give_the_whole_batchs_step(aggregation):
  """RL over turns of different lengths: 2 microbatches weighted by what the loss's mean counts
  (tokens, or turns) make the whole batch's loss, gradient and update (a mean of the 2 parts'
  means does not), and the token-mean metrics stay token means under either aggregation."""
  config = small_config("rl")
  config.rl.aggregation = aggregation
  config.reasoner.memory_size, config.reasoner.answer_tokens = 8, 6
  run = run_builder.build_run(config)
  stage = trainer._STAGES["rl"](run)
  params = model.init_params(run.model, jax.random.key(0))
  # A likelier EOS: updates end at different lengths.
  params["lm_head"] = params["lm_head"].at[:, run.model.eos_token_ids[0]].add(4.0)
  # Plain SGD at rate 1: the update is the gradient, compared element by element.  (Adam's
  # first step, lr * g / |g|, turns float32 noise at a gradient near 0 into a whole step.)
  optimizer = optax.sgd(1.0)
  paths = state_lib.trainable_paths(params, "backbone")
  state = state_lib.create_train_state(params, "backbone", optimizer, 0)
  stage.start(state.params)
  batch, _ = stage.batch(0, state, slice(0, 4))
  # Rollout log-probs off by a different amount in each half: its gap metric tells a token
  # mean from a mean weighted by turns.
  shift = np.asarray([0.05, 0.05, 0.9, 0.9], np.float32)
  batch = batch.replace(advantages=np.asarray([0.5, -0.5, 0.5, -0.5], np.float32),
                        old_logprobs=batch.old_logprobs - shift[:, None, None],
                        old_answer_logprobs=batch.old_answer_logprobs - shift[:, None])
  tokens = (np.asarray(batch.turns.target_mask).sum((1, 2))
            + np.asarray(batch.turns.answer_mask).sum(1))  # per trajectory
  assert tokens[:2].sum() != tokens[2:].sum(), tokens  # the two halves weigh differently
  out = {}
  for k in (1, 2):
    fresh = state_lib.create_train_state(params, "backbone", optimizer, 0)
    step = jax.jit(state_lib.make_train_step(stage.objective(), optimizer, paths, microbatches=k))
    out[k] = step(fresh, batch)
  (s1, m1), (s2, m2) = out[1], out[2]
  for key in ("loss", "grad_norm", "kl", "entropy", "rollout_logprob_gap"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, atol=1e-7, err_msg=key)
  _, count = _token_weighted(batch)  # the written tokens
  gap = sum(s * (np.asarray(batch.turns.target_mask[b]).sum()
                 + np.asarray(batch.turns.answer_mask[b]).sum()) for b, s in enumerate(shift))
  np.testing.assert_allclose(m1["rollout_logprob_gap"], gap / count, rtol=1e-3)
  assert state_lib.LOSS_WEIGHT not in m1
  # Each leaf's update within 1e-4 of the whole batch's, in norm (one element of 8192 differs by
  # 9e-4 of itself: float32 sums of opposite terms in another order); a mean of the parts'
  # means is ~1e-2 off.
  for a, b, p in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params),
                    jax.tree.leaves(params)):
    update = np.asarray(b, np.float64) - np.asarray(p, np.float64)
    assert np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) <= \
        1e-4 * np.linalg.norm(update) + 1e-9


def test_turn_logprobs_equal_the_whole_forward_and_run_the_head_on_the_written_tokens_only():
  """A turn's scores are the log-softmax of the full forward's logits at the positions that
  predict the written tokens, and no array of the step (forward or gradient) spans the whole
  prompt by the vocabulary: the LM head runs on the M written positions only."""
  run = run_builder.build_run(small_config("sft"))
  cfg, template = run.model, run.prompts.update
  params = model.init_params(cfg, jax.random.key(0))
  b, q, mc, m, slots = 2, 6, 8, 5, 4
  rng = np.random.default_rng(0)
  ids = lambda *shape: jnp.asarray(rng.integers(3, cfg.vocab_size, shape), jnp.int32)
  question, memory, targets = ids(b, q), ids(b, mc), ids(b, m)
  question_mask = jnp.ones((b, q), bool)
  memory_mask = jnp.asarray(np.arange(mc)[None] < np.array([[mc], [3]]))  # a padded row
  target_mask = jnp.asarray(np.arange(m)[None] < np.array([[m], [2]]))
  kv = lambda: jnp.asarray(rng.normal(size=(cfg.num_layers, b, slots, cfg.num_kv_heads,
                                              cfg.head_dim)), cfg.jnp_dtype)
  k, v, slot_mask = kv(), kv(), jnp.ones((b, slots), bool)
  working = reasoner.WorkingMemory(memory, memory_mask)

  def scores(params):
    return objectives.turn_logprobs(params, cfg, template, k, v, slot_mask, question,
                                    question_mask, working, targets, target_mask)

  logp, entropy = scores(params)
  # Naive: the whole sequence's logits from the model's own forward, then the slice.
  prompt, prompt_mask = template.render(question, question_mask, memory, memory_mask)
  tokens = jnp.concatenate([prompt, targets], axis=1)
  cache = reasoner.prefix_cache(cfg, k, v, slot_mask, tokens.shape[1])
  logits, _ = model.forward(params, cfg, tokens, jnp.concatenate([prompt_mask, target_mask], 1),
                            cache)
  p = prompt.shape[1]
  full = np.asarray(jax.nn.log_softmax(logits[:, p - 1:p - 1 + m]), np.float64)
  expected = np.take_along_axis(full, np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(logp), expected, atol=1e-5)
  np.testing.assert_allclose(np.asarray(entropy), -(np.exp(full) * full).sum(-1), atol=1e-4)

  total = p + m
  # Every array of the gradient's program whose last axis is the vocabulary.
  text = jax.jit(jax.grad(lambda params: scores(params)[0].sum())).lower(params).as_text()
  vocab_shapes = {tuple(int(d) for d in shape.split("x"))
                  for shape in re.findall(r"tensor<([0-9x]+)x[a-z]+[0-9]*>", text)
                  if shape.endswith(f"x{cfg.vocab_size}")}
  assert (b, m, cfg.vocab_size) in vocab_shapes, vocab_shapes
  assert not any(len(s) >= 2 and s[-2] == p + m for s in vocab_shapes), vocab_shapes


def _matmuls(jaxpr) -> int:
  """dot_general equations a program runs: inside a scan, once per iteration."""
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == "dot_general"
    inner = sum(_matmuls(sub) for sub in jax_core.jaxprs_in_params(eqn.params))
    total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
  return total


def test_keeping_every_blocks_residuals_gives_the_same_gradient_with_fewer_matmuls():
  """model.remat_blocks=False drops the block-level recompute: the same gradient, one forward
  per block fewer in the gradient's program (XLA's cost analysis counts a loop's body once,
  so the matmuls are counted in the jaxpr, per scan iteration), more memory held."""
  matmuls, grads, temp = {}, {}, {}
  for remat_blocks in (True, False):
    config = small_config("sft")
    config.model.remat = "full"
    config.model.remat_blocks = remat_blocks
    run = run_builder.build_run(config)
    stage = trainer._STAGES["sft"](run)
    params = model.init_params(run.model, jax.random.key(0))
    stage.start(params)
    batch, _ = stage.batch(0, None, slice(0, config.train.batch_size))
    grad = jax.grad(lambda p: stage.objective()(p, batch, jax.random.key(0))[0])
    matmuls[remat_blocks] = _matmuls(jax.make_jaxpr(grad)(params).jaxpr)
    temp[remat_blocks] = jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes
    grads[remat_blocks] = jax.jit(grad)(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads[True], grads[False])
  assert matmuls[False] < matmuls[True], matmuls
  assert temp[False] > temp[True], temp


def test_the_kl_reference_is_held_in_the_compute_dtype_and_scores_as_the_master_weights():
  """float32 master weights computed in bfloat16: RL's KL reference holds its copy of the
  trainable leaves in bfloat16 (half the bytes) and scores every turn exactly as the float32
  weights it was copied from; a leaf already in the compute dtype is copied, never aliased
  (the train step donates the state)."""
  config = small_config("rl")
  config.model.dtype = "bfloat16"
  run = run_builder.build_run(config)
  stage = trainer._STAGES["rl"](run)
  params = model.init_params(run.model, jax.random.key(0))
  assert run.model.param_dtype == "float32"
  optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(learning_rate=1e-3))
  state = state_lib.create_train_state(params, "backbone", optimizer, 0)
  stage.start(state.params)
  floating = {p: v for p, v in stage.reference_trainable.items()
              if jnp.issubdtype(v.dtype, jnp.floating) and p[-1] not in model.FLOAT32_READ}
  assert floating and all(v.dtype == jnp.bfloat16 for v in floating.values())
  batch, _ = stage.batch(0, state, slice(0, config.train.batch_size))
  _, frozen = state_lib.split(state.params, stage.paths)
  from_reference = stage._score(state_lib.merge(stage.reference_trainable, frozen), batch.turns)
  from_master = stage._score(state.params, batch.turns)
  jax.tree.map(np.testing.assert_array_equal, from_reference, from_master)
  ids = trainer.reference_leaves(params, stage.paths, run.model.replace(dtype="float32"))
  flat = flax.traverse_util.flatten_dict(params)
  assert all(ids[p] is not flat[p] for p in ids)
