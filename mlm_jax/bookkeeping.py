"""What happens between training steps: logging, evaluation, checkpoints and stop checks."""

import dataclasses
import signal
import time

import jax
import tqdm

from mlm_jax import checkpoint
from mlm_jax import early_stopping
from mlm_jax.data import input_pipeline
from mlm_jax import metric_writers
from mlm_jax import metrics as metrics_lib
from mlm_jax import preemption
from mlm_jax import report
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax.errors import UserError
from mlm_jax.run import Run


_add = jax.jit(lambda total, new: jax.tree_util.tree_map(jax.numpy.add, total, new))


class Bookkeeping:
  """The training loop's bookkeeping: logging, evaluation, checkpoints and stop checks."""

  def __init__(self, run: Run, steps: steps_lib.Steps, manager,
               writer: metric_writers.MetricsWriter, schedule_steps: int,
               best: early_stopping.Record | None = None):
    self.run, self.steps, self.manager, self.writer = run, steps, manager, writer
    self.schedule_steps = schedule_steps  # Saved with each checkpoint (see optim.plan_schedule).
    # The best evaluation and those since (saved with each checkpoint, restored on resume).
    self.best = best or early_stopping.Record()
    self.stopped_early = False
    self.bar = tqdm.tqdm(total=run.total_steps, disable=jax.process_index() != 0,
                         desc='train', dynamic_ncols=True)
    self.tokens_per_step = run.global_batch_size * run.config.block_size
    self._start_interval()

  def _start_interval(self) -> None:
    self.interval_start, self.interval_steps = time.time(), 0
    self.interval_sums = None  # The first step's sums: they are laid out as every step's.

  def evaluate(self, state: steps_lib.TrainState) -> dict:
    step = int(sharding.to_host(state.step))
    config = self.run.config
    figures = steps_lib.evaluate_sources(self.steps, state.params, self.run.sources,
                                         self.run.eval_batch_size, config.max_eval_blocks,
                                         config.seed)
    self.writer.write(step, figures)
    if len(self.run.sources) > 1 and jax.process_index() == 0:
      self.bar.write(report.describe_eval(step, figures))  # Above the progress bar.
    return figures

  def save(self, state: steps_lib.TrainState, metrics: dict | None = None) -> None:
    """Starts saving `state` (with `metrics`, its evaluation, if it was evaluated); a failure
    (disk full, say) of this or the previous save is a `UserError`, and the newest complete
    checkpoint stays intact."""
    step = int(sharding.to_host(state.step))
    cursor = input_pipeline.cursor_at(step, self.run.blocks_per_epoch,
                                      self.run.global_batch_size)
    with checkpoint.save_errors(self.manager, self.run.workdir, step):
      checkpoint.save(self.manager, step, state,
                      {**dataclasses.asdict(cursor), 'schedule_steps': self.schedule_steps,
                       'early_stopping': self.best.to_dict()},
                      self.run.config_record(), metrics)

  def check_finite(self, step: int, step_metrics: dict) -> None:
    """Stops after `max_nonfinite_steps` consecutive skipped updates."""
    skipped = int(sharding.to_host(step_metrics['nonfinite']))
    if skipped >= self.run.config.max_nonfinite_steps:
      raise UserError(
          f'{skipped} consecutive non-finite losses or gradients, the last at step {step}; '
          f'lower --config.learning_rate or check the data. The last good checkpoint is kept '
          f'in {checkpoint.checkpoint_dir(self.run.workdir)}')

  def log(self, step: int, step_metrics: dict) -> None:
    """Writes the interval's means (and the last step's learning rate) as of `step`."""
    record = metrics_lib.summarize_train(sharding.to_host(self.interval_sums),
                                         self.interval_steps)
    record['learning_rate'] = float(sharding.to_host(step_metrics['learning_rate']))
    elapsed = time.time() - self.interval_start
    record['tokens_per_s'] = self.interval_steps * self.tokens_per_step / max(elapsed, 1e-9)
    self._start_interval()
    self.writer.write(step, record)
    self.bar.set_postfix(loss=f'{record["loss"]:.3f}', lr=f'{record["learning_rate"]:.2e}',
                         tok_s=f'{record["tokens_per_s"]:,.0f}')

  def after_step(self, step: int, state: steps_lib.TrainState, step_metrics: dict) -> None:
    """Logs, evaluates and saves as due after `step` (the host's count: reading
    `state.step` would wait for the device and stall the queue of dispatched steps)."""
    config = self.run.config
    last = step == self.run.total_steps
    self.interval_steps += 1
    self.interval_sums = (step_metrics['sums'] if self.interval_sums is None
                          else _add(self.interval_sums, step_metrics['sums']))  # On the device.
    if step % config.log_every_steps == 0 or last:
      self.log(step, step_metrics)
    metrics, improved = None, False
    if step % config.eval_every_steps == 0 or last:
      figures = self.evaluate(state)
      if config.keep_best_by:
        metrics = {config.keep_best_by: figures[config.keep_best_by]}
        improved = self.best.update(step, metrics[config.keep_best_by])
        self.stopped_early = self.best.exhausted(config.early_stopping_patience)
    # A new best is saved whenever it comes, so that the best evaluation has its checkpoint.
    if step % config.checkpoint_every_steps == 0 or last or improved or self.stopped_early:
      self.save(state, metrics)
    if self.stopped_early:
      self._report_early_stop(step)
    self.bar.update(1)

  def _report_early_stop(self, step: int) -> None:
    self.bar.clear()
    best = ('no finite loss yet' if self.best.best_step is None else
            f'best {self.best.best_loss:.4f} at step {self.best.best_step}')
    report.log(f'Stopping early at step {step}: the {self.run.config.keep_best_by} has not '
               f'improved for {self.best.evals_since_best} evaluations ({best})')

  def stop(self, state: steps_lib.TrainState, number: int | None) -> None:
    """Saves the state after the step in flight and raises `Stopped` (every host alike:
    `number` is the signal the hosts agreed on, None for orbax's preemption notice)."""
    step = int(sharding.to_host(state.step))
    if self.manager.latest_step() != step:
      self.save(state)
    checkpoint.finish_saves(self.manager, self.run.workdir)
    self.writer.flush()
    number = number or signal.SIGTERM
    raise preemption.Stopped(
        f'stopped by {signal.Signals(number).name} at step {step} of {self.run.total_steps}; '
        f'checkpoint saved in {checkpoint.checkpoint_dir(self.run.workdir)}. Resume with the '
        f'same command (same --workdir={self.run.workdir})', 128 + number)

  def close(self) -> None:
    self.bar.close()
    self.writer.close()
    checkpoint.finish_saves(self.manager, self.run.workdir)
