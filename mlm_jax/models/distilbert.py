"""DistilBERT (`model_type: distilbert`): word + position embeddings, post-LayerNorm blocks
with the reference's own names (`q_lin`, `sa_layer_norm`, `ffn.lin1`, ...), and the
`vocab_transform` head.

The parameter tree is transformers' former `FlaxDistilBertForMaskedLM`'s, so checkpoints
of earlier releases restore. One exception: with `sinusoidal_pos_embds` that class kept the
sinusoids as a constant, while PyTorch transformers 5 keeps them in a trainable
`position_embeddings` table that merely starts as sinusoids; this module follows PyTorch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax.models import checkpoint_names as names
from mlm_jax.models import layers

Array = jax.Array

ARCHITECTURE = 'DistilBertForMaskedLM'
LAYER_NORM_EPS = 1e-12  # The reference's, fixed: DistilBertConfig has no layer_norm_eps.


def max_positions(config) -> int:
  return config.max_position_embeddings


def sinusoids(rows: int, features: int) -> np.ndarray:
  """PyTorch's `create_sinusoidal_embeddings`: sin on even features, cos on odd ones."""
  angles = np.arange(rows)[:, None] / np.power(10000, 2 * (np.arange(features) // 2) / features)
  table = np.empty((rows, features), np.float32)
  table[:, 0::2] = np.sin(angles[:, 0::2])
  table[:, 1::2] = np.cos(angles[:, 1::2])
  return table


class Embeddings(nn.Module):
  """word + position rows (0, 1, ... in every row: a broadcast slice), LayerNorm, dropout;
  also returns the float32 word table."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, deterministic: bool) -> tuple[Array, Array]:
    cfg = self.config
    word = layers.embed(cfg.vocab_size, cfg.dim, cfg.initializer_range, 'word_embeddings')
    if cfg.sinusoidal_pos_embds:  # The reference's initial table; trained like any other.
      position = nn.Embed(cfg.max_position_embeddings, cfg.dim, dtype=jnp.float32,
                          param_dtype=jnp.float32, name='position_embeddings',
                          embedding_init=lambda key, shape, dtype: jnp.asarray(sinusoids(*shape)))
    else:
      position = layers.embed(cfg.max_position_embeddings, cfg.dim, cfg.initializer_range,
                              'position_embeddings')
    rows = position.embedding[:input_ids.shape[-1]]
    hidden = word(input_ids).astype(self.dtype) + rows.astype(self.dtype)
    hidden = layers.layer_norm(LAYER_NORM_EPS, self.dtype, 'LayerNorm')(hidden)
    hidden = nn.Dropout(cfg.dropout)(hidden, deterministic)
    return hidden, word.embedding


class MultiHeadSelfAttention(nn.Module):
  """q/k/v projections, attention (probabilities dropped at `attention_dropout`), out_lin.
  No dropout after out_lin: the reference has none there."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    """[batch, seq, dim]; with `predict_at` only those rows go through out_lin."""
    cfg = self.config
    out = layers.self_attention(
        self, hidden, mask, names=('q_lin', 'k_lin', 'v_lin'), heads=cfg.n_heads,
        stddev=cfg.initializer_range, dtype=self.dtype, dropout_rate=cfg.attention_dropout,
        deterministic=deterministic, implementation=self.attention_impl)
    out = layers.gather_positions(out, predict_at)
    return layers.dense(cfg.dim, self.dtype, cfg.initializer_range, 'out_lin')(out)


class FFN(nn.Module):
  """lin1 -> activation -> lin2 -> dropout."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, deterministic: bool, predict_at: Array | None = None,
               full_shape: tuple[int, ...] = ()) -> Array:
    """Rows at `predict_at` of a [batch, seq] layer (`full_shape`) where given."""
    cfg = self.config
    hidden = layers.dense(cfg.hidden_dim, self.dtype, cfg.initializer_range, 'lin1')(hidden)
    hidden = layers.activation(cfg.activation)(hidden)
    hidden = layers.dense(cfg.dim, self.dtype, cfg.initializer_range, 'lin2')(hidden)
    return layers.Dropout(cfg.dropout, name='Dropout_0')(hidden, deterministic, predict_at,
                                                         full_shape)


class TransformerBlock(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    attended = MultiHeadSelfAttention(self.config, self.dtype, self.attention_impl,
                                      name='attention')(hidden, mask, deterministic, predict_at)
    attended = layers.layer_norm(LAYER_NORM_EPS, self.dtype, 'sa_layer_norm')(
        attended + layers.gather_positions(hidden, predict_at))
    out = FFN(self.config, self.dtype, name='ffn')(attended, deterministic, predict_at,
                                                   hidden.shape)
    return layers.layer_norm(LAYER_NORM_EPS, self.dtype, 'output_layer_norm')(out + attended)


class Transformer(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    block = lambda index, name: TransformerBlock(self.config, self.dtype, self.attention_impl,
                                                 name=name)
    return layers.LayerStack(block, self.config.n_layers, name='layer')(
        hidden, mask, deterministic, predict_at)


class DistilBert(nn.Module):
  """Embeddings + transformer: (hidden states, float32 word table); those at `predict_at`
  only where it is given (`layers.LayerStack`)."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, input_ids: Array, mask: Array | None, deterministic: bool,
               predict_at: Array | None = None) -> tuple[Array, Array]:
    hidden, word_table = Embeddings(self.config, self.dtype, name='embeddings')(
        input_ids, deterministic)
    hidden = Transformer(self.config, self.dtype, self.attention_impl, name='transformer')(
        hidden, mask, deterministic, predict_at)
    return hidden, word_table


class TiedProjector(nn.Module):
  """`vocab_projector` tied to the word table: only its bias is a parameter."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, word_table: Array) -> Array:
    return layers.decode(self, hidden, word_table, tied=True, dtype=self.dtype,
                         stddev=self.config.initializer_range)


class DistilBertForMaskedLM(nn.Module):
  """DistilBERT masked LM; see `bert.BertForMaskedLM` for the call. The head's modules sit at
  the top level, beside `distilbert`, as in the reference."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               segment_ids: Array | None = None, predict_at: Array | None = None,
               deterministic: bool = True) -> Array:
    cfg = self.config
    mask = layers.combine_masks(layers.padding_mask(attention_mask),
                                layers.segment_mask(segment_ids))
    hidden, word_table = DistilBert(cfg, self.dtype, self.attention_impl, name='distilbert')(
        input_ids, mask, deterministic, predict_at)
    hidden = layers.dense(cfg.dim, self.dtype, cfg.initializer_range, 'vocab_transform')(hidden)
    hidden = layers.activation(cfg.activation)(hidden)
    hidden = layers.layer_norm(LAYER_NORM_EPS, self.dtype, 'vocab_layer_norm')(hidden)
    if cfg.tie_word_embeddings:
      return TiedProjector(cfg, self.dtype, name='vocab_projector')(hidden, word_table)
    return layers.dense(cfg.vocab_size, self.dtype, cfg.initializer_range,
                        'vocab_projector')(hidden)


# ----------------------------------------------------------------------------
# Checkpoint names: PyTorch's (`DistilBertForMaskedLM.state_dict()`) -> this module's.

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
