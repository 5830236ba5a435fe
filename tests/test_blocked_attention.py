"""The blocked attention path (`models/attention.py`) against the dense one it replaces.

Guards that 'blocked' computes what 'xla' (every [L, L] score) computes, within 2e-6 in
float32, on the output and on the gradients of queries, keys and values: global layers
(the online softmax and its FlashAttention-2 backward, queries a block at a time) and local
ones (the banded form), at lengths that are not a multiple of the block, with windows even,
odd and wider than the sequence, padding, fully masked query rows (the dense convention:
the mean of every value), several documents in one block; and through a whole tiny model
of every family. Also that 'auto' keeps the dense path where it is the faster, and bfloat16
runs with float32 statistics. Block sizes are shrunk (monkeypatch) so that small shapes span
many blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mlm_jax.models import FlaxAutoModelForMaskedLM
from mlm_jax.models import attention
from mlm_jax.models import layers

TOLERANCE = 2e-6


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  """Global key blocks of 8, global query blocks of 16 (on CPU) and local query blocks of 4: a
  21-token sequence spans 3, 2 and 6."""
  monkeypatch.setattr(attention, 'GLOBAL_BLOCK', 8)
  monkeypatch.setattr(attention, 'GLOBAL_QUERY_BLOCK', {'cpu': 16})
  monkeypatch.setattr(attention, 'LOCAL_BLOCK', 4)


def _inputs(length: int, batch: int = 2, heads: int = 2, head_dim: int = 8, seed: int = 0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
               for _ in range(3))


def _output_and_gradients(implementation, query, key, value, mask, window):
  """The attention's output and the gradients of a loss that weighs every output
  differently (so that a permuted or misplaced row shows)."""
  def loss(query, key, value):
    out = layers.attend(query, key, value, mask, dropout_rate=0.0, deterministic=True,
                        dropout_rng=None, implementation=implementation, local_window=window)
    weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out * weights), out
  (_, out), gradients = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      query, key, value)
  return (out,) + gradients


def _assert_blocked_is_dense(length, window, padding=None, segments=None):
  inputs = _inputs(length)
  mask = attention.keys_mask(padding, segments)
  dense = _output_and_gradients('xla', *inputs, mask, window)
  blocked = _output_and_gradients('blocked', *inputs, mask, window)
  for name, a, b in zip(('output', 'd query', 'd key', 'd value'), dense, blocked):
    np.testing.assert_allclose(b, a, atol=TOLERANCE, rtol=0, err_msg=name)


WINDOWS = [None, (2, 2), (3, 3), (5, 5), (30, 30)]  # Global; local even, odd, wider than L.


@pytest.mark.parametrize('window', WINDOWS)
def test_without_a_mask_blocked_equals_dense(window):
  _assert_blocked_is_dense(21, window)  # Not a multiple of either block.


@pytest.mark.parametrize('window', WINDOWS)
def test_padding_and_fully_masked_rows_follow_the_dense_convention(window):
  """Row 0 ends in padding; row 1 is all padding: its queries see no key, and the dense path
  gives them the mean of every value (uniform weights over the same large negative score)."""
  padding = np.ones((2, 21), np.int32)
  padding[0, 16:] = 0
  padding[1] = 0
  _assert_blocked_is_dense(21, window, padding=padding)


@pytest.mark.parametrize('window', WINDOWS)
def test_documents_within_a_block_and_across_blocks(window):
  """Documents of 3, 2, 1 and more tokens inside the first blocks, one crossing a block's
  edge; padding at the end of row 0 in a document of its own (fully masked rows again)."""
  segments = np.zeros((2, 21), np.int32)
  segments[:, 3:], segments[:, 5:], segments[:, 6:] = 1, 2, 3
  segments[0, 17:] = 7
  padding = np.ones((2, 21), np.int32)
  padding[0, 17:] = 0
  _assert_blocked_is_dense(21, window, padding=padding, segments=segments)
  _assert_blocked_is_dense(21, window, segments=segments)


def test_a_fully_masked_row_is_the_mean_of_every_value():
  """The convention itself (what both paths must give), not only their agreement."""
  query, key, value = _inputs(8)
  mask = attention.keys_mask(jnp.zeros((2, 8), jnp.int32), None)
  out = attention.blocked(query, key, value, mask, (2, 2))
  np.testing.assert_allclose(out, jnp.broadcast_to(value.mean(1, keepdims=True), out.shape),
                             atol=1e-6)


def test_bfloat16_runs_with_float32_statistics():
  """A bfloat16 global layer of 200 keys (25 blocks): within bfloat16's rounding of float32."""
  query, key, value = _inputs(200, batch=1)
  exact = attention.blocked(query, key, value, None)
  low = attention.blocked(*(x.astype(jnp.bfloat16) for x in (query, key, value)), None)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(low.astype(jnp.float32), exact, atol=2e-2)


