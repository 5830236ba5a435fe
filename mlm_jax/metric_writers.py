"""Where metrics go: `WORKDIR/metrics.jsonl` and TensorBoard events, and reading them back."""

import json
import os
from typing import Any

import numpy as np


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
  """The records of `WORKDIR/metrics.jsonl`, oldest first (empty if none); a line cut short
  by a killed run (which a resumed run then appends after) is skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
