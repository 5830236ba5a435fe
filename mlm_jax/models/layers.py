"""The layers every encoder family shares: float32 parameters, computation in `dtype`.

Parameters are always float32; `dtype` is the computation dtype. Embedding tables are
gathered in float32 and the rows cast afterwards: a bfloat16 gather would make the
table's gradient a bfloat16 scatter-add (slow on GPU, and lossy).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax.models import attention

Array = jax.Array
Dtype = Any
Mask = attention.KeyMask | None  # The keys each query may see (see `attention.KeyMask`).

# `config.attention_impl`'s choices (see `attention.choose`).
ATTENTION_IMPLS = tuple(attention.IMPLS)

# What the backward pass keeps of each layer's forward, by the name `config.remat_policy` uses
# (MaxText's names where it has one): None keeps everything, as without remat; a policy of
# `jax.checkpoint_policies` keeps what it saves and recomputes the rest, layer by layer.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    'none': None,
    # Only each layer's input: the whole layer runs again in the backward pass.
    'full': jax.checkpoint_policies.nothing_saveable,
    # The weight products (projections, feed-forward): attention scores, softmax and the
    # element-wise work are recomputed, so no [seq, seq] array outlives its layer.
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every product, the attention scores too: less recomputed, more kept.
    'dots': jax.checkpoint_policies.dots_saveable,
}


def gelu(x: Array) -> Array:
  """Exact GELU as PyTorch writes it, x/2 (1 + erf(x/sqrt(2))): jax.nn.gelu's erfc form costs
  3.6 times erf's on CPU (XLA's erfc goes through exp), and each recomputation of it in the
  fusions around the feed-forward product pays that again."""
  return x * np.asarray(0.5, x.dtype) * (1 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


# The activations of the configs' `hidden_act`/`activation`, as PyTorch transformers computes them.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'gelu': gelu,
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_fast': functools.partial(jax.nn.gelu, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
    'tanh': jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f'activation {name!r} is not supported (one of {", ".join(ACTIVATIONS)})')
  return ACTIVATIONS[name]


def normal(stddev: float) -> Callable:
  return jax.nn.initializers.normal(stddev=stddev)


def dense(features: int, dtype: Dtype, stddev: float, name: str,
          use_bias: bool = True) -> 'Dense':
  """A PyTorch `nn.Linear` as the reference initialises it: normal(stddev) weights, zero bias."""
  return Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=normal(stddev), name=name)


class Dense(nn.Module):
  """`nn.Dense` with float32 parameters: the same parameters, initialisation and forward; only
  the kernel's gradient is computed differently on CPU (see `project`)."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    kernel = self.param('kernel', self.kernel_init, (inputs.shape[-1], self.features),
                        jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    outputs = project(inputs, kernel)
    return outputs if bias is None else outputs + bias


@jax.custom_vjp
def project(inputs: Array, kernel: Array) -> Array:
  """inputs [..., in] @ kernel [in, out], whose kernel gradient (inputs^T @ gradient, summed
  over every token) transposes the inputs first on CPU: XLA:CPU runs a product over the
  leading dimension of both operands with its own loops, not YNNPACK's, 20-45% slower than
  the transpose plus YNNPACK's product (the largest single share of a small model's step)."""
  return jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))


