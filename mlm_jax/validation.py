"""The run's config and workdir, checked in one place before any data or model is touched."""

import ml_collections

from mlm_jax import masking
from mlm_jax import model as model_lib
from mlm_jax.errors import UserError


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects values that would fail later, with the key and the fix."""
  positive = ('block_size', 'per_device_batch_size', 'grad_accum_steps', 'eval_batch_size',
              'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
              'keep_checkpoints', 'num_proc', 'max_nonfinite_steps', 'fsdp',
              'tokenizer_train_max_texts', 'stop_check_every_steps')
  for key in positive:
    if config[key] < 1:
      raise UserError(f'{key}={config[key]} must be at least 1; set --config.{key}')
  masking.check_config(config)
  if config.learning_rate <= 0:
    raise UserError(f'learning_rate={config.learning_rate} must be positive')
  if config.num_train_steps == 0 or config.num_train_steps < -1:
    raise UserError(f'num_train_steps={config.num_train_steps} must be positive, or -1 to '
                    'train for num_epochs')
  if config.num_train_steps == -1 and config.num_epochs < 1:
    raise UserError(f'num_epochs={config.num_epochs} must be at least 1')
  model_lib.compute_dtype(config.dtype)
  model_lib.check_implementation(config.model_impl)
  if config.max_eval_blocks < 0:
    raise UserError(f'max_eval_blocks={config.max_eval_blocks} must be 0 (all) or positive')
  if config.push_to_hub and not config.hub_model_id:
    raise UserError('push_to_hub=True needs --config.hub_model_id=USER/NAME')
