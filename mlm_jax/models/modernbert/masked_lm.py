"""ModernBERT's masked LM: the backbone, `head` and `decoder`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_jax.models import layers
from mlm_jax.models.modernbert import backbone
from mlm_jax.models.modernbert import configuration

Array = jax.Array


class Head(nn.Module):
  """`head`: dense (bias per `classifier_bias`), `classifier_activation`, norm."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.config
    hidden = backbone.linear(cfg, cfg.hidden_size, backbone.out_std(cfg), cfg.classifier_bias,
                             self.dtype, 'dense')(hidden)
    hidden = layers.activation(cfg.classifier_activation)(hidden)
    return backbone.norm(cfg, self.dtype, 'norm')(hidden)


class Decoder(nn.Module):
  """`decoder`: the word table (tied) or its own kernel, plus a bias when `decoder_bias`."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, word_table: Array) -> Array:
    cfg = self.config
    if cfg.tie_word_embeddings:
      kernel = word_table.T
    else:
      kernel = self.param('kernel', backbone.truncated(cfg, backbone.out_std(cfg)),
                          (cfg.hidden_size, cfg.vocab_size), jnp.float32)
    logits = jnp.dot(hidden, kernel.astype(self.dtype))
    if cfg.decoder_bias:
      logits = layers.add_vocab_bias(logits, self.param(
          'bias', nn.initializers.zeros, (cfg.vocab_size,), jnp.float32).astype(self.dtype))
    return logits


class ModernBertForMaskedLM(nn.Module):
  """ModernBERT masked LM; see `bert.masked_lm.BertForMaskedLM` for the call. `predict_at` is the
  reference's `sparse_prediction`. Positions are 0, 1, ... whatever the padding, as the
  reference numbers them; `segment_ids` restrict every layer, the window too.
  The config is checked when the module is built."""
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  def __post_init__(self):
    configuration.check_config(self.config)
    super().__post_init__()

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               segment_ids: Array | None = None, predict_at: Array | None = None,
               deterministic: bool = True) -> Array:
    mask = layers.keys_mask(attention_mask, segment_ids)
    encoder = backbone.Backbone(self.config, self.dtype, self.attention_impl, self.remat_policy,
                                name='model')
    hidden, word_table = encoder(input_ids, mask, deterministic, predict_at)
    hidden = Head(self.config, self.dtype, name='head')(hidden)
    return Decoder(self.config, self.dtype, name='decoder')(hidden, word_table)
