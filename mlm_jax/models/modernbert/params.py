"""ModernBERT's checkpoint names: PyTorch's (`ModernBertForMaskedLM.state_dict()`) ->
the parameters of `masked_lm.ModernBertForMaskedLM`."""

from mlm_jax.models import checkpoint_names as names

ARCHITECTURE = 'ModernBertForMaskedLM'


def checkpoint_names(config) -> names.Table:
  nb = config.norm_bias
  backbone = names.embedding('model.embeddings.tok_embeddings', 'model/embeddings/tok_embeddings')
  backbone |= names.norm('model.embeddings.norm', 'model/embeddings/norm', nb)
  for i in range(config.num_hidden_layers):
    t, f = f'model.layers.{i}', f'model/layers/{i}'
    if i:
      backbone |= names.norm(f'{t}.attn_norm', f'{f}/attn_norm', nb)
    backbone |= names.norm(f'{t}.mlp_norm', f'{f}/mlp_norm', nb)
    for proj in ('attn.Wqkv', 'attn.Wo'):
      backbone |= names.linear(f'{t}.{proj}', f'{f}/{proj.replace(".", "/")}',
                               config.attention_bias)
    for proj in ('mlp.Wi', 'mlp.Wo'):
      backbone |= names.linear(f'{t}.{proj}', f'{f}/{proj.replace(".", "/")}', config.mlp_bias)
  backbone |= names.norm('model.final_norm', 'model/final_norm', nb)
  head = names.linear('head.dense', 'head/dense', config.classifier_bias)
  head |= names.norm('head.norm', 'head/norm', nb)
  if config.tie_word_embeddings:  # save_pretrained leaves the tied `decoder.weight` out.
    head |= names.parameter('decoder.bias', 'decoder/bias') if config.decoder_bias else {}
  else:
    head |= names.linear('decoder', 'decoder', config.decoder_bias)
  duplicates = frozenset({'decoder.weight'}) if config.tie_word_embeddings else frozenset()
  return names.Table(backbone, head, base_prefix='model', duplicates=duplicates)
