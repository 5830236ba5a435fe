"""BERT's masked LM: the backbone and `cls.predictions`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_jax.models import layers
from mlm_jax.models.bert import backbone

Array = jax.Array


class PredictionHead(nn.Module):
  """`cls.predictions`: transform (dense, `hidden_act`, LayerNorm), then the decoder."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, word_table: Array) -> Array:
    cfg = self.config
    hidden = _Transform(cfg, self.dtype, name='transform')(hidden)
    return layers.decode(self, hidden, word_table, tied=cfg.tie_word_embeddings, dtype=self.dtype,
                         stddev=cfg.initializer_range)


class _Transform(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.config
    hidden = layers.dense(cfg.hidden_size, self.dtype, cfg.initializer_range, 'dense')(hidden)
    hidden = layers.activation(cfg.hidden_act)(hidden)
    return layers.layer_norm(cfg.layer_norm_eps, self.dtype, 'LayerNorm')(hidden)


class _Cls(nn.Module):
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, word_table: Array) -> Array:
    return PredictionHead(self.config, self.dtype, name='predictions')(hidden, word_table)


class BertForMaskedLM(nn.Module):
  """BERT masked LM. `__call__` -> logits [batch, seq, vocab], or [batch, k, vocab] at the token
  indices `predict_at` [batch, k] (the head sees only those); see `models.MaskedLM`."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               segment_ids: Array | None = None, predict_at: Array | None = None,
               deterministic: bool = True) -> Array:
    mask = layers.keys_mask(attention_mask, segment_ids)
    encoder = backbone.Backbone(self.config, self.dtype, self.attention_impl, self.remat_policy,
                                name='bert')
    hidden, word_table = encoder(input_ids, 0, mask, deterministic, predict_at)
    return _Cls(self.config, self.dtype, name='cls')(hidden, word_table)
