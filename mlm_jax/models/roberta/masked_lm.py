"""RoBERTa's masked LM: BERT's backbone with positions numbered after the padding id,
and `lm_head`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_jax.models import layers
from mlm_jax.models.bert import backbone as bert

Array = jax.Array


def position_ids(input_ids: Array, pad_id: int) -> Array:
  """PyTorch's `create_position_ids_from_input_ids`: non-padding tokens count from pad_id+1,
  padding tokens keep pad_id."""
  not_pad = (input_ids != pad_id).astype(jnp.int32)
  return jnp.cumsum(not_pad, axis=1) * not_pad + pad_id


def max_positions(config) -> int:
  """Tokens a row may hold: positions start after the padding id."""
  return config.max_position_embeddings - config.pad_token_id - 1


class LMHead(nn.Module):
  """dense -> exact GELU -> layer_norm -> decoder (tied: the word table) + bias."""
  config: object
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, word_table: Array) -> Array:
    cfg = self.config
    hidden = layers.dense(cfg.hidden_size, self.dtype, cfg.initializer_range, 'dense')(hidden)
    hidden = layers.activation('gelu')(hidden)  # RoBERTa's head is GELU whatever hidden_act.
    hidden = layers.layer_norm(cfg.layer_norm_eps, self.dtype, 'layer_norm')(hidden)
    return layers.decode(self, hidden, word_table, tied=cfg.tie_word_embeddings, dtype=self.dtype,
                         stddev=cfg.initializer_range)


class RobertaForMaskedLM(nn.Module):
  """RoBERTa masked LM; see `bert.masked_lm.BertForMaskedLM` for the call.

  Without an `attention_mask` (training blocks hold no padding) every row's positions are
  pad_id+1 .. pad_id+seq, a broadcast slice of the table; with one, they are renumbered
  around the padding tokens as the reference does.
  """
  config: object
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat_policy: str = 'none'  # See `layers.REMAT_POLICIES`.

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               segment_ids: Array | None = None, predict_at: Array | None = None,
               deterministic: bool = True) -> Array:
    cfg = self.config
    if attention_mask is None:
      positions = cfg.pad_token_id + 1
    else:
      positions = position_ids(input_ids, cfg.pad_token_id)
    mask = layers.keys_mask(attention_mask, segment_ids)
    hidden, word_table = bert.Backbone(cfg, self.dtype, self.attention_impl, self.remat_policy,
                                       name='roberta')(
        input_ids, positions, mask, deterministic, predict_at)
    return LMHead(cfg, self.dtype, name='lm_head')(hidden, word_table)
