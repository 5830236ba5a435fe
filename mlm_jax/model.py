"""The masked-LM model: `FlaxAutoModelForMaskedLM` from a hub id, a local directory or a config."""

import jax.numpy as jnp
import transformers

from mlm_jax.errors import UserError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise UserError(f'dtype={name!r} is not supported; use one of {", ".join(DTYPES)}')
  return DTYPES[name]


def scratch_model_config(config, tokenizer) -> transformers.RobertaConfig:
  """A RoBERTa config for training from scratch, sized to the tokenizer."""
  kwargs = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
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
                      f'({str(e).splitlines()[0]}); pass a hub id or an HF-format directory '
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
    model = transformers.FlaxAutoModelForMaskedLM.from_config(
        scratch_model_config(config, tokenizer), seed=config.seed, dtype=dtype)
  # transformers 4.56+ also reads the Flax `dtype` argument into the config's `dtype` (the
  # *weights'* dtype, which PyTorch loaders read): record what the parameters really are.
  model.config.dtype = 'float32'
  if len(tokenizer) > model.config.vocab_size:
    raise UserError(f'the tokenizer has {len(tokenizer)} tokens but the model only '
                    f'{model.config.vocab_size}; use the model\'s own tokenizer')
  return model


def max_block_size(model_config: transformers.PretrainedConfig) -> int:
  """The longest block the model's position embeddings allow."""
  limit = model_config.max_position_embeddings
  if model_config.model_type in ('roberta', 'xlm-roberta', 'camembert'):
    limit -= model_config.pad_token_id + 1  # Positions start after the padding index.
  return limit


def check_block_size(block_size: int, model_config: transformers.PretrainedConfig) -> None:
  limit = max_block_size(model_config)
  if not 0 < block_size <= limit:
    raise UserError(f'block_size={block_size} is outside what the model allows (1..{limit}); '
                    f'set --config.block_size to at most {limit}')
