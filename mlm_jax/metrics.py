"""Masked-LM loss sums and perplexity (where metrics are written: `metric_writers.py`).

Losses are carried as sums over masked tokens with their counts, never as means of
means, so that perplexity over a whole split is exp(total loss / total tokens)
however it was batched.
"""

import math

import jax
import jax.numpy as jnp
import optax


def masked_lm_sums(logits: jax.Array, labels: jax.Array,
                   weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of cross-entropies, number of correct predictions) over weighted positions.

  The loss is computed in float32 whatever the logits' dtype.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(correct * weights)


def summarize_eval(loss_sum: float, correct: float, count: float) -> dict[str, float]:
  """Eval loss, perplexity and accuracy from totals over the whole split."""
  count = max(count, 1.0)
  loss = loss_sum / count
  return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 700.0)),
          'eval_accuracy': correct / count, 'eval_masked_tokens': count}

