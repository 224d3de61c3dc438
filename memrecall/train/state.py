"""Train state, trainable subsets, the optimizer and the jitted, donated step.

Parameters are one tree; a *trainable subset* is chosen by name (`beacon`,
`lora`, `gate`, `backbone`, `all`).  The step differentiates only with
respect to that subset (the rest is closed over, so XLA never computes its
gradients), keeps optimizer state only for it, and passes frozen leaves
through untouched — with the state donated they are neither copied nor moved.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import optax

from memrecall.models.config import ConfigError
from memrecall.models import qwen2
from memrecall.models.qwen2 import abstract_params
from memrecall.runtime import sharding as sharding_lib

Array = jax.Array
SUBSETS = ("beacon", "lora", "gate", "backbone", "all")


def _is_beacon(path: tuple[str, ...]) -> bool:
  return path[-1] == "beacon_embedding" or path[-1].startswith("beacon_")


def _is_lora(path: tuple[str, ...]) -> bool:
  return "_lora_" in path[-1]


_PREDICATES: dict[str, Callable[[tuple[str, ...]], bool]] = {
    "beacon": _is_beacon,
    "lora": _is_lora,
    "gate": qwen2.is_gate_param,
    "backbone": lambda path: not qwen2.is_gate_param(path),  # compressor + reasoner, jointly
    "all": lambda path: True,
}


def trainable_paths(params, subset: str) -> tuple[tuple[str, ...], ...]:
  if subset not in _PREDICATES:
    raise ValueError(f"unknown trainable subset {subset!r}; choose from {SUBSETS}")
  paths = tuple(p for p in flax.traverse_util.flatten_dict(params) if _PREDICATES[subset](p))
  if not paths:
    raise ValueError(f"the trainable subset {subset!r} selects no parameter of this model "
                     "(does its config have the compressor / gate?)")
  return paths


def split(params, paths) -> tuple[dict, dict]:
  """(trainable, frozen) flat dicts keyed by path tuples."""
  flat = flax.traverse_util.flatten_dict(params)
  wanted = set(paths)
  return ({p: v for p, v in flat.items() if p in wanted},
          {p: v for p, v in flat.items() if p not in wanted})


def merge(trainable: dict, frozen: dict):
  return flax.traverse_util.unflatten_dict({**frozen, **trainable})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-6
  warmup_steps: int = 0
  decay_steps: int = 0  # cosine decay to `final_fraction` of the peak; 0 = constant
  final_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.01
  grad_clip: float = 1.0

  def __post_init__(self):
    if self.decay_steps and self.decay_steps <= self.warmup_steps:
      raise ConfigError(f"optimizer.decay_steps ({self.decay_steps}) must exceed "
                       f"optimizer.warmup_steps ({self.warmup_steps})")
    if not self.grad_clip > 0:  # optax would scale every gradient to 0
      raise ConfigError(f"optimizer.grad_clip={self.grad_clip}: the global norm gradients are "
                        "clipped to must be positive (the recipes' 1.0)")


def make_optimizer(cfg: OptimizerConfig, updates_per_step: int = 1
                   ) -> optax.GradientTransformation:
  """Gradient clipping, then AdamW with decoupled weight decay on every trainable parameter
  (norms, biases and embeddings too, as verl's AdamW), under the learning-rate schedule: a
  linear warmup from 0 over `warmup_steps` (step 0 then trains at 0, as Hugging Face's
  schedules do), then cosine decay or constant.  Always a schedule, so the optimizer state has
  one structure whatever the settings, and a resume may change them.

  updates_per_step: optimizer updates a train step makes (RL's `rl.updates_per_batch`); the
  schedule counts steps, as verl's scheduler counts rollout batches, not updates."""
  if not isinstance(updates_per_step, int) or updates_per_step < 1:
    raise ConfigError(f"updates per step must be a positive integer, got {updates_per_step!r}")
  lr = cfg.learning_rate
  if cfg.decay_steps and cfg.warmup_steps:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup_steps, cfg.decay_steps,
                                                  lr * cfg.final_fraction)
  elif cfg.decay_steps:  # no warmup: the first step trains at the peak
    schedule = optax.cosine_decay_schedule(lr, cfg.decay_steps, alpha=cfg.final_fraction)
  elif cfg.warmup_steps:
    schedule = optax.linear_schedule(0.0, lr, cfg.warmup_steps)
  else:
    schedule = optax.constant_schedule(lr)
  if updates_per_step > 1:
    per_update = schedule
    schedule = lambda count: per_update(count // updates_per_step)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))


@flax.struct.dataclass
class TrainState:
  """step, params (whole tree), opt_state (trainable subset only), rng (raw key data)."""
  step: Array
  params: Any
  opt_state: Any
  rng: Array


def create_train_state(params, subset: str, optimizer: optax.GradientTransformation,
                       seed: int) -> TrainState:
  trainable, _ = split(params, trainable_paths(params, subset))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(trainable),
                    rng=jax.random.key_data(jax.random.key(seed)))


def state_shardings(config, state_shape: TrainState, mesh) -> TrainState:
  """NamedShardings for a TrainState: params by the logical rules, optimizer moments like
  their parameters, everything else replicated."""
  param_sharding = sharding_lib.param_shardings(abstract_params(config), mesh)
  flat_params = flax.traverse_util.flatten_dict(param_sharding)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def for_opt(path, leaf):
    # Optimizer moments sit in dicts keyed by their parameter's path tuple.
    for entry in path:
      key = getattr(entry, "key", None)
      if isinstance(key, tuple) and key in flat_params:
        return flat_params[key]
    return replicated

  opt = jax.tree_util.tree_map_with_path(for_opt, state_shape.opt_state)
  return TrainState(step=replicated, params=param_sharding, opt_state=opt, rng=replicated)


# A loss's metric that counts what its mean divides by (masked tokens for a token mean, rows
# for a mean over rows): microbatches are weighted by it, so k parts make the whole batch's
# mean, not the mean of k parts' means.  A loss without it weighs every part alike.
LOSS_WEIGHT = "loss_weight"


class Ratio(NamedTuple):
  """A metric reported as numerator / denominator (a gate's precision: true positives over
  predicted positives).  The step sums both over microbatches before dividing, so k parts give
  the whole batch's ratio, not a weighted mean of the parts' ratios; 0 where nothing is counted."""
  numerator: Array
  denominator: Array


_is_ratio = lambda x: isinstance(x, Ratio)


def resolve_ratios(metrics: dict) -> dict:
  """Each `Ratio` as its value."""
  value = lambda r: jnp.where(r.denominator > 0, r.numerator / jnp.where(
      r.denominator > 0, r.denominator, 1), 0.0) if _is_ratio(r) else r
  return jax.tree.map(value, metrics, is_leaf=_is_ratio)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    paths, microbatches: int = 1, updates: int = 1) -> Callable:
  """A step (state, batch) -> (state, metrics) for loss_fn(params, batch, rng) -> (loss, metrics).

  A non-finite loss or gradient leaves the state unchanged (with several updates: as the
  updates before it left it) and reports `finite = 0`, so the caller can stop without ever
  saving a bad state.
  microbatches k > 1: an update's rows are cut into k equal parts, run one after another in a
  `lax.scan` (activations of one part live at a time), and the loss, metrics and gradients are
  their means weighted by the parts' `LOSS_WEIGHT` metric: the whole batch's loss and gradient
  when the loss is a mean over what that metric counts (RL's and SFT's token means over turns
  of different lengths too).  Metrics given as a `Ratio` are summed, then divided: the whole
  batch's ratio.
  updates u > 1 (RL's mini-batches, verl's `ppo_mini_batch_size`): the batch's rows are cut
  into u consecutive equal parts and the optimizer updates once on each in turn, each loss
  seeing the parameters the previous updates left; the metrics are the updates' means.  The
  step counts one (`state.step`).  A non-finite update ends it there: the updates before it
  stay, the step does not count, and `finite` is 0 (the trainer then stops, saving nothing).
  Keeping the step's starting state to undo them would hold a second copy of the trainable
  weights and their optimizer state through the loop (measured: +52% of a 0.5B RL step's
  temporaries).
  """
  def grads_of(trainable, frozen, batch, rng):
    loss_of = lambda t: loss_fn(merge(t, frozen), batch, rng)
    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    weight = jax.lax.stop_gradient(metrics.pop(LOSS_WEIGHT, jnp.ones((), jnp.float32)))
    return (loss, metrics), grads, weight

  def accumulated(trainable, frozen, batch, rng):
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % microbatches:
      raise ValueError(f"a batch of {rows} rows does not split into {microbatches} microbatches")
    parts = jax.tree.map(lambda x: x.reshape((microbatches, rows // microbatches) + x.shape[1:]),
                         batch)

    def one(total, xs):
      part, key = xs
      (loss, metrics), grads, weight = grads_of(trainable, frozen, part, key)
      sums, weights = total
      weighted = jax.tree.map(lambda x: x if _is_ratio(x) else x * weight,
                              ((loss, metrics), grads), is_leaf=_is_ratio)
      return (jax.tree.map(jnp.add, sums, weighted), weights + weight), None

    shapes = jax.eval_shape(grads_of, trainable, frozen, jax.tree.map(lambda x: x[0], parts), rng)
    zero = (jax.tree.map(jnp.zeros_like, shapes[:2]), jnp.zeros((), jnp.float32))
    (sums, weights), _ = jax.lax.scan(one, zero, (parts, jax.random.split(rng, microbatches)))
    # Parts that count nothing (no token scored) add nothing; all of them: zeros.
    mean = lambda x: x if _is_ratio(x) else x / jnp.maximum(weights, 1e-30)
    return jax.tree.map(mean, sums, is_leaf=_is_ratio) + (weights,)

  compute = grads_of if microbatches == 1 else accumulated
  # An update's new trainable leaves and optimizer state where it was finite, else the old.
  kept = lambda finite, new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

  def update(trainable, opt_state, frozen, batch, rng):
    (loss, metrics), grads, _ = compute(trainable, frozen, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    changes, opt_state = optimizer.update(grads, opt_state, trainable)
    metrics = {**resolve_ratios(metrics), "grad_norm": grad_norm,
               "finite": finite.astype(jnp.float32)}
    return optax.apply_updates(trainable, changes), opt_state, metrics

  def step(state: TrainState, batch):
    rng = jax.random.wrap_key_data(state.rng)
    rng, step_rng = jax.random.split(rng)
    trainable, frozen = split(state.params, paths)
    if updates == 1:
      new_trainable, opt_state, metrics = update(trainable, state.opt_state, frozen, batch,
                                                 step_rng)
      finite = metrics["finite"] > 0
      new_trainable, opt_state = kept(finite, (new_trainable, opt_state),
                                      (trainable, state.opt_state))
    else:
      rows = jax.tree.leaves(batch)[0].shape[0]
      if rows % updates:
        raise ValueError(f"a batch of {rows} rows does not split into {updates} updates")
      parts = jax.tree.map(lambda x: x.reshape((updates, rows // updates) + x.shape[1:]), batch)

      def one(carry, xs):
        part, key = xs
        trainable, opt_state, ok = carry
        new_trainable, new_opt_state, metrics = update(trainable, opt_state, frozen, part, key)
        ok = ok & (metrics["finite"] > 0)
        return (*kept(ok, (new_trainable, new_opt_state), (trainable, opt_state)), ok), metrics

      (new_trainable, opt_state, finite), metrics = jax.lax.scan(
          one, (trainable, state.opt_state, jnp.asarray(True)),
          (parts, jax.random.split(step_rng, updates)))
      metrics = jax.tree.map(lambda x: x.mean(0), metrics)
      metrics["finite"] = finite.astype(jnp.float32)
    return TrainState(step=state.step + finite.astype(jnp.int32),
                      params=merge(new_trainable, frozen), opt_state=opt_state,
                      rng=jax.random.key_data(rng)), metrics

  return step
