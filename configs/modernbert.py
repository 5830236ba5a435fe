"""The guide's recipe for ModernBERT: `answerdotai/ModernBERT-base` on ELI5 (r/askscience).

As configs/eli5_distilroberta.py (data, split, blocks of 128 tokens, 3 epochs), with what
ModernBERT's own training did differently:
  * masking rate 0.3, the rate it was pretrained with (the guide's 0.15 also works; see README);
  * a warmup-stable-decay schedule with a 1-sqrt decay, as ModernBERT's training code;
  * attention inside each document of a block: its pretraining never attended across the
    texts packed into one sequence.
Needs the model and dataset hubs, or local copies (--config.model_name_or_path=DIR,
--config.data_files=PATH). `block_size` may go up to the model's 8192 positions.
"""

import ml_collections

from configs import eli5_distilroberta


def get_config() -> ml_collections.ConfigDict:
  config = eli5_distilroberta.get_config()
  config.model_name_or_path = 'answerdotai/ModernBERT-base'
  config.mlm_probability = 0.3
  config.learning_rate = 5e-5
  config.warmup_steps = 50
  config.lr_schedule = 'wsd'
  config.wsd_decay_fraction = 0.1
  config.wsd_decay = '1-sqrt'
  config.attention_scope = 'document'
  return config
