"""ALBERT's checkpoint names: PyTorch's (`AlbertForMaskedLM.state_dict()`) -> the
parameters of `masked_lm.AlbertForMaskedLM`."""

from mlm_jax.models import checkpoint_names as names
from mlm_jax.models.bert import params as bert

ARCHITECTURE = 'AlbertForMaskedLM'


def _layer_names(torch: str, flax: str) -> dict[str, str]:
  table = {}
  for module in ('attention.query', 'attention.key', 'attention.value', 'attention.dense',
                 'ffn', 'ffn_output'):
    table |= names.linear(f'{torch}.{module}', f'{flax}/{module.replace(".", "/")}')
  for norm in ('attention.LayerNorm', 'full_layer_layer_norm'):
    table |= names.norm(f'{torch}.{norm}', f'{flax}/{norm.replace(".", "/")}')
  return table


def checkpoint_names(config) -> names.Table:
  backbone = {}
  for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
    backbone |= names.embedding(f'albert.embeddings.{name}', f'albert/embeddings/{name}')
  backbone |= names.norm('albert.embeddings.LayerNorm', 'albert/embeddings/LayerNorm')
  backbone |= names.linear('albert.encoder.embedding_hidden_mapping_in',
                           'albert/encoder/embedding_hidden_mapping_in')
  for g in range(config.num_hidden_groups):
    for j in range(config.inner_group_num):
      backbone |= _layer_names(f'albert.encoder.albert_layer_groups.{g}.albert_layers.{j}',
                               f'albert/encoder/albert_layer_groups/{g}/albert_layers/{j}')
  head = names.linear('predictions.dense', 'predictions/dense')
  head |= names.norm('predictions.LayerNorm', 'predictions/LayerNorm')
  decoder, copies = names.mlm_decoder('predictions', 'predictions', config.tie_word_embeddings)
  return names.Table(backbone, head | decoder, base_prefix='albert',
                     duplicates=bert.mlm_duplicates('predictions', copies), copies=copies,
                     unused=bert.UNUSED + ('sop_classifier.',))
