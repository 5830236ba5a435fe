"""What a run is made of: its config, workdir, tokenizer, model and data, ready to train."""

import dataclasses
import math
from typing import Any

import jax
import ml_collections

from mlm_jax import data
from mlm_jax import input_pipeline
from mlm_jax import masking
from mlm_jax import model as model_lib
from mlm_jax import report
from mlm_jax import sharding
from mlm_jax import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Run:
  """What a run is made of, once the data, tokenizer and model are ready."""
  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: Any
  spec: masking.MaskingSpec
  model: Any
  blocks: data.Blocks
  global_batch_size: int  # Rows per optimizer step, over all devices and micro-batches.
  eval_batch_size: int
  total_steps: int

  def config_record(self) -> dict:
    """The config as a checkpoint records it, to refuse a resume that changes its meaning."""
    record = self.config.to_dict()
    record['global_batch_size'] = self.global_batch_size
    return record


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Loads and tokenizes the data and builds the tokenizer and model."""
  texts = data.load_texts(config, report.log)
  tokenizer = tokenizer_lib.get_tokenizer(config, workdir, train_texts=texts['train']['text'])
  spec = masking.spec_from_config(tokenizer, config)  # Before tokenizing: bad masking fails fast.
  model = model_lib.create_model(config, tokenizer)
  model_lib.check_block_size(config.block_size, model.config)
  tokenizer.model_max_length = min(tokenizer.model_max_length,
                                   model_lib.max_block_size(model.config))
  sharding.sync_hosts('mlm_jax_tokenizer')  # No host reads the saved tokenizer while it is written.
  if jax.process_index() == 0:
    tokenizer_lib.save_tokenizer(tokenizer, workdir)
  blocks = data.make_blocks(config, tokenizer, texts, report.log)
  devices = jax.device_count()
  global_batch = config.per_device_batch_size * devices * config.grad_accum_steps
  per_epoch = input_pipeline.steps_per_epoch(len(blocks.train), global_batch)
  total = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * per_epoch
  eval_batch = math.ceil(config.eval_batch_size / devices) * devices
  return Run(config, workdir, tokenizer, spec, model, blocks, global_batch, eval_batch, total)
