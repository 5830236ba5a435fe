"""Masked-LM loss sums, perplexity, and where metrics are written.

Losses are carried as sums over masked tokens with their counts, never as means of
means, so that perplexity over a whole split is exp(total loss / total tokens)
however it was batched.
"""

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


class MetricsWriter:
  """Writes `WORKDIR/metrics.jsonl` and TensorBoard events; a no-op off process 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if enabled:
      import tensorboardX  # pylint: disable=import-outside-toplevel
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, int(step))

  def flush(self) -> None:
    if self._enabled:
      self._jsonl.flush()
      self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The records of `WORKDIR/metrics.jsonl`, oldest first (empty if none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
