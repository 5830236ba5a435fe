"""ModernBERT's encoder (`ModernBertModel`) and the pieces its head shares: the
reference's initialisation scales, its linear and norm layers, rotary positions."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax.models import layers
from mlm_jax.models.modernbert import configuration

Array = jax.Array


def truncated(config, stddev: float) -> jax.nn.initializers.Initializer:
  """PyTorch's `trunc_normal_(std, a=-c*std, b=c*std)`: `stddev` is the untruncated normal's."""
  cutoff = config.initializer_cutoff_factor
  cutoff = 3.0 if cutoff is None else cutoff  # As the reference's `_init_weights`.
  return jax.nn.initializers.truncated_normal(stddev, lower=-cutoff, upper=cutoff)


def in_std(config) -> float:
  """Weights that read the residual stream, and the embeddings."""
  return config.initializer_range


def out_std(config) -> float:
  """Weights that write it (and the head's dense and the decoder), scaled down with depth."""
  return config.initializer_range / math.sqrt(2.0 * config.num_hidden_layers)


def linear(config, features: int, stddev: float, use_bias: bool, dtype: layers.Dtype,
           name: str) -> layers.Dense:
  """`nn.Linear` as the reference initialises it; `layers.Dense`, as every family's, so that the
  kernels' gradients run as YNNPACK's products on CPU, not XLA's own loops."""
  return layers.Dense(features, use_bias=use_bias, dtype=dtype,
                      kernel_init=truncated(config, stddev), name=name)


def norm(config, dtype: layers.Dtype, name: str) -> nn.LayerNorm:
  return layers.layer_norm(config.norm_eps, dtype, name, use_bias=config.norm_bias)


def rotate(x: Array, theta: float) -> Array:
  """Rotary positions 0, 1, ... on [batch, seq, heads, head_dim], in float32 as the reference:
  rotate-half layout (the first half of each head pairs with the second)."""
  dim = x.shape[-1]
  inv_freq = (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
  angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]  # [seq, 1, head_dim]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Embeddings(nn.Module):
  """tok_embeddings -> norm -> dropout (no position table: positions are rotary); also
  returns the float32 word table."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, deterministic: bool) -> tuple[Array, Array]:
    cfg = self.config
    table = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=truncated(cfg, in_std(cfg)),
                     dtype=jnp.float32, param_dtype=jnp.float32, name='tok_embeddings')
    rows = table(input_ids)
    if cfg.pad_token_id is not None:
      # `nn.Embedding(padding_idx=pad)`: the lookup sends the padding row no gradient.
      rows = jnp.where((input_ids == cfg.pad_token_id)[..., None], jax.lax.stop_gradient(rows),
                       rows)
    hidden = norm(cfg, self.dtype, 'norm')(rows.astype(self.dtype))
    return nn.Dropout(cfg.embedding_dropout)(hidden, deterministic), table.embedding


class Attention(nn.Module):
  """Fused Wqkv, rotary queries and keys, global or sliding-window attention, Wo, dropout."""
  config: object
  layer_type: str
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    """[batch, seq, hidden]; with `predict_at` only those rows go through Wo."""
    cfg = self.config
    heads = cfg.num_attention_heads
    qkv = linear(cfg, 3 * cfg.hidden_size, in_std(cfg), cfg.attention_bias, self.dtype,
                 'Wqkv')(hidden)
    qkv = qkv.reshape(qkv.shape[:-1] + (3, heads, cfg.hidden_size // heads))
    theta = cfg.rope_parameters[self.layer_type]['rope_theta']
    query, key = rotate(qkv[..., 0, :, :], theta), rotate(qkv[..., 1, :, :], theta)
    window = configuration.half_window(cfg)
    local = self.layer_type == configuration.LOCAL
    out = layers.attend(query, key, qkv[..., 2, :, :], mask, dropout_rate=cfg.attention_dropout,
                        deterministic=deterministic, dropout_rng=lambda: self.make_rng('dropout'),
                        implementation=self.attention_impl,
                        local_window=(window, window) if local else None)
    out = linear(cfg, cfg.hidden_size, out_std(cfg), cfg.attention_bias, self.dtype,
                 'Wo')(layers.gather_positions(layers.merge_heads(out), predict_at))
    return layers.Dropout(cfg.attention_dropout, name='Dropout_0')(
        out, deterministic, predict_at, hidden.shape)


class MLP(nn.Module):
  """GeGLU: Wi gives [input | gate], act(input) * gate -> dropout -> Wo."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, deterministic: bool, predict_at: Array | None = None,
               full_shape: tuple[int, ...] = ()) -> Array:
    """Rows at `predict_at` of a [batch, seq] layer (`full_shape`) where given."""
    cfg = self.config
    both = linear(cfg, 2 * cfg.intermediate_size, in_std(cfg), cfg.mlp_bias, self.dtype,
                  'Wi')(hidden)
    inputs, gate = jnp.split(both, 2, axis=-1)
    hidden = layers.Dropout(cfg.mlp_dropout, name='Dropout_0')(
        layers.activation(cfg.hidden_activation)(inputs) * gate, deterministic, predict_at,
        full_shape[:-1] + (cfg.intermediate_size,))
    return linear(cfg, cfg.hidden_size, out_std(cfg), cfg.mlp_bias, self.dtype, 'Wo')(hidden)


class Layer(nn.Module):
  """Pre-norm: x + attn(attn_norm(x)), then + mlp(mlp_norm(x)). Layer 0 has no attn_norm:
  the embeddings' norm precedes it."""
  config: object
  index: int
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, hidden: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    cfg = self.config
    full_shape = hidden.shape
    normed = hidden if self.index == 0 else norm(cfg, self.dtype, 'attn_norm')(hidden)
    hidden = layers.gather_positions(hidden, predict_at) + Attention(
        cfg, cfg.layer_types[self.index], self.dtype, self.attention_impl, name='attn')(
            normed, mask, deterministic, predict_at)
    normed = norm(cfg, self.dtype, 'mlp_norm')(hidden)
    return hidden + MLP(cfg, self.dtype, name='mlp')(normed, deterministic, predict_at,
                                                     full_shape)


class Backbone(nn.Module):
  """`ModernBertModel`: embeddings, layers, final_norm -> (hidden states, float32 word table);
  the hidden states at `predict_at` only where it is given (`layers.LayerStack`)."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, input_ids: Array, mask: layers.Mask, deterministic: bool,
               predict_at: Array | None = None) -> tuple[Array, Array]:
    hidden, word_table = Embeddings(self.config, self.dtype, name='embeddings')(
        input_ids, deterministic)
    layer = lambda index, name: Layer(self.config, index, self.dtype, self.attention_impl,
                                      name=name)
    stack = layers.LayerStack(layer, self.config.num_hidden_layers, self.remat_policy,
                              name='layers')
    hidden = stack(hidden, mask, deterministic, predict_at)
    return norm(self.config, self.dtype, 'final_norm')(hidden), word_table
