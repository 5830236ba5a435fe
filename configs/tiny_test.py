"""A tiny model and a few steps: what the tests train."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.tokenizer_vocab_size = 400
  config.model_config = ml_collections.ConfigDict(dict(
      hidden_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=64,
      hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0,
  ))
  config.split = 'train[:100]'  # A third of the sample: enough to learn, quick to evaluate.
  config.block_size = 32
  config.per_device_batch_size = 8
  config.learning_rate = 1e-2
  config.warmup_steps = 2
  config.num_train_steps = 20
  config.eval_every_steps = 10
  config.eval_batch_size = 16
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  return config
