"""The best evaluation so far and the evaluations since it: what keeps the best checkpoint
(`keep_best_by`) and stops a run early (`early_stopping_patience`).

The record travels in each checkpoint's data item (`to_dict`/`from_dict`), so a resumed run,
after SIGTERM too, counts on from where the checkpoint's run was. The losses it is given are
the global eval loss, the same number on every host, so every host decides alike.
"""

import dataclasses
import math


@dataclasses.dataclass
class Record:
  """The best loss, its step and the evaluations since it. The evaluation at step 0 (the
  model before training: no checkpoint of this run holds it) is not counted."""
  best_loss: float | None = None
  best_step: int | None = None
  evals_since_best: int = 0

  def update(self, step: int, loss: float) -> bool:
    """Counts the evaluation at `step`; whether it is the new best (a strictly lower, finite
    loss: a non-finite loss never is)."""
    if step == 0:
      return False
    improved = math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss)
    if improved:
      self.best_loss, self.best_step, self.evals_since_best = float(loss), step, 0
    else:
      self.evals_since_best += 1
    return improved

  def exhausted(self, patience: int) -> bool:
    """Whether `patience` evaluations (0: never) have passed without improvement."""
    return patience > 0 and self.evals_since_best >= patience

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, record: dict | None) -> 'Record':
    """A checkpoint's record; a fresh one for a checkpoint without (an earlier release's)."""
    return cls(**record) if record else cls()
