"""BERT's checkpoint names: PyTorch's (`BertForMaskedLM.state_dict()`) -> the
parameters of `masked_lm.BertForMaskedLM`; the encoder's are shared with RoBERTa."""

from mlm_jax.models import checkpoint_names as names

ARCHITECTURE = 'BertForMaskedLM'


def encoder_names(config, torch_prefix: str, flax_prefix: str) -> dict[str, str]:
  """The embeddings and layers of a BERT-style encoder (BERT and the RoBERTa family)."""
  table = {}
  emb_t, emb_f = f'{torch_prefix}.embeddings', f'{flax_prefix}/embeddings'
  for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
    table |= names.embedding(f'{emb_t}.{name}', f'{emb_f}/{name}')
  table |= names.norm(f'{emb_t}.LayerNorm', f'{emb_f}/LayerNorm')
  for i in range(config.num_hidden_layers):
    t, f = f'{torch_prefix}.encoder.layer.{i}', f'{flax_prefix}/encoder/layer/{i}'
    for proj in ('query', 'key', 'value'):
      table |= names.linear(f'{t}.attention.self.{proj}', f'{f}/attention/self/{proj}')
    for block in ('attention.output', 'output'):
      fb = block.replace('.', '/')
      table |= names.linear(f'{t}.{block}.dense', f'{f}/{fb}/dense')
      table |= names.norm(f'{t}.{block}.LayerNorm', f'{f}/{fb}/LayerNorm')
    table |= names.linear(f'{t}.intermediate.dense', f'{f}/intermediate/dense')
  return table


def checkpoint_names(config) -> names.Table:
  head = {}
  head |= names.linear('cls.predictions.transform.dense', 'cls/predictions/transform/dense')
  head |= names.norm('cls.predictions.transform.LayerNorm', 'cls/predictions/transform/LayerNorm')
  decoder, copies = names.mlm_decoder('cls.predictions', 'cls/predictions',
                                      config.tie_word_embeddings)
  return names.Table(encoder_names(config, 'bert', 'bert'), head | decoder, base_prefix='bert',
                     duplicates=mlm_duplicates('cls.predictions', copies),
                     copies=copies, unused=UNUSED + ('cls.seq_relationship.',))


# What hub checkpoints of BERT-style encoders carry beyond a masked LM: the pooler, and
# buffers older PyTorch versions saved.
UNUSED = ('.pooler.', '.embeddings.position_ids', '.embeddings.token_type_ids')


def mlm_duplicates(head: str, copies: dict[str, str]) -> frozenset[str]:
  """What a file may hold of the head beyond the table: the decoder, tied (weight and bias
  then repeat the word embeddings and `<head>.bias`), or the bias copy of an untied one."""
  return frozenset({f'{head}.decoder.weight', f'{head}.decoder.bias'} | set(copies))
