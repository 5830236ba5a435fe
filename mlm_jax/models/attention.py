"""Attention that scales with length: the blocked XLA path, and the choice of implementation.

Every family's `layers.attend` takes the keys' restriction as a `KeyMask` (padding and
document ids, [batch, seq] each) and builds what its implementation needs:

  * 'xla': `jax.nn.dot_product_attention`'s dense form (every [L, L] score; the masks as a
    boolean [batch, 1, L, L] array), the reference the others are tested against;
  * 'blocked' (this module, any backend): a global layer is FlashAttention-2 written in
    jax.lax (an online softmax over key blocks, a custom VJP that saves the output and the
    log-sum-exp and recomputes each block's scores in the backward); a local layer attends,
    query block by query block, to the key blocks its window reaches (scores [L, ~3w]);
    neither direction holds an [L, L] array;
  * 'cudnn' (GPU): cuDNN's fused kernel for global layers, local layers blocked;
  * 'splash' (TPU): the Pallas splash-attention kernel that ships with JAX (`LocalMask`,
    `SegmentIds`; key blocks outside the window skipped from the static mask);
  * 'auto': see `choose`.

A query row that sees no key (padding in a document of its own) follows the dense path's
convention: every score gets the same large negative number, so the row is the mean of all
the values (keys of other documents and padding included), and its gradient reaches no query
or key. Attention dropout is not implemented by the blocked kernels: a training step with it
active runs the dense path (the families with attention dropout, RoBERTa, BERT, ALBERT and
DistilBERT, stop at 512 tokens, where the dense path is the faster; see docs/long_context.md).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# `config.attention_impl`'s choices, and the backends each runs on (None: every backend).
IMPLS = {'auto': None, 'xla': None, 'blocked': None, 'cudnn': ('gpu',), 'splash': ('tpu',)}
# 'auto' runs the dense path up to this many tokens and the blocked one beyond, by backend and
# by layer (global: False, local: True). CPU's are measured (BENCHMARKS.md, "CPU: attention
# that scales"). Elsewhere nothing is measured yet: the dense path's fused kernels are kept up
# to where its [L, L] scores start to cost gigabytes (gpu.sh's modernbert8k stage measures).
DENSE_UP_TO = {'cpu': {False: 512, True: 256}}
DENSE_UP_TO_ELSEWHERE = {False: 2048, True: 2048}
# Key block of a global layer, and query block of a local one (measured, BENCHMARKS.md).
GLOBAL_BLOCK = 256
LOCAL_BLOCK = 64
# A global layer's queries a block at a time, by backend (elsewhere: all at once, not
# measured). On CPU a step's scores, [heads, 512, 256], then stay in the caches: a global
# layer's forward and backward at 2,048 and 8,192 tokens took 25% to 33% less time.
GLOBAL_QUERY_BLOCK = {'cpu': 512}
# The dense path's fill for masked scores (jax.nn.dot_product_attention's, in float32).
_NEG = np.float32(-0.7 * np.finfo(np.float32).max)


class KeyMask(NamedTuple):
  """The keys each query may see: not padding (`padding` [batch, seq], True for tokens), and
  in the query's document (`segments` [batch, seq] ids). Either may be None."""
  padding: Array | None
  segments: Array | None


def keys_mask(attention_mask: Array | None, segment_ids: Array | None) -> KeyMask | None:
  """The masked LMs' one mask, from the 1/0 `attention_mask` and the documents' ids."""
  if attention_mask is None and segment_ids is None:
    return None
  return KeyMask(None if attention_mask is None else attention_mask > 0, segment_ids)


def dense_mask(mask: KeyMask | None) -> Array | None:
  """The boolean mask of the dense path, broadcast to [batch, 1, query, key]: padding as
  [batch, 1, 1, seq], documents as [batch, 1, seq, seq]."""
  if mask is None:
    return None
  present = []
  if mask.padding is not None:
    present.append(mask.padding[:, None, None, :])
  if mask.segments is not None:
    present.append((mask.segments[:, :, None] == mask.segments[:, None, :])[:, None])
  return functools.reduce(jnp.logical_and, present)