def _project_forward(inputs: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
  return project(inputs, kernel), (inputs, kernel)


def _project_backward(saved: tuple[Array, Array], gradient: Array) -> tuple[Array, Array]:
  inputs, kernel = saved
  inputs_gradient = jax.lax.dot_general(gradient, kernel,
                                        (((gradient.ndim - 1,), (1,)), ((), ())))
  rows, gradient_rows = (x.reshape(-1, x.shape[-1]) for x in (inputs, gradient))
  if jax.default_backend() == 'cpu':
    kernel_gradient = _transposed_product(rows, gradient_rows)
  else:
    kernel_gradient = rows.T @ gradient_rows
  return inputs_gradient, kernel_gradient


def _transposed_product(a: Array, b: Array) -> Array:
  """a^T @ b for [rows, m] and [rows, n]: the narrower operand transposed, each side of the
  transpose fenced so that XLA neither folds it back into the product nor recomputes the
  operand's producer (a GELU) inside it."""
  fenced_transpose = lambda x: jax.lax.optimization_barrier(jax.lax.optimization_barrier(x).T)
  if a.shape[1] <= b.shape[1]:
    return fenced_transpose(a) @ b
  return jax.lax.optimization_barrier(fenced_transpose(b) @ a).T


project.defvjp(_project_forward, _project_backward)


def layer_norm(epsilon: float, dtype: Dtype, name: str, use_bias: bool = True) -> nn.LayerNorm:
  """LayerNorm whose statistics are float32 whatever `dtype` (flax computes them so)."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias,
                      name=name)


def embed(rows: int, features: int, stddev: float, name: str) -> nn.Embed:
  """A float32 table gathered in float32: callers cast the rows."""
  return nn.Embed(rows, features, embedding_init=normal(stddev), dtype=jnp.float32,
                  param_dtype=jnp.float32, name=name)


class LayerStack(nn.Module):
  """A scope of `count` layers named '0', '1', ... (the reference's ModuleList), applied in
  order; `layer(index, name)` builds layer `index`, each taking (hidden, mask, deterministic).

  With `predict_at` (see `gather_positions`) the last layer is also given it and returns only
  those rows: with the masked-only head (and in fill-mask) nothing else of its output is used,
  and past its attention (every token still attends to every token) its per-token work, three
  quarters of a layer, is done for the predicted rows alone.

  `remat_policy` (a name of `REMAT_POLICIES`) rematerialises each layer (`nn.remat`, as
  MaxText's `remat_policy` wraps its decoder layer): the parameters and their names are
  the same, and so are the outputs and gradients; the backward pass recomputes what the
  policy does not save.
  """
  layer: Callable[[int, str], nn.Module]
  count: int
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, hidden: Array, mask: Mask, deterministic: bool,
               predict_at: Array | None = None) -> Array:
    apply = _apply_layer
    if self.remat_policy != 'none':
      # `deterministic` (argument 3, the layer being 0) chooses Python branches: static.
      apply = nn.remat(_apply_layer, policy=REMAT_POLICIES[self.remat_policy],
                       static_argnums=(3,))
    for index in range(self.count):
      rows = {} if predict_at is None or index < self.count - 1 else {'predict_at': predict_at}
      hidden = apply(self.layer(index, str(index)), hidden, mask, deterministic, **rows)
    return hidden


def _apply_layer(layer: nn.Module, hidden: Array, mask: Array | None, deterministic: bool,
                 **rows) -> Array:
  return layer(hidden, mask, deterministic, **rows)


class Dropout(nn.Module):
  """`nn.Dropout` (the same draws where it is named as that was: `Dropout_0`, ...), which can
  drop `inputs` that are the rows at `predict_at` of a [batch, seq, features] tensor: the mask
  is then drawn over that whole shape (`full_shape`) and gathered, so that a layer computing
  only the predicted rows drops exactly what the whole layer dropped there."""
  rate: float

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool, predict_at: Array | None = None,
               full_shape: tuple[int, ...] | None = None) -> Array:
    if self.rate == 0.0 or deterministic:
      return inputs
    keep_prob = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng('dropout'), p=keep_prob,
                                shape=inputs.shape if predict_at is None else full_shape)
    keep = gather_positions(keep, predict_at)
    return jax.lax.select(keep, inputs / keep_prob, jnp.zeros_like(inputs))


def keys_mask(attention_mask: Array | None,
              segment_ids: Array | None) -> attention.KeyMask | None:
  """The masked LMs' one mask: keys that are not padding and lie in the query's segment, kept
  as [batch, seq] rows (`attention.KeyMask`) for each implementation to apply its way."""
  return attention.keys_mask(attention_mask, segment_ids)


def attend(query: Array, key: Array, value: Array, mask: attention.KeyMask | None, *,
           dropout_rate: float, deterministic: bool, dropout_rng: Callable[[], Array],
           implementation: str = 'auto', local_window: tuple[int, int] | None = None) -> Array:
  """Softmax attention over [batch, seq, heads, head_dim] queries, keys and values, the keys
  restricted by `mask` and, with `local_window` (left, right), to that many positions around
  the query; `implementation` is `config.attention_impl` (see `attention.choose`).

  The dense path: inference, and training through cuDNN's fused kernel without attention
  dropout, is `jax.nn.dot_product_attention`. Training otherwise writes the computation out:
  that function has no dropout, and its XLA form's backward multiplies float32 score
  gradients with bfloat16 keys and queries (products in float32 on a GPU), where
  `attention_scores` keeps them in the computation dtype. Attention dropout drops
  probabilities element-wise, per [batch, head, query, key], as PyTorch's `nn.Dropout` on the
  probabilities does.
  """
  dropping = not deterministic and dropout_rate > 0.0
  implementation = attention.choose(implementation, length=query.shape[1],
                                    local=local_window is not None, dropping=dropping)
  if implementation == 'blocked':
    return attention.blocked(query, key, value, mask, local_window)
  if implementation == 'splash':
    return attention.splash(query, key, value, mask, local_window)
  mask = attention.dense_mask(mask)
  if local_window is not None and local_window[1] != 0:
    # cuDNN takes a sliding window only with a causal mask (jax raises otherwise).
    implementation = 'xla'
  if deterministic or (dropout_rate == 0.0 and implementation != 'xla'):
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, implementation=implementation,
        local_window_size=local_window)
  logits = attention_scores(query, key) * np.float32(1 / np.sqrt(query.shape[-1]))
  if local_window is not None:
    window = window_mask(query.shape[1], key.shape[1], local_window)
    mask = window if mask is None else jnp.logical_and(mask, window)
  if mask is not None:
    logits = jnp.where(mask, logits, np.float32(-0.7 * np.finfo(np.float32).max))
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng(), 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / np.float32(1.0 - dropout_rate), 0.0)
  return jnp.einsum('BNTS,BSNH->BTNH', weights.astype(query.dtype), value)


@jax.custom_vjp
def attention_scores(query: Array, key: Array) -> Array:
  """[batch, heads, query, key] float32 scores of [batch, seq, heads, head_dim] queries and
  keys, multiplied in their dtype. The backward casts the scores' gradient to that dtype
  before its two products, as FlashAttention's backward does, so that a bfloat16 step runs
  them in bfloat16; JAX's own transpose would promote the queries and keys to float32."""
  return jnp.einsum('BTNH,BSNH->BNTS', query, key, preferred_element_type=jnp.float32)


def _attention_scores_forward(query: Array, key: Array) -> tuple[Array, tuple[Array, Array]]:
  return attention_scores(query, key), (query, key)


def _attention_scores_backward(saved: tuple[Array, Array],
                               gradient: Array) -> tuple[Array, Array]:
  query, key = saved
  gradient = gradient.astype(query.dtype)
  product = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  return (product('BNTS,BSNH->BTNH', gradient, key).astype(query.dtype),
          product('BNTS,BTNH->BSNH', gradient, query).astype(key.dtype))


attention_scores.defvjp(_attention_scores_forward, _attention_scores_backward)


def self_attention(module: nn.Module, hidden: Array, mask: Mask, *,
                   names: tuple[str, str, str], heads: int, stddev: float, dtype: Dtype,
                   dropout_rate: float, deterministic: bool, implementation: str = 'auto') -> Array:
  """Inside `module`'s compact call: the query, key and value projections named `names`
  (its children, as the reference's), multi-head attention (see `attend`; the dropout draws
  from `module`'s 'dropout' rng), heads merged back to [batch, seq, width]."""
  width = hidden.shape[-1]
  project = lambda name: split_heads(dense(width, dtype, stddev, name)(hidden), heads)
  out = attend(*(project(name) for name in names), mask, dropout_rate=dropout_rate,
               deterministic=deterministic, dropout_rng=lambda: module.make_rng('dropout'),
               implementation=implementation)
  return merge_heads(out)


def window_mask(queries: int, keys: int, window: tuple[int, int]) -> Array:
  """[1, 1, queries, keys]: key j is visible from query i when -left <= j - i <= right."""
  offset = jnp.arange(keys)[None, :] - jnp.arange(queries)[:, None]
  return ((offset >= -window[0]) & (offset <= window[1]))[None, None]


def split_heads(x: Array, heads: int) -> Array:
  return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


def merge_heads(x: Array) -> Array:
  return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def gather_positions(hidden: Array, predict_at: Array | None) -> Array:
  """The rows of `hidden` [batch, seq, features] at `predict_at` [groups, k] -> [groups, k,
  features]: indices into each group of batch / groups consecutive rows, flattened. With
  groups = batch they are each row's token indices; the train step pools the rows each device
  holds, so that the head runs on their masked tokens together."""
  if predict_at is None:
    return hidden
  hidden = hidden.reshape(predict_at.shape[0], -1, hidden.shape[-1])
  return jnp.take_along_axis(hidden, predict_at[..., None], axis=1)


def decode(module: nn.Module, hidden: Array, word_table: Array, *, tied: bool, dtype: Dtype,
           stddev: float, kernel_name: str = 'decoder', bias_name: str = 'bias') -> Array:
  """The vocabulary projection plus its bias, inside `module`'s compact `__call__`: tied (the
  float32 word table, transposed and cast) or its own `kernel_name` kernel; the bias is a
  separate float32 parameter `bias_name`, as the references keep it."""
  vocab_size = word_table.shape[0]
  if tied:
    logits = jnp.dot(hidden, word_table.T.astype(dtype))
  else:
    logits = dense(vocab_size, dtype, stddev, kernel_name, use_bias=False)(hidden)
  bias = module.param(bias_name, nn.initializers.zeros, (vocab_size,), jnp.float32)
  return add_vocab_bias(logits, bias.astype(dtype))


@jax.custom_vjp
def add_vocab_bias(logits: Array, bias: Array) -> Array:
  """`logits + bias`, whose bias gradient (the sum of the logits' gradient over every row) is
  a product with a row of ones rather than a reduction over rows: XLA:CPU's YNNPACK reduction
  over rows slows down 100-fold from about 20,000 columns (a vocabulary's width: 1 s of a 15 s
  distilroberta-base step), where the product takes milliseconds. The sum is float32."""
  return logits + bias


def _add_vocab_bias_forward(logits: Array, bias: Array) -> tuple[Array, None]:
  return logits + bias, None


def _add_vocab_bias_backward(_, gradient: Array) -> tuple[Array, Array]:
  rows = gradient.reshape(-1, gradient.shape[-1])
  ones = jnp.ones((1, rows.shape[0]), rows.dtype)
  column_sums = jnp.dot(ones, rows, preferred_element_type=jnp.float32)[0]
  return gradient, column_sums.astype(gradient.dtype)


add_vocab_bias.defvjp(_add_vocab_bias_forward, _add_vocab_bias_backward)
