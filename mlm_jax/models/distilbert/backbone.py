"""DistilBERT's encoder: word + position embeddings and post-LayerNorm blocks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax.models import layers

Array = jax.Array
LAYER_NORM_EPS = 1e-12  # The reference's, fixed: DistilBertConfig has no layer_norm_eps.


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
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
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
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
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
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    block = lambda index, name: TransformerBlock(self.config, self.dtype, self.attention_impl,
                                                 name=name)
    return layers.LayerStack(block, self.config.n_layers, self.remat_policy, name='layer')(
        hidden, mask, deterministic, predict_at)


class DistilBert(nn.Module):
  """Embeddings + transformer: (hidden states, float32 word table); those at `predict_at`
  only where it is given (`layers.LayerStack`)."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, input_ids: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> tuple[Array, Array]:
    hidden, word_table = Embeddings(self.config, self.dtype, name='embeddings')(
        input_ids, deterministic)
    hidden = Transformer(self.config, self.dtype, self.attention_impl, self.remat_policy,
                         name='transformer')(
        hidden, mask, deterministic, predict_at)
    return hidden, word_table
