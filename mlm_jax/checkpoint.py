"""Orbax checkpoints of the whole train state, and which one a run resumes from.

A checkpoint in `WORKDIR/checkpoints/STEP` holds three items: `state` (the train
state pytree), `data` (the epoch and batch of the next batch, and the steps the
learning-rate schedule spans) and `config` (the run's
config, to refuse a resume whose config changes what the state means). Orbax
writes each checkpoint into a temporary folder and renames it when complete, so a
reader never sees half a checkpoint.
"""

import contextlib
import json
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy

from mlm_jax import early_stopping
from mlm_jax import errors
from mlm_jax import sharding
from mlm_jax import storage
from mlm_jax.errors import UserError

# Keys that may change between a run and its resume: they change when or how much is
# logged, evaluated, saved or trained, not what the saved state means.
RESUMABLE_CHANGES = frozenset({
    'num_train_steps', 'num_epochs', 'eval_every_steps', 'eval_batch_size', 'log_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'push_to_hub', 'hub_model_id', 'num_proc',
    'cache_dir', 'per_device_batch_size', 'max_nonfinite_steps', 'fsdp', 'max_eval_blocks',
    'tokenizer_train_max_texts', 'replan_schedule', 'stop_check_every_steps',
    'early_stopping_patience',
    # The rows of a step may be split otherwise; the record's global_batch_size must hold.
    'grad_accum_steps',
    # How the forward is computed, not what: the same parameters and numbers.
    'model_impl', 'attention_impl', 'remat_policy'})
# Keys added to the config since earlier releases: a checkpoint that lacks one was made with
# the behaviour its default keeps.
ADDED_KEYS = {'wsd_decay_fraction': 0.1, 'wsd_decay': '1-sqrt', 'attention_scope': 'block',
              # Earlier checkpoints have no metrics: the best is chosen among later ones.
              'keep_best_by': 'eval_loss',
              'add_tokens': '', 'add_tokens_file': '', 'new_token_init': 'subwords',
              'pad_vocab_to_multiple_of': 1, 'mixture': ''}


def checkpoint_dir(workdir: str) -> epath.Path:
  return storage.path(workdir) / 'checkpoints'


def model_config_dir(workdir: str) -> epath.Path:
  """Where a run keeps its model's config.json, to rebuild the model around a checkpoint."""
  return storage.path(workdir) / 'model'


def export_dir(workdir: str) -> epath.Path:
  return storage.path(workdir) / 'export'


def make_manager(workdir: str, keep: int | None, create: bool = True,
                 best_by: str = '') -> ocp.CheckpointManager:
  """The run's checkpoints: the newest `keep` (None: all) and, with `best_by` (a metric that
  `save` is given at evaluations), the one with its lowest value as well, which
  `manager.best_step()` names; orbax reads the saved metrics back when a run resumes."""
  if best_by:
    policy = preservation_policy.AnyPreservationPolicy([
        preservation_policy.LatestN(n=keep),
        preservation_policy.BestN(get_metric_fn=lambda metrics: metrics[best_by], reverse=True,
                                  n=1, keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda metrics: metrics[best_by], best_mode='min',
        create=create, cleanup_tmp_directories=create)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           cleanup_tmp_directories=create)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers={
      'state': ocp.StandardCheckpointHandler(),
      'data': ocp.JsonCheckpointHandler(),
      'config': ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_cursor: dict,
         config_dict: dict, metrics: dict | None = None) -> None:
  """Starts an (asynchronous) save; `manager.wait_until_finished()` completes it. `metrics`:
  the evaluation of this step's state, which the best checkpoint is chosen by."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_cursor),
      config=ocp.args.JsonSave(config_dict)), metrics=metrics, force=True)


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict, dict]:
  """Restores (state, data cursor, config) at `step`, laid out like `target`."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore()))
  return restored.state, restored.data, restored.config


def restore_params(workdir: str, step: int | None, sharding: jax.sharding.Sharding) -> Any:
  """The parameters alone of the checkpoint at `step` (default: the latest), placed with
  `sharding`: the optimizer state (twice the parameters with Adam) is never read."""
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={'state': ocp.PyTreeCheckpointHandler()})
  steps = manager.all_steps()
  if not steps:
    raise UserError(f'{workdir} has no checkpoint; train first or pass an export directory')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f'{workdir} has no checkpoint at step {step}; '
                    f'available steps: {", ".join(map(str, sorted(steps)))}')
  saved = manager.item_metadata(step)['state']['params']
  item = {'params': jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), dict(saved))}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored.state['params']


