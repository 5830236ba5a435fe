"""The optimizer: AdamW with global-norm clipping, its learning-rate schedule and decay mask."""

from typing import Any

import ml_collections
import optax
from flax import traverse_util

from mlm_jax.errors import UserError


def decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay: all but biases and LayerNorm scales."""
  flat = traverse_util.flatten_dict(params)
  mask = {path: path[-1] != 'bias' and path[-2:] != ('LayerNorm', 'scale') for path in flat}
  return traverse_util.unflatten_dict(mask)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then linear or cosine decay to 0 at `total_steps`."""
  warmup = min(config.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if config.lr_schedule == 'linear':
    decay = optax.linear_schedule(config.learning_rate, 0.0, decay_steps)
  elif config.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
  else:
    raise UserError(f'lr_schedule={config.lr_schedule!r} is not supported; use linear or cosine')
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
