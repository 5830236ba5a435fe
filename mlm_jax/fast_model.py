"""A faster RoBERTa masked LM with exactly the parameters of transformers' `FlaxRobertaForMaskedLM`.

Why it exists: transformers' Flax RoBERTa spends most of an H100 train step in two places
of its embeddings:

  * `nn.Embed(dtype=bfloat16)` casts each table to bfloat16 *before* the gather, so the
    table's gradient is a bfloat16 scatter-add (slow, and lossy);
  * position embeddings are gathered per token, so the backward scatter-adds
    batch * seq rows into only seq rows of the table.

Here the tables are gathered in float32 and the rows cast afterwards; with no attention
mask (training blocks, which never hold padding) the position rows are a static slice of
the table, padding_idx+1 .. padding_idx+seq, added by broadcasting (its backward is a
reduction over the batch); the token-type row 0 is broadcast the same way. Attention goes
through `jax.nn.dot_product_attention` (`attention_impl='cudnn'` selects cuDNN flash
attention, GPU and bfloat16/float16 only; `None` is JAX's XLA path: jax 0.10 does not pick
cuDNN by itself) except in training with attention dropout, which that function lacks:
then the same computation is written out with transformers' dropout.

Everything else follows transformers: the same submodule names and initialisers (so
`init_params(module, seed)` equals `FlaxAutoModelForMaskedLM.from_config(config,
seed=seed).params`, and parameters load and export unchanged), the same dropout rng paths
(so training-mode outputs match transformers' too), flax LayerNorm and Dense in `dtype`
with float32 parameters, `ACT2FN[config.hidden_act]` and an exact-GELU LM head, tied or
untied decoder, and attention dropout drawn once per [query, key] and shared across batch
and heads (flax's `broadcast_dropout=True`, as transformers calls it). Differences: in
bfloat16 the attention softmax runs in float32 (transformers: bfloat16) and embedding
gradients accumulate in float32; with `attention_mask=None` positions are the slice above
even if a token equals the pad id (transformers would renumber them: pass a mask then).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from transformers.modeling_flax_outputs import FlaxMaskedLMOutput
from transformers.modeling_flax_utils import ACT2FN
from transformers.models.roberta.modeling_flax_roberta import create_position_ids_from_input_ids

Array = jax.Array
Dtype = Any


def _normal(config: transformers.PretrainedConfig) -> Callable:
  return jax.nn.initializers.normal(stddev=config.initializer_range)


def _dense(config: transformers.PretrainedConfig, features: int, dtype: Dtype,
           name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_normal(config), name=name)


def _layer_norm(config: transformers.PretrainedConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


def _embed(config: transformers.PretrainedConfig, rows: int, name: str) -> nn.Embed:
  """A float32 table and float32 gather: callers cast the gathered rows."""
  return nn.Embed(rows, config.hidden_size, embedding_init=_normal(config),
                  dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class Embeddings(nn.Module):
  """word + token type 0 + position rows, LayerNorm, dropout; also returns the word table."""
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None,
               deterministic: bool) -> tuple[Array, Array]:
    cfg = self.config
    word = _embed(cfg, cfg.vocab_size, 'word_embeddings')
    position = _embed(cfg, cfg.max_position_embeddings, 'position_embeddings')
    token_type = _embed(cfg, cfg.type_vocab_size, 'token_type_embeddings')
    hidden = word(input_ids).astype(self.dtype) + token_type.embedding[0].astype(self.dtype)
    hidden = hidden + self._positions(position, input_ids, attention_mask)
    hidden = _layer_norm(cfg, self.dtype, 'LayerNorm')(hidden)
    hidden = nn.Dropout(cfg.hidden_dropout_prob, name='dropout')(hidden, deterministic)
    return hidden, word.embedding

  def _positions(self, table: nn.Embed, input_ids: Array, attention_mask: Array | None) -> Array:
    """RoBERTa's position rows: a broadcast slice without a mask, else gathered per token."""
    pad = self.config.pad_token_id
    if attention_mask is None:  # No padding: positions pad+1 .. pad+seq in every row.
      return table.embedding[pad + 1:pad + 1 + input_ids.shape[-1]].astype(self.dtype)
    return table(create_position_ids_from_input_ids(input_ids, pad)).astype(self.dtype)