def choose(implementation: str, *, length: int, local: bool, dropping: bool,
           backend: str | None = None) -> str:
  """The implementation one attention call runs: 'xla' (dense), 'blocked', 'cudnn' or
  'splash'. 'auto' is dense up to `DENSE_UP_TO` tokens on `backend` (JAX's default) and
  blocked beyond; a step
  with attention dropout (`dropping`) runs dense whatever the choice (the blocked kernels
  have no dropout); cuDNN takes no two-sided window, so its local layers run blocked."""
  if dropping:
    return 'xla'
  if implementation == 'auto':
    backend = backend or jax.default_backend()
    dense_up_to = DENSE_UP_TO.get(backend, DENSE_UP_TO_ELSEWHERE)[local]
    return 'xla' if length <= dense_up_to else 'blocked'
  if implementation == 'cudnn' and local:
    return 'blocked'
  return implementation


def runs_on(implementation: str, backend: str) -> bool:
  return IMPLS[implementation] is None or backend in IMPLS[implementation]


def blocked(query: Array, key: Array, value: Array, mask: KeyMask | None,
            local_window: tuple[int, int] | None = None) -> Array:
  """Softmax attention over [batch, seq, heads, head_dim], equal to the dense path's; keys
  restricted by `mask` and, with `local_window` (left, right), to -left <= key - query <=
  right. Scores in float32 whatever the inputs' dtype."""
  length = query.shape[1]
  padding, segments = mask if mask is not None else (None, None)
  if local_window is not None and max(local_window) < length - 1:
    out, seen = _banded(query, key, value, padding, segments, local_window)
  else:  # A window as wide as the sequence restricts nothing.
    out, lse = _global(query, key, value, padding, segments)
    seen = lse > _NEG / 2
  if padding is None and segments is None:
    return out
  # Rows that see no key: the dense path's uniform weights over every key.
  everything = jnp.mean(value.astype(jnp.float32), axis=1, keepdims=True).astype(value.dtype)
  return jnp.where(seen[..., None], out, everything)


def _pad(x: Array | None, length: int, value=0, before: int = 0) -> Array | None:
  """`x` [batch, seq, ...] padded along seq with `before` rows in front and up to `length`."""
  if x is None:
    return None
  widths = [(0, 0)] * x.ndim
  widths[1] = (before, length - before - x.shape[1])
  return jnp.pad(x, widths, constant_values=value)


def _key_rules(length: int, padding: Array | None, segments: Array | None, padded: int,
               before: int = 0) -> tuple[Array, Array | None]:
  """The keys' `ok` [batch, padded] (a token of the sequence, not padding) and their ids,
  on keys padded to `padded` with `before` in front."""
  ok = jnp.ones((1, length), bool) if padding is None else padding
  return _pad(ok, padded, False, before), _pad(segments, padded, 0, before)


