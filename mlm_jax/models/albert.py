"""ALBERT (`model_type: albert`): BERT's embeddings at the narrower `embedding_size`, mapped
up to `hidden_size`, then `num_hidden_groups` groups of `inner_group_num` layers whose
parameters are shared across the depth: layer i runs group
int(i / (num_hidden_layers / num_hidden_groups)), as the reference picks it.

The parameter tree is transformers' former `FlaxAlbertForMaskedLM`'s
(`albert/encoder/albert_layer_groups/<g>/albert_layers/<j>/...`, `predictions/...`), so
checkpoints of earlier releases restore.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_jax.models import bert
from mlm_jax.models import checkpoint_names as names
from mlm_jax.models import layers

Array = jax.Array

ARCHITECTURE = 'AlbertForMaskedLM'


def max_positions(config) -> int:
  return config.max_position_embeddings


def group_of_layer(config, i: int) -> int:
  """The shared group that layer i runs (the reference's float division, kept as it is)."""
  return int(i / (config.num_hidden_layers / config.num_hidden_groups))


class Attention(nn.Module):
  """query/key/value -> attention (probabilities dropped) -> dense -> dropout ->
  LayerNorm(x + residual): one module in the reference, so one scope here."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    """[batch, seq, hidden]; with `predict_at` only those rows go on past the attention."""
    cfg = self.config
    out = layers.self_attention(
        self, hidden, mask, names=('query', 'key', 'value'), heads=cfg.num_attention_heads,
        stddev=cfg.initializer_range, dtype=self.dtype,
        dropout_rate=cfg.attention_probs_dropout_prob, deterministic=deterministic,
        implementation=self.attention_impl)
    out = layers.dense(cfg.hidden_size, self.dtype, cfg.initializer_range, 'dense')(
        layers.gather_positions(out, predict_at))
    out = layers.Dropout(cfg.hidden_dropout_prob, name='Dropout_0')(
        out, deterministic, predict_at, hidden.shape)
    return layers.layer_norm(cfg.layer_norm_eps, self.dtype, 'LayerNorm')(
        out + layers.gather_positions(hidden, predict_at))


class Layer(nn.Module):
  """Attention, then ffn -> activation -> ffn_output -> LayerNorm(x + residual); the reference
  drops nothing in the feed-forward part."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    cfg = self.config
    attended = Attention(cfg, self.dtype, self.attention_impl, name='attention')(
        hidden, mask, deterministic, predict_at)
    out = layers.dense(cfg.intermediate_size, self.dtype, cfg.initializer_range, 'ffn')(attended)
    out = layers.activation(cfg.hidden_act)(out)
    out = layers.dense(cfg.hidden_size, self.dtype, cfg.initializer_range, 'ffn_output')(out)
    return layers.layer_norm(cfg.layer_norm_eps, self.dtype, 'full_layer_layer_norm')(
        out + attended)


class LayerGroup(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    layer = lambda index, name: Layer(self.config, self.dtype, self.attention_impl, name=name)
    return layers.LayerStack(layer, self.config.inner_group_num, name='albert_layers')(
        hidden, mask, deterministic, predict_at)


class LayerGroups(nn.Module):
  """The `albert_layer_groups` scope: groups '0', '1', ..., each called for its share of the
  `num_hidden_layers` (the same parameters every time); the last call computes only the rows
  at `predict_at` past its attention where it is given (`layers.LayerStack`)."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    cfg = self.config
    groups = [LayerGroup(cfg, self.dtype, self.attention_impl, name=str(g))
              for g in range(cfg.num_hidden_groups)]
    last = cfg.num_hidden_layers - 1
    for i in range(cfg.num_hidden_layers):
      hidden = groups[group_of_layer(cfg, i)](hidden, mask, deterministic,
                                              predict_at if i == last else None)
    return hidden


class Encoder(nn.Module):
  """embedding_hidden_mapping_in (embedding_size -> hidden_size), then the groups."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    cfg = self.config
    hidden = layers.dense(cfg.hidden_size, self.dtype, cfg.initializer_range,
                          'embedding_hidden_mapping_in')(hidden)
    return LayerGroups(cfg, self.dtype, self.attention_impl, name='albert_layer_groups')(
        hidden, mask, deterministic, predict_at)


class Albert(nn.Module):
  """Embeddings + encoder (no pooler): (hidden states, float32 word table); those at
  `predict_at` only where it is given."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, input_ids: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> tuple[Array, Array]:
    cfg = self.config
    hidden, word_table = bert.Embeddings(cfg, self.dtype, cfg.embedding_size, name='embeddings')(
        input_ids, 0, deterministic)
    hidden = Encoder(cfg, self.dtype, self.attention_impl, name='encoder')(
        hidden, mask, deterministic, predict_at)
    return hidden, word_table


class MLMHead(nn.Module):
  """`predictions`: dense (down to embedding_size) -> hidden_act -> LayerNorm -> decoder
  (tied: the embedding_size-wide word table) + bias."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, word_table: Array) -> Array:
    cfg = self.config
    hidden = layers.dense(cfg.embedding_size, self.dtype, cfg.initializer_range, 'dense')(hidden)
    hidden = layers.activation(cfg.hidden_act)(hidden)
    hidden = layers.layer_norm(cfg.layer_norm_eps, self.dtype, 'LayerNorm')(hidden)
    return layers.decode(self, hidden, word_table, tied=cfg.tie_word_embeddings, dtype=self.dtype,
                         stddev=cfg.initializer_range)


class AlbertForMaskedLM(nn.Module):
  """ALBERT masked LM; see `bert.BertForMaskedLM` for the call."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               segment_ids: Array | None = None, predict_at: Array | None = None,
               deterministic: bool = True) -> Array:
    mask = layers.combine_masks(layers.padding_mask(attention_mask),
                                layers.segment_mask(segment_ids))
    hidden, word_table = Albert(self.config, self.dtype, self.attention_impl, name='albert')(
        input_ids, mask, deterministic, predict_at)
    return MLMHead(self.config, self.dtype, name='predictions')(hidden, word_table)


# ----------------------------------------------------------------------------
# Checkpoint names: PyTorch's (`AlbertForMaskedLM.state_dict()`) -> this module's parameters.

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
