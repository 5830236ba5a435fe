"""The Hugging Face masked-language-modeling guide: DistilRoBERTa on ELI5 (r/askscience).

Needs the model and dataset hubs (or local copies passed as
--config.model_name_or_path / --config.data_files).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model_name_or_path = 'distilbert/distilroberta-base'
  config.dataset = 'eli5_category'
  config.split = 'train[:5000]'
  config.test_size = 0.2
  config.block_size = 128
  config.mlm_probability = 0.15
  config.learning_rate = 2e-5
  config.weight_decay = 0.01
  config.warmup_steps = 0
  config.num_epochs = 3
  config.per_device_batch_size = 8
  config.eval_batch_size = 64
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.log_every_steps = 50
  config.num_proc = 4
  return config
