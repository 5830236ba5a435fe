"""What a run is made of: its config, workdir, tokenizer, model and data, ready to train."""

import dataclasses
import math
from typing import Any, Callable

import jax
import ml_collections

from mlm_jax.data import block_store
from mlm_jax.data import input_pipeline
from mlm_jax.data import mixture
from mlm_jax import masking
from mlm_jax import model as model_lib
from mlm_jax.data import preparation
from mlm_jax import report
from mlm_jax import sharding
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax import vocabulary
from mlm_jax.errors import UserError


@dataclasses.dataclass
class Run:
  """What a run is made of, once the data, tokenizer and model are ready."""
  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: Any
  spec: masking.MaskingSpec
  model: Any
  sources: tuple[mixture.SourceBlocks, ...]  # One, named '', without a mixture.
  global_batch_size: int  # Rows per optimizer step, over all devices and micro-batches.
  eval_batch_size: int
  total_steps: int

  @property
  def blocks(self) -> block_store.Prepared:
    """The blocks of a run of one source."""
    if len(self.sources) != 1:
      raise ValueError('a mixture has several sources: read `sources`')
    return self.sources[0].blocks

  @property
  def train_blocks(self) -> list:
    return [s.blocks.train for s in self.sources]

  @property
  def weights(self) -> list[float]:
    return [s.weight for s in self.sources]

  @property
  def blocks_per_epoch(self) -> int:
    return blocks_per_epoch(self.sources)

  def config_record(self) -> dict:
    """The config as a checkpoint records it, to refuse a resume that changes its meaning."""
    record = self.config.to_dict()
    record['global_batch_size'] = self.global_batch_size
    return record


def prepare_data(config: ml_collections.ConfigDict, workdir: str):
  """(tokenizer, sources' blocks): process 0 prepares them (or finds them in the cache); the
  other hosts wait, then open what it wrote. A run's saved tokenizer wins over the config's."""
  prepared = sharding.on_process_zero(
      lambda: preparation.prepare_sources(config, _saved_tokenizer(config, workdir),
                                          report.log, check_tokenizer=tokenizer_check(config)),
      'process 0 could not prepare the data (see its error); fix it and rerun')
  if prepared is not None:
    return prepared.tokenizer, prepared.sources
  tokenizer = preparation.tokenizer_of(config, workdir)
  return tokenizer, preparation.open_sources(config, tokenizer)


def _saved_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """The tokenizer of the run in `workdir`, if any, once its added words are the config's."""
  saved = tokenizer_lib.saved_tokenizer(workdir)
  if saved is not None:
    vocabulary.check_resumed_words(config, saved, workdir)
  return saved


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Prepares the data and tokenizer (see `prepare_data`) and builds the model.

  The config is validated already (`train.train_and_evaluate` does it first).
  """
  tokenizer, sources = prepare_data(config, workdir)
  spec = masking_spec(config, tokenizer)
  model = model_lib.create_model(config, tokenizer, log=report.log)
  model_lib.check_block_size(config.block_size, model.config)
  tokenizer.model_max_length = min(tokenizer.model_max_length,
                                   model_lib.max_block_size(model.config))
  sharding.sync_hosts('mlm_jax_tokenizer')  # No host reads the saved tokenizer while it is written.
  sharding.on_process_zero(lambda: tokenizer_lib.save_tokenizer(tokenizer, workdir),
                           f'process 0 could not save the tokenizer in {workdir} (see its error)')
  devices = jax.device_count()
  global_batch = config.per_device_batch_size * devices * config.grad_accum_steps
  per_epoch = input_pipeline.steps_per_epoch(blocks_per_epoch(sources), global_batch)
  total = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * per_epoch
  return Run(config, workdir, tokenizer, spec, model, sources, global_batch,
             eval_batch_size(config), total)


def blocks_per_epoch(sources: tuple[mixture.SourceBlocks, ...]) -> int:
  """Train blocks per epoch (of a mixture: until its first source has been read once)."""
  return input_pipeline.blocks_per_epoch([len(s.blocks.train) for s in sources],
                                         [s.weight for s in sources])


def tokenizer_check(config: ml_collections.ConfigDict) -> Callable[[Any], None]:
  """What `preparation.prepare` runs on the tokenizer before tokenizing: a masking or
  attention scope that the tokenizer cannot serve fails fast."""
  def check(tokenizer) -> None:
    masking_spec(config, tokenizer)
    document_separator(config, tokenizer)
  return check


def masking_spec(config: ml_collections.ConfigDict, tokenizer) -> masking.MaskingSpec:
  """The run's masking: `masking`, `mlm_probability`, `mask_replace_prob`,
  `random_replace_prob`; for whole words, the tokenizer's word-start table."""
  table = (tokenizer_lib.word_start_table(tokenizer) if config.masking == 'whole_word'
           else None)
  return masking.masking_spec(tokenizer, config.mlm_probability, scheme=config.masking,
                              mask_replace_prob=config.mask_replace_prob,
                              random_replace_prob=config.random_replace_prob,
                              word_start_table=table)


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """Rows per eval batch: `eval_batch_size` rounded up to a multiple of the devices."""
  devices = jax.device_count()
  return math.ceil(config.eval_batch_size / devices) * devices


def document_separator(config: ml_collections.ConfigDict, tokenizer) -> int | None:
  """The id that ends every document of a block, for `attention_scope='document'`
  (`steps.document_ids`); None for 'block'.

  It is the last token the tokenizer appends to a text (RoBERTa's `</s>`, BERT's
  `[SEP]`), as the preparation encodes each text: a tokenizer that appends no special
  token leaves documents unseparated, which is a `UserError`.
  """
  if config.attention_scope != 'document':
    return None
  last = tokenizer.backend_tokenizer.encode('a').ids[-1]
  if last not in tokenizer.all_special_ids:
    raise UserError(f'attention_scope=document needs a tokenizer that ends every text with '
                    f'a separator token (such as </s> or [SEP]), and '
                    f'{tokenizer.name_or_path or type(tokenizer).__name__!r} does not; '
                    'use --config.attention_scope=block')
  return last
