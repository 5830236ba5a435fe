"""The masked-LM model: `FlaxAutoModelForMaskedLM` from a hub id, a local directory or a config."""

import math
from typing import Callable

import jax.numpy as jnp
import transformers
from transformers.models.roberta import modeling_flax_roberta

from mlm_jax import validation
from mlm_jax.errors import UserError, first_line

DTYPES = {name: getattr(jnp, name) for name in validation.DTYPE_NAMES}
# Models whose module has .roberta and .lm_head, and whose positions start after the padding id.
ROBERTA_FAMILY = ('roberta', 'xlm-roberta', 'camembert')
SCRATCH_MAX_LENGTH = 512  # Tokens per text of a model trained from scratch, as RoBERTa's.


def compute_dtype(name: str):
  validation.check_choice('dtype', name, validation.DTYPE_NAMES)
  return DTYPES[name]


def scratch_model_config(config, tokenizer) -> transformers.RobertaConfig:
  """A RoBERTa config for training from scratch, sized to the tokenizer."""
  kwargs = dict(max_position_embeddings=SCRATCH_MAX_LENGTH + tokenizer.pad_token_id + 1,
                type_vocab_size=1, layer_norm_eps=1e-5)
  kwargs.update(config.model_config.to_dict())
  return transformers.RobertaConfig(
      vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)


def _from_pretrained(path: str, dtype, seed: int):
  try:
    return transformers.FlaxAutoModelForMaskedLM.from_pretrained(path, dtype=dtype, seed=seed)
  except OSError as e:
    # Only PyTorch weights there: convert them (needs torch installed).
    if 'from_pt=True' not in str(e):
      raise UserError(f'could not load a masked-LM model from {path!r} '
                      f'({first_line(e)}); pass a hub id or an HF-format directory '
                      'as --config.model_name_or_path') from None
  try:
    return transformers.FlaxAutoModelForMaskedLM.from_pretrained(
        path, dtype=dtype, seed=seed, from_pt=True)
  except ImportError:
    raise UserError(f'{path!r} holds only PyTorch weights; install torch to convert them '
                    '(pip install torch)') from None


def create_model(config, tokenizer) -> transformers.FlaxPreTrainedModel:
  """The model in `config.dtype` for computation; its parameters stay float32."""
  dtype = compute_dtype(config.dtype)
  if config.model_name_or_path:
    model = _from_pretrained(config.model_name_or_path, dtype, config.seed)
  else:
    # No parameters yet: `steps.init_train_state` creates them sharded, on the devices.
    model = transformers.FlaxAutoModelForMaskedLM.from_config(
        scratch_model_config(config, tokenizer), seed=config.seed, dtype=dtype, _do_init=False)
  # transformers 4.56+ also reads the Flax `dtype` argument into the config's `dtype` (the
  # *weights'* dtype, which PyTorch loaders read): record what the parameters really are.
  model.config.dtype = 'float32'
  if len(tokenizer) > model.config.vocab_size:
    raise UserError(f'the tokenizer has {len(tokenizer)} tokens but the model only '
                    f'{model.config.vocab_size}; use the model\'s own tokenizer')
  return model


def initial_params(model: transformers.FlaxPreTrainedModel):
  """The model's float32 parameters: its loaded weights or, for a model built without them
  (`_do_init=False`, so that they can be created sharded), transformers' own initialisation
  from the same key and input shape."""
  if model._is_initialized:  # pylint: disable=protected-access
    return model.params
  return model.init_weights(model.key, model.input_shape)


def max_block_size(model_config: transformers.PretrainedConfig) -> int:
  """The longest block the model's position embeddings allow."""
  limit = model_config.max_position_embeddings
  if model_config.model_type in ROBERTA_FAMILY:
    limit -= model_config.pad_token_id + 1  # Positions start after the padding index.
  return limit


def check_block_size(block_size: int, model_config: transformers.PretrainedConfig) -> None:
  limit = max_block_size(model_config)
  if not 0 < block_size <= limit:
    raise UserError(f'block_size={block_size} is outside what the model allows (1..{limit}); '
                    f'set --config.block_size to at most {limit}')


# ----------------------------------------------------------------------------
# The vocabulary head on masked tokens only.

def supports_masked_head(model: transformers.FlaxPreTrainedModel) -> bool:
  return model.config.model_type in ROBERTA_FAMILY


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


def _encode_and_predict_at(module, input_ids, predict_at, attention_mask, deterministic: bool):
  """FlaxRobertaForMaskedLMModule's forward with the LM head applied at the token indices
  `predict_at` only."""
  position_ids = modeling_flax_roberta.create_position_ids_from_input_ids(
      input_ids, module.config.pad_token_id)
  hidden = module.roberta(input_ids, attention_mask, jnp.zeros_like(input_ids),
                          position_ids, None, deterministic=deterministic)[0]
  hidden = jnp.take_along_axis(hidden, predict_at[..., None], axis=1)
  shared = (module.roberta.variables['params']['embeddings']['word_embeddings']['embedding']
            if module.config.tie_word_embeddings else None)
  return module.lm_head(hidden, shared_embedding=shared)


def masked_head_fn(model: transformers.FlaxPreTrainedModel):
  """`fn(input_ids, predict_at, params, train, dropout_rng, attention_mask=None)` -> logits
  [batch, k, vocab] at the token indices `predict_at` [batch, k].

  Same parameters and numbers as the model's own forward, but the vocabulary
  projection (the largest matmul of a small model) runs on the gathered tokens.
  """
  def fn(input_ids, predict_at, params, train: bool, dropout_rng, attention_mask=None):
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    return model.module.apply({'params': params}, input_ids, predict_at, attention_mask,
                              not train, method=_encode_and_predict_at,
                              rngs={'dropout': dropout_rng} if train else {})
  return fn


IMPLEMENTATIONS = validation.MODEL_IMPLS


def forward_fns(model: transformers.FlaxPreTrainedModel,
                impl: str = 'transformers') -> tuple[Callable, Callable]:
  """(apply_fn, head_fn) of the model's forward, for `steps.compile_steps`.

  impl='fast' runs RoBERTa-family models through `mlm_jax.fast_model` (same parameters and
  numbers); other models, and impl='transformers', through transformers' own module.
  """
  validation.check_choice('model_impl', impl, IMPLEMENTATIONS)
  if impl == 'fast' and supports_masked_head(model):
    from mlm_jax import fast_model  # pylint: disable=import-outside-toplevel
    module = fast_model.FastRobertaForMaskedLM(model.config, model.dtype)
    return fast_model.apply_fn_for(module), fast_model.head_fn_for(module)
  return model.__call__, masked_head_fn(model)
