"""DistilBERT's checkpoint names: PyTorch's (`DistilBertForMaskedLM.state_dict()`) ->
the parameters of `masked_lm.DistilBertForMaskedLM`."""

from mlm_jax.models import checkpoint_names as names

ARCHITECTURE = 'DistilBertForMaskedLM'


def checkpoint_names(config) -> names.Table:
  backbone = {}
  for name in ('word_embeddings', 'position_embeddings'):
    backbone |= names.embedding(f'distilbert.embeddings.{name}', f'distilbert/embeddings/{name}')
  backbone |= names.norm('distilbert.embeddings.LayerNorm', 'distilbert/embeddings/LayerNorm')
  for i in range(config.n_layers):
    t, f = f'distilbert.transformer.layer.{i}', f'distilbert/transformer/layer/{i}'
    for module in ('attention.q_lin', 'attention.k_lin', 'attention.v_lin', 'attention.out_lin',
                   'ffn.lin1', 'ffn.lin2'):
      backbone |= names.linear(f'{t}.{module}', f'{f}/{module.replace(".", "/")}')
    for norm in ('sa_layer_norm', 'output_layer_norm'):
      backbone |= names.norm(f'{t}.{norm}', f'{f}/{norm}')
  head = names.linear('vocab_transform', 'vocab_transform')
  head |= names.norm('vocab_layer_norm', 'vocab_layer_norm')
  if config.tie_word_embeddings:  # The file holds the bias only (older ones repeat the weight).
    head |= names.parameter('vocab_projector.bias', 'vocab_projector/bias')
  else:
    head |= names.linear('vocab_projector', 'vocab_projector')
  duplicates = frozenset({'vocab_projector.weight'} if config.tie_word_embeddings else ())
  return names.Table(backbone, head, base_prefix='distilbert', duplicates=duplicates,
                     unused=('.embeddings.position_ids',))
