"""DistilBERT's masked LM: the backbone, `vocab_transform`, `vocab_layer_norm` and
`vocab_projector`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_jax.models import layers
from mlm_jax.models.distilbert import backbone

Array = jax.Array


class TiedProjector(nn.Module):
  """`vocab_projector` tied to the word table: only its bias is a parameter."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, word_table: Array) -> Array:
    return layers.decode(self, hidden, word_table, tied=True, dtype=self.dtype,
                         stddev=self.config.initializer_range)


class DistilBertForMaskedLM(nn.Module):
  """DistilBERT masked LM; see `bert.masked_lm.BertForMaskedLM` for the call. The head's
  modules sit at the top level, beside `distilbert`, as in the reference."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               segment_ids: Array | None = None, predict_at: Array | None = None,
               deterministic: bool = True) -> Array:
    cfg = self.config
    mask = layers.keys_mask(attention_mask, segment_ids)
    encoder = backbone.DistilBert(cfg, self.dtype, self.attention_impl, self.remat_policy,
                                  name='distilbert')
    hidden, word_table = encoder(input_ids, mask, deterministic, predict_at)
    hidden = layers.dense(cfg.dim, self.dtype, cfg.initializer_range, 'vocab_transform')(hidden)
    hidden = layers.activation(cfg.activation)(hidden)
    hidden = layers.layer_norm(backbone.LAYER_NORM_EPS, self.dtype, 'vocab_layer_norm')(hidden)
    if cfg.tie_word_embeddings:
      return TiedProjector(cfg, self.dtype, name='vocab_projector')(hidden, word_table)
    return layers.dense(cfg.vocab_size, self.dtype, cfg.initializer_range,
                        'vocab_projector')(hidden)
