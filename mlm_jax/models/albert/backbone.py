"""ALBERT's encoder: BERT's embeddings, mapped up to `hidden_size`, then the shared layer
groups."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_jax.models import layers
from mlm_jax.models.bert import backbone as bert

Array = jax.Array


def group_of_layer(config, i: int) -> int:
  """The shared group that layer i runs (the reference's float division, kept as it is)."""
  return int(i / (config.num_hidden_layers / config.num_hidden_groups))


class Attention(nn.Module):
  """query/key/value -> attention (probabilities dropped) -> dense -> dropout ->
  LayerNorm(x + residual): one module in the reference, so one scope here."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
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
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
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
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    layer = lambda index, name: Layer(self.config, self.dtype, self.attention_impl, name=name)
    return layers.LayerStack(layer, self.config.inner_group_num, self.remat_policy,
                             name='albert_layers')(
        hidden, mask, deterministic, predict_at)


class LayerGroups(nn.Module):
  """The `albert_layer_groups` scope: groups '0', '1', ..., each called for its share of the
  `num_hidden_layers` (the same parameters every time); the last call computes only the rows
  at `predict_at` past its attention where it is given (`layers.LayerStack`)."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    cfg = self.config
    groups = [LayerGroup(cfg, self.dtype, self.attention_impl, self.remat_policy, name=str(g))
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
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    cfg = self.config
    hidden = layers.dense(cfg.hidden_size, self.dtype, cfg.initializer_range,
                          'embedding_hidden_mapping_in')(hidden)
    return LayerGroups(cfg, self.dtype, self.attention_impl, self.remat_policy,
                       name='albert_layer_groups')(
        hidden, mask, deterministic, predict_at)


class Albert(nn.Module):
  """Embeddings + encoder (no pooler): (hidden states, float32 word table); those at
  `predict_at` only where it is given."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, input_ids: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> tuple[Array, Array]:
    cfg = self.config
    hidden, word_table = bert.Embeddings(cfg, self.dtype, cfg.embedding_size, name='embeddings')(
        input_ids, 0, deterministic)
    hidden = Encoder(cfg, self.dtype, self.attention_impl, self.remat_policy, name='encoder')(
        hidden, mask, deterministic, predict_at)
    return hidden, word_table
