"""The learning-rate schedule, the MLPs' optimisers and the losses.

The schedule is a function of the step count alone, so that the MLPs' optax
update and the tables' sparse update (`dlrm_jax.embedding.optimizers`) train
at one rate on one step.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dlrm_jax.config import ConfigError, parse_args
from dlrm_jax.specs import TrainingSpec


def lr_schedule(t: TrainingSpec) -> Callable[[jax.Array], jax.Array]:
  """The reference's (MLPerf) policy, `LRPolicyScheduler` of `dlrm_s_pytorch.py`.

  Step s (0-based) trains with the rate for t = s + 1 (the scheduler's
  `_step_count`, 1 when it is created): t < W (warmup steps) gives lr * t / W;
  S <= t < S + N (decay start, decay steps) gives lr * ((N - (t - S)) / N)^2,
  floored at 1e-7. With a decay configured, the other steps hold the last rate
  set: lr * (W - 1) / W between warmup and decay, the last decayed rate after
  it (and lr itself before a decay that follows no warmup, where the reference
  has no rate to hold); without one, they train at lr.
  """
  base = t.learning_rate
  warmup, decay_start, decay_steps = (t.lr_num_warmup_steps, t.lr_decay_start_step,
                                      t.lr_num_decay_steps)
  held = base * (warmup - 1) / warmup if warmup > 1 else base

  def schedule(step):
    t = jnp.asarray(step, jnp.float32) + 1.0
    lr = jnp.asarray(base, jnp.float32)
    if decay_steps > 0:
      done = jnp.clip(t - decay_start, 0.0, decay_steps - 1)  # held at the last decayed rate
      decayed = jnp.maximum(base * ((decay_steps - done) / decay_steps) ** 2, 1e-7)
      lr = jnp.where(t >= decay_start, decayed, held)
    if warmup > 0:
      lr = jnp.where(t < warmup, base * t / warmup, lr)
    return lr

  return schedule


class AdagradState(NamedTuple):
  sum_of_squares: optax.Updates


def describe_lr(t: TrainingSpec, num_steps: int) -> str:
  """The learning-rate policy (`lr_schedule`) in words, and where a run of
  `num_steps` steps ends in it."""
  rate, warmup = t.learning_rate, t.lr_num_warmup_steps
  start, decay = t.lr_decay_start_step, t.lr_num_decay_steps
  parts = [f"{rate:g}"]
  if warmup:
    parts.append(f"warmup over {warmup:,} steps")
  if decay:
    parts.append(f"quadratic decay from step {start:,} over {decay:,} steps, then held")
  if len(parts) == 1:
    return f"{rate:g}, constant"
  end = start + decay if decay else warmup
  where = ("" if num_steps >= end
           else " (this run ends during the warmup)" if num_steps < warmup
           else " (this run ends before the decay)" if num_steps < start
           else " (this run ends during the decay)")
  return ", ".join(parts) + where + "; by step number, whatever the run's length"


def scale_by_adagrad(eps: float = 1e-10,
                     initial_accumulator_value: float = 0.0) -> optax.GradientTransformation:
  """torch.optim.Adagrad's scaling (the reference's `--optimizer adagrad`, MLPerf
  DLRM-DCNv2's dense optimiser): a += g^2, g / (sqrt(a) + eps), a starting at
  `initial_accumulator_value`. optax.adagrad puts eps inside the root
  (g * rsqrt(a + eps)), which changes the first steps of parameters whose
  gradients are near sqrt(eps)."""

  def init(params):
    return AdagradState(jax.tree.map(
        lambda p: jnp.full_like(p, initial_accumulator_value), params))

  def update(updates, state, params=None):
    del params
    acc = jax.tree.map(lambda a, g: a + jnp.square(g), state.sum_of_squares, updates)
    updates = jax.tree.map(lambda g, a: g / (jnp.sqrt(a) + eps), updates, acc)
    return updates, AdagradState(acc)

  return optax.GradientTransformation(init, update)


def make_dense_optimizer(t: TrainingSpec) -> optax.GradientTransformation:
  """The optax optimiser for the MLPs, at a learning rate of 1.

  The train step scales its updates by the schedule's rate for `TrainState.step`
  (each optimiser's update is linear in the rate), so the MLPs and the tables
  follow one schedule on one step count.
  `dense_optimizer_args` sets the hyper-parameters that `DENSE_OPTIMIZERS` lists
  for it ("eps=1e-8"); the others keep their defaults. With `grad_clip_norm` > 0 the
  gradients are first clipped to that global norm (torch's clip_grad_norm_, as
  DLRMv4's reference does; the tables' gradients are not clipped, as there).
  """
  name = t.dense_optimizer
  if name not in DENSE_OPTIMIZERS:
    raise ConfigError(f"dense_optimizer={name!r} is not one of {tuple(DENSE_OPTIMIZERS)}")
  make, allowed = DENSE_OPTIMIZERS[name]
  args = parse_args("dense_optimizer_args", t.dense_optimizer_args)
  unknown = sorted(set(args) - set(allowed))
  if unknown:
    raise ConfigError(f"dense_optimizer_args={t.dense_optimizer_args!r}: {name} has no "
                      f"{unknown}; its hyper-parameters are {list(allowed) or 'none'}")
  if t.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), make(**args))
  return make(**args)


# dense_optimizer -> (its optax optimiser at lr 1 from keyword hyper-parameters, their names).
DENSE_OPTIMIZERS = {
    "sgd": (lambda: optax.sgd(1.0), ()),
    "adagrad": (lambda **kw: optax.chain(scale_by_adagrad(**kw), optax.scale(-1.0)),
                ("eps", "initial_accumulator_value")),
    "adam": (lambda **kw: optax.adam(1.0, **kw), ("b1", "b2", "eps")),
}


def make_loss(t: TrainingSpec) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Mean loss of logits against 0/1 labels: bce, mse (on probabilities) or wbce."""
  name = t.loss_function
  if name == "bce":
    return lambda logits, labels: optax.sigmoid_binary_cross_entropy(logits, labels).mean()
  if name == "mse":
    return lambda logits, labels: jnp.mean((jax.nn.sigmoid(logits) - labels) ** 2)
  if name == "wbce":
    w0, w1 = t.loss_weights

    def wbce(logits, labels):
      weights = jnp.where(labels > 0.5, w1, w0)
      return jnp.mean(weights * optax.sigmoid_binary_cross_entropy(logits, labels))

    return wbce
  raise ConfigError(f"loss_function={name!r} is not one of ('bce', 'mse', 'wbce')")
