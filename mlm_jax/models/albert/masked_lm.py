"""ALBERT's masked LM: the backbone and `predictions`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_jax.models import layers
from mlm_jax.models.albert import backbone

Array = jax.Array


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
  """ALBERT masked LM; see `bert.masked_lm.BertForMaskedLM` for the call."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               segment_ids: Array | None = None, predict_at: Array | None = None,
               deterministic: bool = True) -> Array:
    mask = layers.keys_mask(attention_mask, segment_ids)
    encoder = backbone.Albert(self.config, self.dtype, self.attention_impl, self.remat_policy,
                              name='albert')
    hidden, word_table = encoder(input_ids, mask, deterministic, predict_at)
    return MLMHead(self.config, self.dtype, name='predictions')(hidden, word_table)
