"""BERT's encoder (no pooler): RoBERTa runs all of it, ALBERT its embeddings."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_jax.models import layers

Array = jax.Array


class Embeddings(nn.Module):
  """word + token type 0 + position rows, LayerNorm, dropout; also returns the word table.

  `positions`: an int `first` numbers every row's tokens first, first+1, ... (BERT: 0; RoBERTa
  without padding: pad_id+1), added as a broadcast slice of the table, whose backward is a
  reduction over the batch rather than a scatter of every token's row; or [batch, seq]
  position ids, gathered per token.
  """
  config: object
  dtype: layers.Dtype = jnp.float32
  features: int | None = None  # The tables' width: hidden_size unless given (ALBERT's narrower).

  @nn.compact
  def __call__(self, input_ids: Array, positions: int | Array,
               deterministic: bool) -> tuple[Array, Array]:
    cfg = self.config
    std, width = cfg.initializer_range, self.features or cfg.hidden_size
    word = layers.embed(cfg.vocab_size, width, std, 'word_embeddings')
    position = layers.embed(cfg.max_position_embeddings, width, std, 'position_embeddings')
    token_type = layers.embed(cfg.type_vocab_size, width, std, 'token_type_embeddings')
    hidden = word(input_ids).astype(self.dtype) + token_type.embedding[0].astype(self.dtype)
    if isinstance(positions, int):
      rows = position.embedding[positions:positions + input_ids.shape[-1]]
    else:
      rows = position(positions)
    hidden = hidden + rows.astype(self.dtype)
    hidden = layers.layer_norm(cfg.layer_norm_eps, self.dtype, 'LayerNorm')(hidden)
    hidden = nn.Dropout(cfg.hidden_dropout_prob)(hidden, deterministic)
    return hidden, word.embedding


class SelfAttention(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool) -> Array:
    cfg = self.config
    return layers.self_attention(
        self, hidden, mask, names=('query', 'key', 'value'), heads=cfg.num_attention_heads,
        stddev=cfg.initializer_range, dtype=self.dtype,
        dropout_rate=cfg.attention_probs_dropout_prob, deterministic=deterministic,
        implementation=self.attention_impl)


class DenseResidual(nn.Module):
  """dense -> dropout -> LayerNorm(x + residual): the reference's SelfOutput and Output; the
  rows at `predict_at` of a [batch, seq] layer (`full_shape`) where given (`layers.Dropout`)."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, residual: Array, deterministic: bool,
               predict_at: Array | None = None, full_shape: tuple[int, ...] = ()) -> Array:
    cfg = self.config
    hidden = layers.dense(cfg.hidden_size, self.dtype, cfg.initializer_range, 'dense')(hidden)
    hidden = layers.Dropout(cfg.hidden_dropout_prob, name='Dropout_0')(
        hidden, deterministic, predict_at, full_shape)
    return layers.layer_norm(cfg.layer_norm_eps, self.dtype, 'LayerNorm')(hidden + residual)


class Attention(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    """[batch, seq, hidden]; with `predict_at` only those rows go on past the attention."""
    attended = SelfAttention(self.config, self.dtype, self.attention_impl, name='self')(
        hidden, mask, deterministic)
    return DenseResidual(self.config, self.dtype, name='output')(
        layers.gather_positions(attended, predict_at), layers.gather_positions(hidden, predict_at),
        deterministic, predict_at, hidden.shape)


class Intermediate(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.config
    hidden = layers.dense(cfg.intermediate_size, self.dtype, cfg.initializer_range, 'dense')(hidden)
    return layers.activation(cfg.hidden_act)(hidden)


class Layer(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    attended = Attention(self.config, self.dtype, self.attention_impl, name='attention')(
        hidden, mask, deterministic, predict_at)
    inner = Intermediate(self.config, self.dtype, name='intermediate')(attended)
    return DenseResidual(self.config, self.dtype, name='output')(
        inner, attended, deterministic, predict_at, hidden.shape)


class Encoder(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    layer = lambda index, name: Layer(self.config, self.dtype, self.attention_impl, name=name)
    return layers.LayerStack(layer, self.config.num_hidden_layers, self.remat_policy,
                             name='layer')(
        hidden, mask, deterministic, predict_at)


class Backbone(nn.Module):
  """Embeddings + encoder (no pooler): (hidden states, float32 word table); the hidden states
  at `predict_at` only where it is given (`layers.gather_positions`, `layers.LayerStack`)."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, input_ids: Array, positions: int | Array, mask: layers.Mask,
               deterministic: bool, predict_at: Array | None = None) -> tuple[Array, Array]:
    hidden, word_table = Embeddings(self.config, self.dtype, name='embeddings')(
        input_ids, positions, deterministic)
    hidden = Encoder(self.config, self.dtype, self.attention_impl, self.remat_policy,
                     name='encoder')(
        hidden, mask, deterministic, predict_at)
    return hidden, word_table