def _attention_with_dropout(query: Array, key: Array, value: Array, mask: Array | None,
                            rate: float, rng: Array) -> Array:
  """`jax.nn.dot_product_attention`'s XLA path plus transformers' dropout of the weights.

  The dropout mask is drawn once per [query, key] and shared over batch and heads, as
  flax's `dot_product_attention_weights(broadcast_dropout=True)` does for transformers.
  """
  logits = jnp.einsum('BTNH,BSNH->BNTS', query, key, preferred_element_type=jnp.float32)
  logits = logits * np.float32(1 / np.sqrt(query.shape[-1]))
  if mask is not None:
    logits = jnp.where(mask, logits, np.float32(-0.7 * np.finfo(np.float32).max))
  weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)
  keep = jax.random.bernoulli(rng, 1.0 - rate, (1, 1) + weights.shape[-2:])
  weights = weights * (keep.astype(query.dtype) / jnp.asarray(1.0 - rate, query.dtype))
  return jnp.einsum('BNTS,BSNH->BTNH', weights, value)


class SelfAttention(nn.Module):
  """Projections and attention of one layer; [batch, seq, hidden] in and out."""
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool) -> Array:
    cfg = self.config
    heads = cfg.num_attention_heads
    split = lambda x: x.reshape(x.shape[:2] + (heads, cfg.hidden_size // heads))
    query, key, value = (split(_dense(cfg, cfg.hidden_size, self.dtype, name)(hidden))
                         for name in ('query', 'key', 'value'))
    rate = cfg.attention_probs_dropout_prob
    if deterministic or rate == 0.0:
      out = jax.nn.dot_product_attention(query, key, value, mask=mask,
                                         implementation=self.attention_impl)
    else:  # make_rng here, in this scope, as transformers does: the same dropout draws.
      out = _attention_with_dropout(query, key, value, mask, rate, self.make_rng('dropout'))
    return out.reshape(out.shape[:2] + (cfg.hidden_size,))


class DenseResidual(nn.Module):
  """dense -> dropout -> LayerNorm(x + residual): transformers' SelfOutput and Output."""
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, residual: Array, deterministic: bool) -> Array:
    cfg = self.config
    hidden = _dense(cfg, cfg.hidden_size, self.dtype, 'dense')(hidden)
    hidden = nn.Dropout(cfg.hidden_dropout_prob, name='dropout')(hidden, deterministic)
    return _layer_norm(cfg, self.dtype, 'LayerNorm')(hidden + residual)


class Attention(nn.Module):
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool) -> Array:
    attended = SelfAttention(self.config, self.dtype, self.attention_impl, name='self')(
        hidden, mask, deterministic)
    return DenseResidual(self.config, self.dtype, name='output')(attended, hidden, deterministic)


class Intermediate(nn.Module):
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.config
    return ACT2FN[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, self.dtype, 'dense')(hidden))


class Layer(nn.Module):
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool) -> Array:
    attended = Attention(self.config, self.dtype, self.attention_impl, name='attention')(
        hidden, mask, deterministic)
    inner = Intermediate(self.config, self.dtype, name='intermediate')(attended)
    return DenseResidual(self.config, self.dtype, name='output')(inner, attended, deterministic)


class Layers(nn.Module):
  """The `layer` scope: layers named '0', '1', ... as transformers' layer collection."""
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool) -> Array:
    for i in range(self.config.num_hidden_layers):
      hidden = Layer(self.config, self.dtype, self.attention_impl, name=str(i))(
          hidden, mask, deterministic)
    return hidden


class Encoder(nn.Module):
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None, deterministic: bool) -> Array:
    return Layers(self.config, self.dtype, self.attention_impl, name='layer')(
        hidden, mask, deterministic)


class Roberta(nn.Module):
  """Embeddings + encoder (no pooler): (hidden states, float32 word table)."""
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None,
               deterministic: bool) -> tuple[Array, Array]:
    hidden, word_table = Embeddings(self.config, self.dtype, name='embeddings')(
        input_ids, attention_mask, deterministic)
    mask = None if attention_mask is None else (attention_mask > 0)[:, None, None, :]
    hidden = Encoder(self.config, self.dtype, self.attention_impl, name='encoder')(
        hidden, mask, deterministic)
    return hidden, word_table


