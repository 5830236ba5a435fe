"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The pieces live beside it: `run.py` prepares the data, tokenizer and model,
`optim.py` the optimizer, `steps.py` the compiled steps, `bookkeeping.py` what
happens between steps, `checkpoint.py` resume, `export.py` the HF export and
`report.py` the closing summary.
"""

import time

import jax
import ml_collections

from mlm_jax import bookkeeping
from mlm_jax import checkpoint
from mlm_jax import export
from mlm_jax.data import input_pipeline
from mlm_jax import masking
from mlm_jax import metric_writers
from mlm_jax import model as model_lib
from mlm_jax import optim
from mlm_jax import preemption
from mlm_jax import report
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax import validation
from mlm_jax import storage
from mlm_jax import errors
from mlm_jax.errors import UserError
from mlm_jax.run import Run, document_separator, prepare


def _train(run: Run, steps: steps_lib.Steps, state: steps_lib.TrainState,
           books: bookkeeping.Bookkeeping) -> steps_lib.TrainState:
  """Runs the steps from `state.step` to the end; returns the final state."""
  start_step = int(sharding.to_host(state.step))
  books.bar.update(start_step)
  if start_step == 0:
    books.evaluate(state)
  if books.best.exhausted(run.config.early_stopping_patience):
    return state  # Stopped early before; only its export may be missing.
  batches = (sharding.shard_batch(batch, steps.mesh, batch_axis=1)
             for batch in input_pipeline.train_batches(
                 run.train_blocks, run.global_batch_size, run.config.grad_accum_steps,
                 run.config.seed, start_step, run.weights))
  previous = None
  with preemption.StopRequest() as stop:
    for step in range(start_step + 1, run.total_steps + 1):
      state, step_metrics = steps.train(state, next(batches))
      # Checking the previous step's metrics keeps one step queued on the device.
      if previous is not None:
        books.check_finite(step - 1, previous)
      previous = step_metrics
      books.after_step(step, state, step_metrics)
      if books.stopped_early:  # Every host alike: the eval loss is global.
        break
      number = preemption.agreed_stop(stop, step, run.config.stop_check_every_steps)
      if number or books.manager.reached_preemption(step):
        books.stop(state, number)
    if previous is not None:
      books.check_finite(step, previous)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains on `config`, resuming from `workdir` if it has a checkpoint; returns the summary."""
  validation.validate_config(config)
  storage.check_writable(workdir, host=jax.process_index())
  run = prepare(config, workdir)
  report.log(f'{report.describe_blocks(run.sources)} of {config.block_size} tokens; '
             f'{jax.device_count()} device(s), global batch {run.global_batch_size}; '
             f'{run.total_steps} steps')

  manager = checkpoint.make_manager(workdir, config.keep_checkpoints,
                                    best_by=config.keep_best_by)
  schedule_steps = optim.plan_schedule(run.total_steps, checkpoint.saved_schedule_steps(manager),
                                       config.replan_schedule, report.log)
  mesh = sharding.make_mesh(config.fsdp)
  tx, schedule = optim.make_optimizer(config, schedule_steps)
  state, state_shardings = steps_lib.init_train_state(run.model, tx, config.seed, mesh)
  steps = steps_lib.compile_steps(
      run.model, tx, schedule, run.spec, config.seed, mesh, state_shardings,
      head_fn=model_lib.head_fn(run.model) if config.masked_lm_head else None,
      max_predictions=model_lib.max_predictions(
          config.block_size, config.mlm_probability,
          max(masking.count_dispersion(b, run.spec) for b in run.train_blocks)),
      sep_id=document_separator(config, run.tokenizer))
  state = checkpoint.restore_newest(manager, workdir, state, run.config_record(), report.log)
  run.eval_batch_size = steps_lib.eval_rows_that_fit(
      steps, state.params, run.eval_batch_size, config.block_size, report.log,
      blocks=max(input_pipeline.evaluated_blocks(len(source.blocks.test), config.max_eval_blocks)
                 for source in run.sources))
  start_step = int(sharding.to_host(state.step))
  best = checkpoint.saved_early_stopping(manager, start_step)
  export_dir = checkpoint.export_dir(workdir)
  is_main = jax.process_index() == 0
  finished = start_step >= run.total_steps or best.exhausted(config.early_stopping_patience)
  if finished and _has_export(export_dir):
    report.log(f'{workdir} holds a finished run (step {start_step} of {run.total_steps}'
               f'{", stopped early" if start_step < run.total_steps else ""}); nothing to '
               'train. Use a new --workdir to train again.')
    return report.summary(run, metric_writers.read_metrics(workdir), 0.0, 0, start_step)

  steps_lib.fit_host_to_train_step(
      steps, state, (config.grad_accum_steps, run.global_batch_size // config.grad_accum_steps,
                     config.block_size), report.log)
  sharding.on_process_zero(  # What inference needs to rebuild the model around a checkpoint.
      lambda: storage.save_with(run.model.config.save_pretrained,
                                checkpoint.model_config_dir(workdir)),
      f'process 0 could not save the model config in {workdir} (see its error)')
  start_time = time.time()
  books = bookkeeping.Bookkeeping(run, steps, manager, metric_writers.MetricsWriter(
      workdir, enabled=is_main, start_step=start_step), schedule_steps, best)
  try:
    state = _train(run, steps, state, books)
  finally:
    books.close()
  wall = time.time() - start_time
  final_step = int(sharding.to_host(state.step))

  params = sharding.to_host(_exported_params(manager, state, config.keep_best_by))  # Every host gathers.
  # Also where a run stopped between its last checkpoint and its export. No host reports (or
  # exits) before it is written, nor waits for it forever.
  sharding.on_process_zero(
      lambda: _export(run, params, export_dir, manager.latest_step()),
      f'process 0 could not write the export in {export_dir} (see its error); the checkpoint '
      'holds the trained parameters: fix that and rerun the same command')
  summary = report.summary(run, metric_writers.read_metrics(workdir), wall,
                           final_step - start_step, final_step)
  report.print_summary(summary)
  if config.push_to_hub:  # The others wait for the upload: no host ends long before another.
    sharding.on_process_zero(lambda: report.push_to_hub(export_dir, config.hub_model_id),
                             'process 0 could not push the export to the hub (see its error)')
  return summary


