"""The optimizer: AdamW with global-norm clipping, its learning-rate schedule and decay mask."""

from typing import Any, Callable

import jax
import ml_collections
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
  """Linear warmup from 0, then linear or cosine decay to 0 at `total_steps`."""
  warmup = min(config.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if config.lr_schedule == 'linear':
    decay = optax.linear_schedule(config.learning_rate, 0.0, decay_steps)
  elif config.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
  else:  # validation.validate_config allows only the two above.
    raise ValueError(f'unknown lr_schedule {config.lr_schedule!r}')
  warm = optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1))
  return optax.join_schedules([warm, decay], [warmup])


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(config, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm),
      optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay,
                  mask=decay_mask))
  return tx, schedule


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
