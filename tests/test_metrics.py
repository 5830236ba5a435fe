"""The masked-LM sums every step computes (`mlm_jax.metrics.masked_lm_sums`): a prediction
counts as correct exactly when `jnp.argmax` picks the label, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_jax import metrics


@pytest.mark.parametrize('seed', [0, 1])
def test_correct_counts_what_argmax_picks(seed):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(0.0, 3.0, (4, 9, 6)), jnp.float32)
  # Ties at the maximum on some positions: argmax picks the first of them, so the label at
  # the second tied index is wrong.
  logits = logits.at[:, :3, 2].set(10.0).at[:, :3, 4].set(10.0)
  labels = jnp.asarray(rng.integers(0, 6, (4, 9)), jnp.int32).at[:, 0].set(2).at[:, 1].set(4)
  weights = jnp.asarray(rng.integers(0, 2, (4, 9)), jnp.float32).at[:, :2].set(1.0)
  _, correct = jax.jit(metrics.masked_lm_sums)(logits, labels, weights)
  assert correct == jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weights)
  assert correct >= 4  # The first tied index, on every row of the batch, at least.