def _exported_params(manager, state: steps_lib.TrainState, best_by: str):
  """The parameters to export: the best checkpoint's where one is kept (`keep_best_by`) and
  is not the final state, else the final state's."""
  best_step = manager.best_step() if best_by else None
  if best_step is None or best_step == int(sharding.to_host(state.step)):
    return state.params
  report.log(f'Exporting the best checkpoint, step {best_step}')
  best, _, _ = checkpoint.restore(manager, best_step, state)
  return best.params


def _export(run: Run, params, export_dir, checkpointed_step: int | None) -> None:
  """The export; failing to write it (a full disk) is a `UserError`: the last checkpoint holds
  the same parameters, and the same command writes the export without training again."""
  try:
    export.export(run.model, params, run.tokenizer, export_dir)
  except Exception as e:  # pylint: disable=broad-except
    if not (isinstance(e, OSError) or errors.is_disk_full(e)):
      raise  # A bug, with its traceback.
    raise UserError(
        f'could not write the export in {export_dir} ({errors.reason(e)}); the checkpoint at '
        f'step {checkpointed_step} holds the trained parameters. Free disk space (or fix the '
        'workdir) and rerun the same command: it writes the export without training again'
    ) from e


def _has_export(export_dir) -> bool:
  """Whether the export holds its weights and tokenizer (a run stopped before or during
  the export has not)."""
  return all((export_dir / name).exists() for name in ('model.safetensors',
                                                       'tokenizer_config.json'))
