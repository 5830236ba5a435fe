"""What ModernBERT reads of its config, checked before a model is built."""

from mlm_jax.errors import UserError

GLOBAL, LOCAL = 'full_attention', 'sliding_attention'


def check_config(config) -> None:
  """One-line errors for configs PyTorch would reject or silently mis-run."""
  types = list(config.layer_types)
  if len(types) != config.num_hidden_layers:
    raise UserError(f'config.json has {len(types)} layer_types for num_hidden_layers='
                    f'{config.num_hidden_layers}; give one per layer')
  unknown = sorted(set(types) - {GLOBAL, LOCAL})
  if unknown:
    raise UserError(f'config.json: layer type {unknown[0]!r} is not a ModernBERT layer; use '
                    f'{GLOBAL!r} or {LOCAL!r}')
  # PyTorch keeps keys with |query - key| <= local_attention // 2: it runs 0 as 1 (each token
  # sees only itself) and below 0 masks every key, both without complaint.
  if config.local_attention <= 0:
    raise UserError(f'config.json: local_attention={config.local_attention}; the sliding '
                    'window needs at least 1 token (ModernBERT-base has 128)')
  for layer_type in set(types):
    rope = config.rope_parameters[layer_type]
    if rope.get('rope_type', 'default') != 'default':
      raise UserError(f'config.json: rope_type {rope["rope_type"]!r} ({layer_type}) is not '
                      "supported; only 'default' rotary embeddings are")
  if config.hidden_size % config.num_attention_heads:
    raise UserError(f'config.json: hidden_size={config.hidden_size} is not a multiple of '
                    f'num_attention_heads={config.num_attention_heads}')


def half_window(config) -> int:
  """Keys a local layer sees on each side: `local_attention` is the whole window, and PyTorch
  keeps |query - key| <= local_attention // 2 (an odd window is rounded down, 5 as 4)."""
  return config.local_attention // 2