def read_metadata(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
  """(data cursor, config) of the checkpoint at `step`, without reading the state."""
  restored = manager.restore(step, args=ocp.args.Composite(
      data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
  return restored.data, restored.config


def saved_early_stopping(manager: ocp.CheckpointManager, step: int) -> early_stopping.Record:
  """The best evaluation and the evaluations since it, as the checkpoint at `step` saved
  them (a fresh record at step 0, or for a checkpoint of an earlier release)."""
  if step == 0:
    return early_stopping.Record()
  cursor, _ = read_metadata(manager, step)
  return early_stopping.Record.from_dict(cursor.get('early_stopping'))


def saved_schedule_steps(manager: ocp.CheckpointManager) -> int | None:
  """The steps the newest readable checkpoint's learning-rate schedule spans (None: no
  checkpoint, or one from before this was recorded)."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      cursor, _ = read_metadata(manager, step)
    except Exception:  # pylint: disable=broad-except
      continue  # `restore_newest` reports it.
    return cursor.get('schedule_steps')
  return None


def set_aside(workdir: str, step: int) -> epath.Path:
  """Moves an unrestorable checkpoint out of the manager's sight, keeping it for inspection."""
  aside = (storage.path(workdir) / 'unrestorable_checkpoints' /
           f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  aside.parent.mkdir(parents=True, exist_ok=True)
  (checkpoint_dir(workdir) / str(step)).rename(aside)
  return aside


def config_differences(saved: dict, current: dict) -> list[str]:
  """The keys whose change would alter what the checkpoint means."""
  keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
  saved = ADDED_KEYS | saved
  return sorted(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}'
                for k in keys if saved.get(k) != current.get(k))


def check_resumable(saved: dict, current: dict, workdir: str) -> None:
  differences = config_differences(saved, current)
  if differences:
    raise UserError(f'the checkpoint in {workdir} was made with another config '
                    f'({"; ".join(differences)}); resume with the same config or use a new '
                    '--workdir')



# What a checkpoint whose bytes are bad fails with (a truncated or garbled file), as
# opposed to storage that cannot be reached or read just now: only those are set aside.
# tensorstore says DATA_LOSS for a truncated or garbled array file; JSON metadata fails to
# parse (JSONDecodeError, handled by type).
_CORRUPT_MARKERS = ('DATA_LOSS', 'Error decoding', 'Failed to decode', 'corrupt', 'checksum',
                    'Checksum', 'truncated', 'Unexpected end', 'unexpected end')
_RESTORED, _CORRUPT, _UNREADABLE = 0, 1, 2


def is_corrupt(error: BaseException) -> bool:
  """Whether `error`, raised restoring a checkpoint, says the checkpoint itself is damaged."""
  if isinstance(error, (ConnectionError, TimeoutError, PermissionError)):
    return False
  if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
    return True
  return any(marker in str(error) for marker in _CORRUPT_MARKERS)


def restore_newest(manager: ocp.CheckpointManager, workdir: str, target: Any,
                   config_record: dict, log: Callable[[str], None]) -> Any:
  """The newest checkpoint that restores (checked against `config_record`), else `target`.

  All hosts restore the same step: they try each step together and agree on the
  outcome. A checkpoint that is recognisably corrupt on any host (a truncated file, say)
  is reported by name and moved aside by process 0 behind a barrier, and the one before
  it is tried; any other failure (storage unreachable, say) stops the run and leaves
  every checkpoint in place.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    where = checkpoint_dir(workdir) / str(step)
    error = None
    try:
      _, saved_config = read_metadata(manager, step)
      check_resumable(saved_config, config_record, workdir)
      restored, cursor, _ = restore(manager, step, target)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      error = e
    outcome = _RESTORED if error is None else _CORRUPT if is_corrupt(error) else _UNREADABLE
    outcomes = sharding.gather_hosts(np.array([step, outcome], np.int32))
    if len(set(outcomes[:, 0])) > 1:
      raise UserError(f'the hosts see different checkpoints in {checkpoint_dir(workdir)} '
                      f'(newest steps {sorted(set(outcomes[:, 0].tolist()))}); the workdir '
                      'must be on storage that every host sees alike (a GCS bucket, NFS)')
    worst = int(outcomes[:, 1].max())
    if worst == _RESTORED:
      manager.reload()
      log(f'Resuming from the checkpoint at step {step} (epoch {cursor["epoch"]}, '
          f'batch {cursor["batch"]}) in {checkpoint_dir(workdir)}')
      return restored
    reason = errors.reason(error) if error is not None else 'on another host'
    if worst == _UNREADABLE:
      raise UserError(f'checkpoint {where} could not be read ({reason}); it does not look '
                      'corrupt, so it was left in place: check that the storage is reachable '
                      'and rerun the same command')
    aside = sharding.on_process_zero(
        lambda: set_aside(workdir, step),  # pylint: disable=cell-var-from-loop
        f'process 0 could not move the checkpoint {where} aside (see its error)') or where
    log(f'Checkpoint {where} could not be restored ({reason}); moved it to {aside} and '
        'trying the one before it.')
  manager.reload()
  if steps:
    raise UserError(f'no checkpoint in {checkpoint_dir(workdir)} could be restored (see '
                    'above); use a new --workdir to start afresh')
  return target


@contextlib.contextmanager
def save_errors(manager: ocp.CheckpointManager, workdir: str, step: int | None):
  """Turns a failed save (disk full, say) into a `UserError` that says what is intact."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    complete = [s for s in manager.all_steps() if s != step]
    kept = (f'the checkpoint at step {max(complete)} is intact' if complete
            else 'no earlier checkpoint exists')
    raise UserError(
        f'could not write the checkpoint at step {step} in {checkpoint_dir(workdir)} '
        f'({errors.reason(e)}); {kept}. Free disk space (or fix the workdir) and rerun the '
        'same command to resume') from e


def finish_saves(manager: ocp.CheckpointManager, workdir: str) -> None:
  """Waits for the saves in flight; a failure is a `UserError` (see `save_errors`)."""
  with save_errors(manager, workdir, manager.latest_step()):
    manager.wait_until_finished()
