"""Masked-LM loss sums and perplexity (where metrics are written: `metric_writers.py`).

Losses are carried as sums over masked tokens with their counts, never as means of
means, so that perplexity over a whole split is exp(total loss / total tokens)
however it was batched.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct


def masked_lm_sums(logits: jax.Array, labels: jax.Array,
                   weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of cross-entropies, number of correct predictions) over weighted positions.

  The loss is computed in float32 whatever the logits' dtype. A prediction is correct when
  the label is the first index of the largest logit, as `jnp.argmax` picks it; that is
  written as two plain reductions (the maximum, then the least index holding it), which
  XLA:CPU vectorises, where argmax's reduction of (value, index) pairs was 3.6% of the small
  CPU step (BENCHMARKS.md).
  """
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  first_top = jnp.min(jnp.where(logits == top, index, logits.shape[-1]), axis=-1)
  correct = (first_top == labels).astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(correct * weights)


def summarize_eval(loss_sum: float, correct: float, count: float) -> dict[str, float]:
  """Eval loss, perplexity and accuracy from totals over the whole split."""
  count = max(count, 1.0)
  loss = loss_sum / count
  return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 700.0)),
          'eval_accuracy': correct / count, 'eval_masked_tokens': count}


def source_figures(name: str, figures: dict[str, float]) -> dict[str, float]:
  """A mixture source's `summarize_eval` figures under its own names: `eval/NAME/loss`,
  `.../perplexity`, `.../accuracy`, `.../masked_tokens` (TensorBoard groups them by source)."""
  return {f'eval/{name}/{key.removeprefix("eval_")}': value for key, value in figures.items()}


def by_source(record: dict[str, float]) -> dict[str, dict[str, float]]:
  """{NAME: {'loss': ..., 'perplexity': ...}} of the `source_figures` in a metrics record."""
  sources: dict[str, dict[str, float]] = {}
  for key, value in record.items():
    if key.startswith('eval/') and key.count('/') == 2:
      _, name, figure = key.split('/')
      sources.setdefault(name, {})[figure] = value
  return sources


class TrainSums(struct.PyTreeNode):
  """A train step's metrics as sums, so that a log interval's are the sum of its steps'
  (added on the device) and its means are taken once, over every token of the interval."""
  loss_sum: jax.Array  # Cross-entropy summed over the predicted tokens.
  correct: jax.Array
  predicted_tokens: jax.Array  # Masked tokens the loss covers.
  masked_tokens: jax.Array  # All masked tokens, those the head had no room for included.
  grad_norm: jax.Array  # Summed over updates.
  updates: jax.Array  # Steps that updated the parameters (a non-finite one does not).

  @classmethod
  def zeros(cls) -> 'TrainSums':
    return cls(*([jnp.zeros((), jnp.float32)] * 6))


def summarize_train(sums: TrainSums, steps: int) -> dict[str, float]:
  """An interval's means from its summed `TrainSums` (host values) over `steps` steps."""
  sums = jax.tree_util.tree_map(lambda x: float(np.asarray(x)), sums)
  predicted, updates = max(sums.predicted_tokens, 1.0), max(sums.updates, 1.0)
  nan_if_none = (lambda x: x) if sums.updates else (lambda x: float('nan'))
  return {'loss': nan_if_none(sums.loss_sum / predicted),
          'accuracy': nan_if_none(sums.correct / predicted),
          'grad_norm': nan_if_none(sums.grad_norm / updates),
          'masked_tokens': sums.masked_tokens,
          'dropped_masked_tokens': sums.masked_tokens - sums.predicted_tokens,
          'skipped_steps': steps - sums.updates}