class LMHead(nn.Module):
  """dense -> exact GELU -> layer_norm -> decoder (tied: the word table) + bias."""
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, word_table: Array) -> Array:
    cfg = self.config
    hidden = _dense(cfg, cfg.hidden_size, self.dtype, 'dense')(hidden)
    hidden = ACT2FN['gelu'](hidden)
    hidden = _layer_norm(cfg, self.dtype, 'layer_norm')(hidden)
    if cfg.tie_word_embeddings:
      logits = jnp.dot(hidden, word_table.T.astype(self.dtype))
    else:
      logits = _dense(cfg, cfg.vocab_size, self.dtype, 'decoder', use_bias=False)(hidden)
    bias = self.param('bias', jax.nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
    return logits + bias.astype(self.dtype)


class FastRobertaForMaskedLM(nn.Module):
  """RoBERTa masked LM; parameters as `FlaxRobertaForMaskedLM`'s (`params` of it apply here).

  `__call__(input_ids, attention_mask=None, predict_at=None, deterministic=True)` -> logits
  [batch, seq, vocab], or [batch, k, vocab] at the token indices `predict_at` [batch, k] (the
  head sees only those). `attention_mask=None` promises no padding (see the module docstring). Dropout
  draws from the 'dropout' rng when not `deterministic`.
  """
  config: transformers.PretrainedConfig
  dtype: Dtype = jnp.float32
  # jax.nn.dot_product_attention's `implementation`: None (XLA) or 'cudnn' (GPU, bf16/fp16;
  # it raises for float32). Training with attention dropout uses neither (see above).
  attention_impl: str | None = None

  def __post_init__(self) -> None:
    if self.config.is_decoder or self.config.add_cross_attention:
      raise ValueError('FastRobertaForMaskedLM is the encoder only (no is_decoder or '
                       'add_cross_attention)')
    super().__post_init__()

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               predict_at: Array | None = None, deterministic: bool = True) -> Array:
    hidden, word_table = Roberta(self.config, self.dtype, self.attention_impl, name='roberta')(
        jnp.asarray(input_ids, jnp.int32), attention_mask, deterministic)
    if predict_at is not None:
      hidden = jnp.take_along_axis(hidden, predict_at[..., None], axis=1)
    return LMHead(self.config, self.dtype, name='lm_head')(hidden, word_table)


# ----------------------------------------------------------------------------
# The package's calling conventions.


def init_params(module: FastRobertaForMaskedLM, seed: int) -> dict:
  """float32 parameters, equal to `FlaxAutoModelForMaskedLM.from_config(config, seed=seed).params`.

  transformers inits with the first half of split(PRNGKey(seed)) as the 'params' rng; the
  submodule names (hence rng paths) and initialisers here are its own.
  """
  params_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  ids = jnp.zeros((1, 1), jnp.int32)
  return module.init({'params': params_rng}, ids)['params']


def _rngs(train: bool, dropout_rng: Array | None) -> dict:
  return {'dropout': dropout_rng} if train and dropout_rng is not None else {}


def apply_fn_for(module: FastRobertaForMaskedLM) -> Callable[..., FlaxMaskedLMOutput]:
  """`fn(input_ids, params, train=False, dropout_rng=None, attention_mask=None)` -> `.logits`.

  Called as steps.py calls a transformers model: `apply_fn(ids, params=p, train=True,
  dropout_rng=rng).logits`.
  """
  def fn(input_ids: Array, params: Any, train: bool = False, dropout_rng: Array | None = None,
         attention_mask: Array | None = None) -> FlaxMaskedLMOutput:
    logits = module.apply({'params': params}, input_ids, attention_mask,
                          deterministic=not train, rngs=_rngs(train, dropout_rng))
    return FlaxMaskedLMOutput(logits=logits)
  return fn


def head_fn_for(module: FastRobertaForMaskedLM) -> Callable[..., Array]:
  """`fn(input_ids, predict_at, params, train, dropout_rng, attention_mask=None)` -> logits
  [batch, k, vocab] at the token indices `predict_at` [batch, k], as `model.masked_head_fn`'s."""
  def fn(input_ids: Array, predict_at: Array, params: Any, train: bool,
         dropout_rng: Array | None, attention_mask: Array | None = None) -> Array:
    return module.apply({'params': params}, input_ids, attention_mask, predict_at,
                        deterministic=not train, rngs=_rngs(train, dropout_rng))
  return fn