@pytest.mark.parametrize('length, local, dropping, expected', [
    (512, False, False, 'xla'), (513, False, False, 'blocked'),
    (256, True, False, 'xla'), (257, True, False, 'blocked'),
    (8192, False, True, 'xla'),  # No dropout in the blocked kernels.
])
def test_auto_on_cpu_is_dense_where_dense_is_faster(length, local, dropping, expected):
  assert attention.choose('auto', length=length, local=local, dropping=dropping,
                          backend='cpu') == expected


def _family_configs():
  sizes = dict(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, pad_token_id=1)
  return {
      'roberta': transformers.RobertaConfig(num_hidden_layers=2, **sizes),
      'bert': transformers.BertConfig(num_hidden_layers=2, **sizes),
      'distilbert': transformers.DistilBertConfig(
          vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
          max_position_embeddings=40, pad_token_id=1),
      'albert': transformers.AlbertConfig(num_hidden_layers=2, embedding_size=8, **sizes),
      'modernbert': transformers.ModernBertConfig(
          num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=6,
          bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2, **sizes),
  }


@pytest.mark.parametrize('family', sorted(_family_configs()))
def test_every_family_trains_the_same_through_blocked_attention(family):
  """Loss and every parameter's gradient of a whole model, padding and documents included."""
  config = _family_configs()[family]
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 50, (2, 21)), jnp.int32)
  padding = jnp.ones((2, 21), jnp.int32).at[0, 17:].set(0)
  segments = jnp.zeros((2, 21), jnp.int32).at[:, 9:].set(1)
  results = []
  for implementation in ('xla', 'blocked'):
    model = FlaxAutoModelForMaskedLM.from_config(config, seed=0, attention_impl=implementation)

    def loss(params):
      logits = model.module.apply({'params': params}, ids, padding, segments)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 5])
    results.append(jax.jit(jax.value_and_grad(loss))(model.params))
  (dense_loss, dense_grads), (blocked_loss, blocked_grads) = results
  np.testing.assert_allclose(blocked_loss, dense_loss, atol=TOLERANCE, rtol=0)
  for path, (a, b) in zip(jax.tree_util.tree_flatten_with_path(dense_grads)[0],
                          zip(jax.tree.leaves(dense_grads), jax.tree.leaves(blocked_grads))):
    np.testing.assert_allclose(b, a, atol=TOLERANCE, rtol=0, err_msg=str(path[0]))


def test_splash_attention_equals_dense_in_interpret_mode():
  """The TPU kernel, run by Pallas' interpreter on this CPU: a local layer with documents and
  fully masked padding rows (its global form is checked by the same code path's FullMask)."""
  segments = np.zeros((2, 21), np.int32)
  segments[:, 3:], segments[:, 9:], segments[0, 17:] = 1, 2, 7
  padding = np.ones((2, 21), np.int32)
  padding[0, 17:] = 0
  inputs = _inputs(21)
  mask = attention.keys_mask(padding, segments)
  dense = _output_and_gradients('xla', *inputs, mask, (3, 3))
  splash = _output_and_gradients('splash', *inputs, mask, (3, 3))
  for name, a, b in zip(('output', 'd query', 'd key', 'd value'), dense, splash):
    np.testing.assert_allclose(b, a, atol=TOLERANCE, rtol=0, err_msg=name)
