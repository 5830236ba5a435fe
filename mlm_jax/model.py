"""The run's masked-LM model: pretrained (hub id, HF directory) or a fresh RoBERTa, and the
forward functions the steps call."""

import math
from typing import Callable

import jax.numpy as jnp
import transformers

from mlm_jax import validation
from mlm_jax import vocabulary
from mlm_jax.errors import UserError
from mlm_jax.models import FlaxAutoModelForMaskedLM

DTYPES = {name: getattr(jnp, name) for name in validation.DTYPE_NAMES}


def compute_dtype(name: str):
  validation.check_choice('dtype', name, validation.DTYPE_NAMES)
  return DTYPES[name]


def scratch_model_config(config, tokenizer) -> transformers.RobertaConfig:
  """A RoBERTa config for training from scratch, sized to the tokenizer."""
  positions = validation.SCRATCH_MAX_LENGTH + tokenizer.pad_token_id + 1  # After the pad id.
  kwargs = dict(max_position_embeddings=positions,
                type_vocab_size=1, layer_norm_eps=1e-5)
  kwargs.update(config.model_config.to_dict())
  return transformers.RobertaConfig(
      vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)


def create_model(config, tokenizer,
                 log: Callable[[str], None] = print) -> FlaxAutoModelForMaskedLM:
  """The model in `config.dtype` for computation; its parameters stay float32. `log` takes
  the loader's one-line notices (a fresh head for a bare encoder): the loop passes its own."""
  kwargs = dict(dtype=compute_dtype(config.dtype), seed=config.seed,
                attention_impl=config.attention_impl, remat_policy=config.remat_policy)
  if config.model_name_or_path:
    model = FlaxAutoModelForMaskedLM.from_pretrained(config.model_name_or_path, log=log,
                                                     **kwargs)
    model = vocabulary.extend(model, config, tokenizer, log)  # add_tokens, padding.
  else:
    # No parameters yet: `steps.init_train_state` creates them sharded, on the devices.
    model = FlaxAutoModelForMaskedLM.from_config(scratch_model_config(config, tokenizer),
                                                 _do_init=False, **kwargs)
  check_vocabulary(tokenizer, model.config)
  return model


def check_vocabulary(tokenizer, model_config: transformers.PretrainedConfig) -> None:
  if len(tokenizer) > model_config.vocab_size:
    raise UserError(f'the tokenizer has {len(tokenizer)} tokens but the model only '
                    f'{model_config.vocab_size}; use the model\'s own tokenizer')


def initial_params(model: FlaxAutoModelForMaskedLM):
  """The model's float32 parameters: its loaded weights or, for a model built without them
  (`_do_init=False`, so that they can be created sharded), fresh ones from its seed."""
  if model._is_initialized:  # pylint: disable=protected-access
    return model.params
  return model.init_weights(model.key)


def max_block_size(model_config: transformers.PretrainedConfig) -> int:
  """The longest block the model's positions allow."""
  from mlm_jax.models import registry  # pylint: disable=import-outside-toplevel
  return registry.family(model_config.model_type).max_positions(model_config)


def check_block_size(block_size: int, model_config: transformers.PretrainedConfig) -> None:
  limit = max_block_size(model_config)
  if not 0 < block_size <= limit:
    raise UserError(f'block_size={block_size} is outside what the model allows (1..{limit}); '
                    f'set --config.block_size to at most {limit}')


def max_predictions(block_size: int, probability: float, dispersion: float = 1.0,
                    overflow: float = 1e-9) -> int:
  """Tokens per row the masked head predicts: for token masking the smallest k such that a
  row of `block_size` tokens, each masked with `probability`, has more than k masked tokens
  with probability below `overflow` (the binomial tail, summed exactly).

  Whole-word masking chooses tokens in groups: `dispersion` (`masking.count_dispersion`, 1
  for token masking) widens k's distance above the mean by its square root, as it widens
  the count's standard deviation. Masked tokens beyond k stay masked in the input but are
  not predicted; the train step counts them (`dropped_masked_tokens`).
  """
  log_p, log_q = math.log(probability), math.log1p(-probability)
  def pmf(k: int) -> float:
    return math.exp(math.lgamma(block_size + 1) - math.lgamma(k + 1)
                    - math.lgamma(block_size - k + 1) + k * log_p + (block_size - k) * log_q)
  k, tail = block_size, 0.0  # tail = P(more than k masked).
  while k > 0 and tail + pmf(k) < overflow:
    tail += pmf(k)
    k -= 1
  if dispersion != 1.0:
    mean = block_size * probability
    k = math.ceil(mean + (k - mean) * math.sqrt(dispersion))
  return min(block_size, k)


def head_fn(model: FlaxAutoModelForMaskedLM) -> Callable:
  """`fn(input_ids, predict_at, params, train, dropout_rng, attention_mask=None,
  segment_ids=None)` -> logits [batch, k, vocab] at the token indices `predict_at` [batch, k]:
  the model's forward with the vocabulary projection (the largest matmul of a small model)
  on those tokens only."""
  def fn(input_ids, predict_at, params, train: bool, dropout_rng, attention_mask=None,
         segment_ids=None):
    return model(input_ids, attention_mask=attention_mask, params=params, train=train,
                 dropout_rng=dropout_rng, predict_at=predict_at, segment_ids=segment_ids).logits
  return fn
