"""The optimizer: AdamW with global-norm clipping, its learning-rate schedule and decay mask.

`make_optimizer` returns optax's chain (its state is what checkpoints hold) that also knows
how to apply itself in one pass per parameter: `update_if_finite` is what the train step
calls (see `ClippedAdamW`).
"""

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util


def decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay: all but biases and every norm's parameters,
  whatever the model calls its norms (RoBERTa's `LayerNorm` and `layer_norm`, DistilBERT's
  `sa_layer_norm`, ModernBERT's `attn_norm` and `final_norm`, ...), as the Trainer excludes
  its norm modules. A flax norm's weight is the leaf `scale`, which nothing else is named."""
  flat = traverse_util.flatten_dict(params)
  mask = {path: path[-1] not in ('bias', 'scale') for path in flat}
  return traverse_util.unflatten_dict(mask)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then down to 0 at `total_steps`: linear, cosine, or
  warmup-stable-decay (see `wsd_schedule`)."""
  warmup = min(config.warmup_steps, total_steps)
  warm = optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1))
  if config.lr_schedule == 'wsd':
    return wsd_schedule(warm, warmup, config, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if config.lr_schedule == 'linear':
    decay = optax.linear_schedule(config.learning_rate, 0.0, decay_steps)
  elif config.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
  else:  # validation.validate_config allows only the three above.
    raise ValueError(f'unknown lr_schedule {config.lr_schedule!r}')
  return optax.join_schedules([warm, decay], [warmup])


def one_minus_sqrt_schedule(init_value: float, decay_steps: int) -> optax.Schedule:
  """init_value * (1 - sqrt(t)), t = count / decay_steps clipped to [0, 1]: the cooldown
  of Hagele et al. (2024) that ModernBERT's training ends with. It stays near the stable
  rate longer than a linear decay, then drops fast."""
  def schedule(count):
    fraction = jnp.clip(jnp.asarray(count, jnp.float32) / decay_steps, 0.0, 1.0)
    return init_value * (1.0 - jnp.sqrt(fraction))
  return schedule


WSD_DECAYS = {'1-sqrt': one_minus_sqrt_schedule,
              'linear': lambda init_value, steps: optax.linear_schedule(init_value, 0.0, steps)}


def wsd_schedule(warm: optax.Schedule, warmup: int, config: ml_collections.ConfigDict,
                 total_steps: int) -> optax.Schedule:
  """Warmup-stable-decay: `warm` over `warmup` steps, the constant peak rate, then a decay
  to 0 over the last `wsd_decay_fraction` of the run (shaped by `wsd_decay`).

  The stable phase needs no end date, so a run can be extended from any checkpoint taken
  before its decay (`replan_schedule=True`) and its decay run then: the reason to prefer
  it over linear or cosine for long pretraining. The decay spans the nearest whole number
  of steps to the fraction (halves up), at least one, and starts no earlier than the
  warmup ends.
  """
  decay_steps = max(math.floor(config.wsd_decay_fraction * total_steps + 0.5), 1)
  decay_start = max(warmup, total_steps - decay_steps)
  decay = WSD_DECAYS[config.wsd_decay](config.learning_rate, max(total_steps - decay_start, 1))
  stable = optax.constant_schedule(config.learning_rate)
  return optax.join_schedules([warm, stable, decay], [warmup, decay_start])


class ClippedAdamW(optax.GradientTransformation):
  """`optax.chain(clip_by_global_norm, adamw)`: its `init`, `update` and state, plus
  `update_if_finite(grads, opt_state, params, finite) -> (params, opt_state)`, the same
  arithmetic in one elementwise pass per parameter (parameter, moments and gradient read
  once, each written once) that leaves everything as it was when `finite` is False.

  Written with optax's pieces, XLA:CPU runs the update as several passes over every
  parameter and moment, and the skip of a non-finite step, a select between the new and the
  old state, keeps the old state alive beside the new (copies of the largest moments): 550
  ms for the distilroberta-base word table alone, against 70 ms here. The skip here is in
  the scalars instead: no learning rate, moments' decay 1 and their gradient weight 0.
  """


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[ClippedAdamW, optax.Schedule]:
  schedule = make_schedule(config, total_steps)
  hyper = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)
  chain = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                      optax.adamw(schedule, mask=decay_mask, **hyper))
  tx = ClippedAdamW(chain.init, chain.update)
  tx.update_if_finite = functools.partial(_clipped_adamw_if_finite, schedule=schedule,
                                          max_norm=config.max_grad_norm, **hyper)
  return tx, schedule


def update_if_finite(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                     finite: jax.Array) -> tuple[Any, Any]:
  """(params, opt_state) after `tx`'s update, or as they were where `finite` is False."""
  fused = getattr(tx, 'update_if_finite', None)
  if fused is not None:
    return fused(grads, opt_state, params, finite)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  return keep(optax.apply_updates(params, updates), params), keep(new_opt_state, opt_state)


def _clipped_adamw_if_finite(grads, opt_state, params, finite, *, schedule, max_norm, b1, b2, eps,
                             weight_decay):
  """`ClippedAdamW.update_if_finite`: optax's operations in optax's order, so that a finite
  step's results are optax's (to rounding, where the gradient is clipped)."""
  clip_state, (adam, masked, lr_state) = opt_state
  norm = optax.tree.norm(grads)
  count = optax.safe_increment(adam.count)  # The bias corrections' count, as optax's.
  mu_decay, nu_decay = jnp.where(finite, b1, 1.0), jnp.where(finite, b2, 1.0)
  mu_weight = jnp.where(finite, np.float32(1 - b1), 0.0)
  nu_weight = jnp.where(finite, np.float32(1 - b2), 0.0)
  mu_correction = (1 - b1 ** count).astype(jnp.float32)
  nu_correction = (1 - b2 ** count).astype(jnp.float32)
  step_size = jnp.where(finite, -1 * schedule(lr_state.count), 0.0)

  # Clipping multiplies by max_norm / norm where optax divides by the norm, then multiplies:
  # the same to rounding, and a division per element would be written out as one more pass.
  clip = jnp.where(norm < max_norm, 1.0, max_norm / norm)

  def leaf(param, mu, nu, grad, decays):
    grad = jnp.where(finite, grad * clip.astype(grad.dtype), 0.0)  # 0 x NaN would be NaN.
    mu = mu_weight * grad + mu_decay * mu
    nu = nu_weight * grad ** 2 + nu_decay * nu
    update = (mu / mu_correction) / (jnp.sqrt(nu / nu_correction + 0.0) + eps)
    if decays:
      update = update + weight_decay * param
    return param + (step_size.astype(update.dtype) * update).astype(param.dtype), mu, nu

  treedef = jax.tree_util.tree_structure(params)
  new = treedef.flatten_up_to(jax.tree_util.tree_map(leaf, params, adam.mu, adam.nu, grads,
                                                     decay_mask(params)))
  new_params, mu, nu = (treedef.unflatten(list(column)) for column in zip(*new))
  advance = lambda c: jnp.where(finite, optax.safe_increment(c), c)
  adam = adam._replace(count=advance(adam.count), mu=mu, nu=nu)
  return new_params, (clip_state, (adam, masked, lr_state._replace(count=advance(lr_state.count))))


def applied_learning_rate(schedule: optax.Schedule, opt_state: Any) -> jax.Array:
  """The rate the next update applies: the schedule at the optimizer's own count, which a
  skipped (non-finite) step does not advance, unlike `TrainState.step`."""
  is_count = lambda x: isinstance(x, optax.ScaleByScheduleState)
  counts = [s.count for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_count)
            if is_count(s)]
  return schedule(counts[0])


def plan_schedule(total_steps: int, saved_steps: int | None, replan: bool,
                  log: Callable[[str], None]) -> int:
  """The steps the schedule spans: a resumed run keeps the one its checkpoint was trained
  with (`saved_steps`), so the rate does not jump when the run's length changes, unless
  `replan` asks for the new length; either way it says which."""
  if saved_steps is None or saved_steps == total_steps:
    return total_steps
  if replan:
    log(f'Re-planning the learning-rate schedule over {total_steps} steps (the checkpoint\'s '
        f'spans {saved_steps}) as replan_schedule=True asks: the rate moves to what a '
        f'{total_steps}-step run has at this step.')
    return total_steps
  after = (f' Steps after {saved_steps} train at learning rate 0.'
           if total_steps > saved_steps else '')
  log(f'Continuing the checkpoint\'s learning-rate schedule over {saved_steps} steps although '
      f'this run trains {total_steps}; pass --config.replan_schedule=True to plan it over '
      f'{total_steps} instead.{after}')
  return saved_steps