def _global(query, key, value, padding, segments):
  """Global attention: (output [batch, seq, heads, head_dim], lse [batch, seq, heads]). The
  blocks run heads first ([batch, heads, seq, head_dim], transposed once here), so that each
  product of the loops is a plain batched matrix product, with no transpose a step."""
  length = query.shape[1]
  block = min(GLOBAL_BLOCK, length)
  padded = -(-length // block) * block
  key_ok, key_ids = _key_rules(length, padding, segments, padded)
  if padding is None and padded == length:
    key_ok = None  # Every key is a token: no mask to apply, unless documents'.
  heads_first = lambda x, rows: jnp.swapaxes(_pad(x, rows), 1, 2)
  key, value = heads_first(key, padded), heads_first(value, padded)
  attend = lambda query, query_ids: _flash(block, query, key, value, key_ok, query_ids, key_ids)
  queries = min(GLOBAL_QUERY_BLOCK.get(jax.default_backend(), length), length)
  if queries == length:
    out, lse = attend(heads_first(query, padded), _pad(segments, padded))
  else:  # Padded queries attend too; their rows are cut off below, so get no gradient.
    rows = -(-length // queries) * queries
    out, lse = jax.lax.map(lambda blocks: attend(*blocks),
                           (_blocks(heads_first(query, rows), queries, axis=2),
                            _blocks(_pad(segments, rows), queries)))
    out, lse = _unblocks(out, axis=2), _unblocks(lse, axis=2)
  return jnp.swapaxes(out, 1, 2)[:, :length], jnp.swapaxes(lse, 1, 2)[:, :length]


def _allowed(key_ok: Array | None, query_ids: Array | None,
             key_ids: Array | None) -> Array | None:
  """[batch, 1, queries, keys] (or broadcastable): which keys of a block each query sees;
  None: every key."""
  present = []
  if key_ok is not None:
    present.append(key_ok[:, None, None, :])
  if query_ids is not None:
    present.append(query_ids[:, None, :, None] == key_ids[:, None, None, :])
  return functools.reduce(jnp.logical_and, present) if present else None


def _scores(query: Array, key_block: Array, allowed: Array) -> Array:
  """[batch, heads, queries, block] scaled float32 scores, the masked ones `_NEG`; heads
  first."""
  scores = jnp.einsum('BNTH,BNSH->BNTS', query, key_block, preferred_element_type=jnp.float32)
  scores = scores * np.float32(1 / math.sqrt(query.shape[-1]))
  return scores if allowed is None else jnp.where(allowed, scores, _NEG)


def _blocks(x: Array | None, block: int, axis: int = 1) -> Array | None:
  """[..., seq (at `axis`), ...] -> [seq / block, ..., block, ...]: the scan's blocks."""
  if x is None:
    return None
  x = x.reshape(x.shape[:axis] + (-1, block) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unblocks(x: Array, axis: int = 1) -> Array:
  """`_blocks`' inverse."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(block, query, key, value, key_ok, query_ids, key_ids):
  return _flash_forward(block, query, key, value, key_ok, query_ids, key_ids)[0]


def _flash_forward(block, query, key, value, key_ok, query_ids, key_ids):
  """The online softmax over key blocks, heads first ([batch, heads, seq, head_dim]): every
  query at once, one key block a step, so that a step's scores are [batch, heads, seq,
  block]. -> (output, lse [batch, heads, seq])."""

  def step(carry, blocks):
    top, total, acc = carry
    key_block, value_block, ok, ids = blocks
    scores = _scores(query, key_block, _allowed(ok, query_ids, ids))
    new_top = jnp.maximum(top, scores.max(-1))
    probs = jnp.exp(scores - new_top[..., None])
    rescale = jnp.exp(top - new_top)
    total = rescale * total + probs.sum(-1)
    acc = rescale[..., None] * acc + jnp.einsum(
        'BNTS,BNSH->BNTH', probs.astype(value.dtype), value_block,
        preferred_element_type=jnp.float32)
    return (new_top, total, acc), None

  rows = query.shape[:3]
  start = (jnp.full(rows, _NEG), jnp.zeros(rows, jnp.float32),
           jnp.zeros(rows + value.shape[-1:], jnp.float32))
  (top, total, acc), _ = jax.lax.scan(
      step, start, (_blocks(key, block, axis=2), _blocks(value, block, axis=2),
                    _blocks(key_ok, block), _blocks(key_ids, block)))
  out = (acc / total[..., None]).astype(query.dtype)
  lse = top + jnp.log(total)
  return (out, lse), (query, key, value, key_ok, query_ids, key_ids, out, lse)


def _flash_backward(block, saved, gradients):
  """FlashAttention-2's backward: each key block's scores recomputed from the log-sum-exp;
  the keys' and values' gradients a block at a time, the queries' summed over blocks. The
  log-sum-exp's own gradient is ignored (callers only compare it)."""
  query, key, value, key_ok, query_ids, key_ids, out, lse = saved
  d_out = gradients[0]
  scale = np.float32(1 / math.sqrt(query.shape[-1]))
  # D_i = sum_h dO_ih O_ih: the softmax's backward in one number per row.
  rows = jnp.einsum('BNTH,BNTH->BNT', d_out.astype(jnp.float32), out.astype(jnp.float32))
  dtype = query.dtype

  def step(d_query, blocks):
    key_block, value_block, ok, ids = blocks
    scores = _scores(query, key_block, _allowed(ok, query_ids, ids))
    probs = jnp.exp(scores - lse[..., None])
    d_value = jnp.einsum('BNTS,BNTH->BNSH', probs.astype(dtype), d_out,
                         preferred_element_type=jnp.float32)
    d_probs = jnp.einsum('BNTH,BNSH->BNTS', d_out, value_block, preferred_element_type=jnp.float32)
    d_scores = (probs * (d_probs - rows[..., None]) * scale).astype(dtype)
    d_query = d_query + jnp.einsum('BNTS,BNSH->BNTH', d_scores, key_block,
                                   preferred_element_type=jnp.float32)
    d_key = jnp.einsum('BNTS,BNTH->BNSH', d_scores, query, preferred_element_type=jnp.float32)
    return d_query, (d_key.astype(key.dtype), d_value.astype(value.dtype))

  d_query, (d_key, d_value) = jax.lax.scan(
      step, jnp.zeros(query.shape, jnp.float32),
      (_blocks(key, block, axis=2), _blocks(value, block, axis=2), _blocks(key_ok, block),
       _blocks(key_ids, block)))
  return (d_query.astype(dtype), _unblocks(d_key, axis=2), _unblocks(d_value, axis=2), None, None,
          None)


_flash.defvjp(_flash_forward, _flash_backward)


def _band(length, padding, segments, window, block):
  """The keys around each query block: `reach` blocks each side cover the window. ->
  (around: [batch, (count + 2 reach) block, ...] -> [batch, count, spans * block, ...], the
  key rows' padding in front, allowed [batch or 1, count, block, spans * block])."""
  count = -(-length // block)
  reach = -(-max(window) // block)
  spans = 2 * reach + 1
  before = reach * block
  key_ok, key_ids = _key_rules(length, padding, segments, (count + 2 * reach) * block, before)

  def around(x):
    x = x.reshape((x.shape[0], count + 2 * reach, block) + x.shape[2:])
    return jnp.concatenate([x[:, i:i + count] for i in range(spans)], axis=2)

  query_at = np.arange(count * block).reshape(count, block)
  key_at = around(np.arange((count + 2 * reach) * block)[None] - before)[0]
  offset = key_at[:, None, :] - query_at[:, :, None]  # [count, block, span]
  allowed = (offset >= -window[0]) & (offset <= window[1]) & around(key_ok)[:, :, None, :]
  if segments is not None:
    query_ids = _pad(segments, count * block).reshape(-1, count, block)
    allowed = allowed & (query_ids[..., None] == around(key_ids)[:, :, None, :])
  return around, before, allowed


def _banded(query, key, value, padding, segments, window):
  """Sliding-window attention, query block by query block: each block's keys are the
  `2 * reach + 1` key blocks around it (`_band`), so that the scores are [batch, heads, seq,
  (2 reach + 1) block], O(L w). Plain autodiff: what it saves is of that size too.
  -> (output, seen [batch, seq, 1]: rows with a visible key)."""
  batch, length, heads, head_dim = query.shape
  block = min(LOCAL_BLOCK, length)
  around, before, allowed = _band(length, padding, segments, window, block)
  count = allowed.shape[1]
  queries = _pad(query, count * block).reshape(batch, count, block, heads, head_dim)
  keys, values = (around(_pad(x, (count * block) + 2 * before, 0, before)) for x in (key, value))
  scores = jnp.einsum('BQTNH,BQSNH->BNQTS', queries, keys, preferred_element_type=jnp.float32)
  scores = jnp.where(allowed[:, None], scores * np.float32(1 / math.sqrt(head_dim)), _NEG)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum('BNQTS,BQSNH->BQTNH', probs.astype(value.dtype), values,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  seen = _band_seen(allowed, batch, length)
  return out.reshape(batch, count * block, heads, head_dim)[:, :length], seen


def _band_seen(allowed: Array, batch: int, length: int) -> Array:
  """[batch, seq, 1]: the queries that see at least one key of their band."""
  return jnp.broadcast_to(allowed.any(-1), (batch,) + allowed.shape[1:3]).reshape(
      batch, -1, 1)[:, :length]


def _global_seen(length: int, padding: Array | None, segments: Array | None) -> Array:
  """[batch, seq, 1]: the queries whose document has a key that is not padding (sorted
  keys' ids searched per query: O(L log L), no [L, L] array)."""
  ok = jnp.ones((1, length), bool) if padding is None else padding
  ids = jnp.zeros(ok.shape, jnp.int32) if segments is None else segments
  ids, ok = jnp.broadcast_arrays(ids, ok)
  keys = jnp.sort(jnp.where(ok, ids, jnp.iinfo(ids.dtype).min), axis=1)
  at = jax.vmap(jnp.searchsorted)(keys, ids).clip(max=length - 1)
  return (jnp.take_along_axis(keys, at, axis=1) == ids)[..., None]


def splash(query: Array, key: Array, value: Array, mask: KeyMask | None,
           local_window: tuple[int, int] | None = None, interpret: bool | None = None) -> Array:
  """The TPU's Pallas splash-attention kernel (`make_splash_mha`, vmapped over the batch):
  the window as a `LocalMask` (key blocks outside it skipped from the static mask), padding
  and documents as `SegmentIds` (padding keys get an id no query has). Off TPU it runs in
  Pallas' interpret mode (slow; for checking numbers only). The same numbers as `blocked`."""
  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask
  batch, length, heads, head_dim = query.shape
  block = min(512, -(-length // 128) * 128)  # The kernel's blocks are multiples of 128.
  padded = -(-length // block) * block
  shape = (padded, padded)
  one = (splash_attention_mask.FullMask(shape) if local_window is None else
         splash_attention_mask.LocalMask(shape, local_window, offset=0))
  sizes = splash_attention_kernel.BlockSizes(*(block,) * 8)
  kernel = splash_attention_kernel.make_splash_mha(
      splash_attention_mask.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
      block_sizes=sizes,
      interpret=jax.default_backend() != 'tpu' if interpret is None else interpret)
  padding, segments = mask if mask is not None else (None, None)
  ok, ids = _key_rules(length, padding, segments, padded)
  ids = jnp.zeros(ok.shape, jnp.int32) if ids is None else ids.astype(jnp.int32)
  ids, ok = jnp.broadcast_arrays(ids, ok)
  ids = jnp.broadcast_to(ids, (batch, padded))
  no_query = jnp.iinfo(jnp.int32).min  # Padding keys: an id that no query has.
  kv_ids = jnp.broadcast_to(jnp.where(ok, ids, no_query), (batch, padded))
  query_ids = jnp.where(ids == no_query, no_query + 1, ids)
  heads_first = lambda x: jnp.swapaxes(_pad(x, padded), 1, 2)  # [batch, heads, seq, dim]
  out = jax.vmap(kernel)(
      heads_first(query * np.asarray(1 / math.sqrt(head_dim), query.dtype)), heads_first(key),
      heads_first(value), segment_ids=splash_attention_kernel.SegmentIds(query_ids, kv_ids))
  out = jnp.swapaxes(out, 1, 2)[:, :length].astype(query.dtype)
  if padding is None and segments is None:
    return out  # Every query sees itself.
  if local_window is not None and max(local_window) < length - 1:
    seen = _band_seen(_band(length, padding, segments, local_window,
                            min(LOCAL_BLOCK, length))[2], batch, length)
  else:
    seen = _global_seen(length, padding, segments)
  everything = jnp.mean(value.astype(jnp.float32), axis=1, keepdims=True).astype(value.dtype)
  return jnp.where(seen[..., None], out, everything)
