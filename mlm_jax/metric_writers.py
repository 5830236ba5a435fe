"""Where metrics go: `WORKDIR/metrics.jsonl` and TensorBoard events, and reading them back."""

import json
import sys
from typing import Any

import numpy as np

from mlm_jax import storage


def _tensorboardx():
  """tensorboardX, imported without torch unless torch is loaded already: it imports torch
  (2 s) where installed only to recognise torch tensors, which this project never logs."""
  if 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    return tensorboardX
  sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX handles.
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel,redefined-outer-name
  finally:
    del sys.modules['torch']
  return tensorboardX


class MetricsWriter:
  """Writes `WORKDIR/metrics.jsonl` and TensorBoard events; a no-op off process 0.

  A run that resumes at `start_step` first drops the records that the interrupted run
  logged after that step (they are logged again), so every step appears once;
  TensorBoard is told the same with `purge_step`. The file is rewritten whole at each
  write: a cloud bucket cannot append, and the file stays small.
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
    self._enabled = enabled
    self._path = storage.path(workdir) / 'metrics.jsonl'
    self._lines: list[str] = []
    self._tensorboard = None
    if enabled:
      if start_step > 0:
        self._lines = [json.dumps(r) for r in read_metrics(workdir) if r['step'] <= start_step]
      self._rewrite()
      self._tensorboard = _tensorboardx().SummaryWriter(
          str(storage.path(workdir) / 'tensorboard'), purge_step=start_step + 1)

  def _rewrite(self) -> None:
    # Through a sibling and a rename, so a reader (a plot, a test) never sees half a file.
    tmp = self._path.parent / f'.{self._path.name}.tmp'
    tmp.write_text(''.join(line + '\n' for line in self._lines))
    tmp.replace(self._path)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._lines.append(json.dumps({'step': int(step), **scalars}))
    self._rewrite()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, int(step))

  def flush(self) -> None:
    if self._enabled:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The records of `WORKDIR/metrics.jsonl`, oldest first (empty if none); a line cut short
  by a killed run is skipped."""
  path = storage.path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records
