"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The train state is one pytree; the train and eval steps are pure functions of it,
compiled with `jax.jit` over a (`data`, `fsdp`) mesh (see `sharding.py`). Masking runs inside
the step on the device; every random draw derives from (seed, step), so a resumed
run continues exactly where the interrupted one was.
"""

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import struct, traverse_util

from mlm_jax import checkpoint
from mlm_jax import data
from mlm_jax import input_pipeline
from mlm_jax import masking
from mlm_jax import metrics as metrics_lib
from mlm_jax import model as model_lib
from mlm_jax import preemption
from mlm_jax import sharding
from mlm_jax import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError, first_line

EVAL_STREAM = 1  # Eval masking draws from fold_in(PRNGKey(seed), EVAL_STREAM), fixed.


class TrainState(struct.PyTreeNode):
  """Everything that changes during training; checkpointed whole."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # Fixed; per-step keys are fold_in(rng, step).
  nonfinite: jax.Array  # Consecutive steps skipped for a non-finite loss or gradient.


# ----------------------------------------------------------------------------
# Optimizer.


def decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay: all but biases and LayerNorm scales."""
  flat = traverse_util.flatten_dict(params)
  mask = {path: path[-1] != 'bias' and path[-2:] != ('LayerNorm', 'scale') for path in flat}
  return traverse_util.unflatten_dict(mask)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then linear or cosine decay to 0 at `total_steps`."""
  warmup = min(config.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if config.lr_schedule == 'linear':
    decay = optax.linear_schedule(config.learning_rate, 0.0, decay_steps)
  elif config.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
  else:
    raise UserError(f'lr_schedule={config.lr_schedule!r} is not supported; use linear or cosine')
  warm = optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1))
  return optax.join_schedules([warm, decay], [warmup])


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(config, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm),
      optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay,
                  mask=decay_mask))
  return tx, schedule


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed), nonfinite=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------
# Steps.


def mask_micro_batches(rng: jax.Array, ids: jax.Array, spec: masking.MaskingSpec):
  """Masks [micro_batches, rows, length] ids; row r of micro-batch a is global row a*rows+r."""
  rows = ids.shape[1]
  special = masking.special_tokens_mask(ids, spec.special_ids)
  return jax.vmap(lambda a, i, s: masking.mask_tokens(rng, i, s, spec, first_row=a * rows))(
      jnp.arange(ids.shape[0]), ids, special)


def train_step(state: TrainState, ids: jax.Array, *, apply_fn: Callable,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               spec: masking.MaskingSpec, head_fn: Callable | None = None,
               max_predictions: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over a [grad_accum_steps, rows, length] batch of token ids.

  The loss is the mean cross-entropy over all masked tokens of all micro-batches,
  so k accumulated micro-batches give the gradient of one batch k times larger.
  With `head_fn` (see `model.masked_head_fn`) the vocabulary head runs only on the
  `max_predictions` masked positions of each row. A non-finite loss or gradient
  skips the update and is counted.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  mask_rng, dropout_rng = jax.random.split(step_rng)
  inputs, labels, weights = mask_micro_batches(mask_rng, ids, spec)
  if head_fn is None:
    positions = jnp.zeros(ids.shape[:2] + (0,), jnp.int32)  # Unused: every position.
  else:  # The masked positions of each row first (weight 1 sorts before 0).
    positions = jax.lax.top_k(weights, max_predictions)[1]
    labels = jnp.take_along_axis(labels, positions, axis=-1)
    weights = jnp.take_along_axis(weights, positions, axis=-1)
  total = jnp.maximum(weights.sum(), 1.0)

  def logits_of(params, micro_inputs, micro_positions, rng):
    if head_fn is None:
      return apply_fn(micro_inputs, params=params, train=True, dropout_rng=rng).logits
    return head_fn(micro_inputs, micro_positions, params, True, rng)

  def micro_step(carry, micro):
    index, micro_inputs, micro_positions, micro_labels, micro_weights = micro

    def loss_fn(params):
      logits = logits_of(params, micro_inputs, micro_positions,
                         jax.random.fold_in(dropout_rng, index))
      loss_sum, correct = metrics_lib.masked_lm_sums(logits, micro_labels, micro_weights)
      return loss_sum / total, (loss_sum, correct)

    grads, (loss_sum, correct) = jax.grad(loss_fn, has_aux=True)(state.params)
    acc_grads, acc_loss, acc_correct = carry
    return (jax.tree_util.tree_map(jnp.add, acc_grads, grads), acc_loss + loss_sum,
            acc_correct + correct), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  (grads, loss_sum, correct), _ = jax.lax.scan(
      micro_step, (zeros, 0.0, 0.0),
      (jnp.arange(ids.shape[0]), inputs, positions, labels, weights))
  loss, grad_norm = loss_sum / total, optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_if_finite = lambda new, old: jax.tree_util.tree_map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
  step_metrics = {'loss': loss, 'accuracy': correct / total, 'grad_norm': grad_norm,
                  'learning_rate': schedule(state.step), 'masked_tokens': total,
                  'nonfinite': new_state.nonfinite}
  return new_state, step_metrics


def eval_step(params: Any, ids: jax.Array, row_weights: jax.Array, first_row: jax.Array, *,
              apply_fn: Callable, spec: masking.MaskingSpec, rng: jax.Array) -> jax.Array:
  """[loss sum, correct, masked count] of one eval batch under the fixed eval masking."""
  special = masking.special_tokens_mask(ids, spec.special_ids)
  inputs, labels, weights = masking.mask_tokens(rng, ids, special, spec, first_row=first_row)
  weights = weights * row_weights[:, None]
  logits = apply_fn(inputs, params=params, train=False).logits
  loss_sum, correct = metrics_lib.masked_lm_sums(logits, labels, weights)
  return jnp.stack([loss_sum, correct, weights.sum()])


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled steps of a run, and the layout they expect."""
  train: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
  eval: Callable[..., jax.Array]
  mesh: jax.sharding.Mesh


def compile_steps(apply_fn: Callable, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, spec: masking.MaskingSpec, seed: int,
                  mesh: jax.sharding.Mesh, state_shardings: Any = None,
                  head_fn: Callable | None = None, max_predictions: int = 0) -> Steps:
  """jit the steps over `mesh`: the state donated, batches sharded over every device.

  `state_shardings` (a TrainState of shardings, see `sharding.state_sharding`)
  defaults to replicated. `head_fn` and `max_predictions` select the masked-only
  vocabulary head for training; evaluation always scores every masked token.
  """
  replicated = sharding.replicated(mesh)
  if state_shardings is None:
    state_shardings = replicated
    params_shardings = replicated
  else:
    params_shardings = state_shardings.params
  train = jax.jit(
      functools.partial(train_step, apply_fn=apply_fn, tx=tx, schedule=schedule, spec=spec,
                        head_fn=head_fn, max_predictions=max_predictions),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh, batch_axis=1)),
      out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_rng = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_STREAM)
  evaluate_batch = jax.jit(
      functools.partial(eval_step, apply_fn=apply_fn, spec=spec, rng=eval_rng),
      in_shardings=(params_shardings, sharding.batch_sharding(mesh),
                    sharding.batch_sharding(mesh), replicated),
      out_shardings=replicated)
  return Steps(train, evaluate_batch, mesh)


def evaluate(steps: Steps, params: Any, blocks: np.ndarray,
             global_batch_size: int) -> dict[str, float]:
  """Perplexity and accuracy over every block of the split, each counted once."""
  totals = np.zeros(3, np.float64)
  for index, (ids, row_weights) in enumerate(
      input_pipeline.eval_batches(blocks, global_batch_size)):
    ids, row_weights = sharding.shard_batch((ids, row_weights), steps.mesh)
    totals += sharding.to_host(steps.eval(params, ids, row_weights,
                                          np.int32(index * global_batch_size)))
  return metrics_lib.summarize_eval(*totals)


# ----------------------------------------------------------------------------
# The run.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects values that would fail later, with the key and the fix."""
  positive = ('block_size', 'per_device_batch_size', 'grad_accum_steps', 'eval_batch_size',
              'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
              'keep_checkpoints', 'num_proc', 'max_nonfinite_steps', 'fsdp')
  for key in positive:
    if config[key] < 1:
      raise UserError(f'{key}={config[key]} must be at least 1; set --config.{key}')
  masking.check_probability(config.mlm_probability)
  if config.learning_rate <= 0:
    raise UserError(f'learning_rate={config.learning_rate} must be positive')
  if config.num_train_steps == 0 or config.num_train_steps < -1:
    raise UserError(f'num_train_steps={config.num_train_steps} must be positive, or -1 to '
                    'train for num_epochs')
  if config.num_train_steps == -1 and config.num_epochs < 1:
    raise UserError(f'num_epochs={config.num_epochs} must be at least 1')
  model_lib.compute_dtype(config.dtype)
  model_lib.check_implementation(config.model_impl)
  if config.push_to_hub and not config.hub_model_id:
    raise UserError('push_to_hub=True needs --config.hub_model_id=USER/NAME')


def check_workdir_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir!r} cannot be written ({e.strerror}); '
                    'pass a writable --workdir') from None


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


@dataclasses.dataclass
class Run:
  """What a run is made of, once the data, tokenizer and model are ready."""
  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: Any
  model: Any
  blocks: data.Blocks
  global_batch_size: int  # Rows per optimizer step, over all devices and micro-batches.
  eval_batch_size: int
  total_steps: int


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Loads and tokenizes the data and builds the tokenizer and model."""
  validate_config(config)
  texts = data.load_texts(config, _log)
  tokenizer = tokenizer_lib.get_tokenizer(config, workdir, train_texts=texts['train']['text'])
  sharding.sync_hosts('mlm_jax_tokenizer')  # No host reads the saved tokenizer while it is written.
  if jax.process_index() == 0:
    tokenizer_lib.save_tokenizer(tokenizer, workdir)
  model = model_lib.create_model(config, tokenizer)
  model_lib.check_block_size(config.block_size, model.config)
  blocks = data.make_blocks(config, tokenizer, texts, _log)
  devices = jax.device_count()
  global_batch = config.per_device_batch_size * devices * config.grad_accum_steps
  per_epoch = input_pipeline.steps_per_epoch(len(blocks.train), global_batch)
  total = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * per_epoch
  eval_batch = math.ceil(config.eval_batch_size / devices) * devices
  return Run(config, workdir, tokenizer, model, blocks, global_batch, eval_batch, total)


def _restore_or_init(run: Run, manager, state: TrainState) -> TrainState:
  """The newest checkpoint that restores (checked against the config), else `state`.

  A checkpoint that fails to restore (a truncated file, say) is reported by name
  and the one before it is tried.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    where = os.path.join(checkpoint.checkpoint_dir(run.workdir), str(step))
    try:
      _, saved_config = checkpoint.read_metadata(manager, step)
      checkpoint.check_resumable(saved_config, _config_record(run), run.workdir)
      restored, position, _ = checkpoint.restore(manager, step, state)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      aside = checkpoint.set_aside(run.workdir, step) if jax.process_index() == 0 else where
      _log(f'Checkpoint {where} could not be restored ({type(e).__name__}: '
           f'{first_line(e)}); moved it to {aside} and trying the '
           'one before it.')
      continue
    manager.reload()
    _log(f'Resuming from the checkpoint at step {step} (epoch {position["epoch"]}, '
         f'batch {position["batch"]}) in {checkpoint.checkpoint_dir(run.workdir)}')
    return restored
  manager.reload()
  if steps:
    raise UserError(f'no checkpoint in {checkpoint.checkpoint_dir(run.workdir)} could be '
                    'restored (see above); use a new --workdir to start afresh')
  return state


def _config_record(run: Run) -> dict:
  record = run.config.to_dict()
  record['global_batch_size'] = run.global_batch_size
  return record


def _save(run: Run, manager, state: TrainState) -> None:
  """Starts saving `state`; a failure (disk full, say) of this or the previous save is a
  `UserError`, and the newest complete checkpoint stays intact."""
  step = int(sharding.to_host(state.step))
  position = input_pipeline.position_of(step, len(run.blocks.train), run.global_batch_size)
  with _save_errors(run, manager, step):
    checkpoint.save(manager, step, state, dataclasses.asdict(position), _config_record(run))


def _finish_saves(run: Run, manager) -> None:
  with _save_errors(run, manager, manager.latest_step()):
    manager.wait_until_finished()


@contextlib.contextmanager
def _save_errors(run: Run, manager, step: int | None):
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    complete = [s for s in manager.all_steps() if s != step]
    kept = (f'the checkpoint at step {max(complete)} is intact' if complete
            else 'no earlier checkpoint exists')
    raise UserError(
        f'could not write the checkpoint at step {step} in '
        f'{checkpoint.checkpoint_dir(run.workdir)} ({type(e).__name__}: '
        f'{first_line(e)}); {kept}. Free disk space (or fix the '
        'workdir) and rerun the same command to resume') from e


def _prefetch(batches: Iterator[np.ndarray], mesh, size: int = 2) -> Iterator[jax.Array]:
  """Keeps `size` batches in flight to the devices while the current step runs."""
  queue = []
  for batch in batches:
    queue.append(sharding.shard_batch(batch, mesh, batch_axis=1))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def _summary(run: Run, records: list[dict], wall: float, steps_run: int) -> dict:
  evals = [r for r in records if 'eval_perplexity' in r]
  tokens = steps_run * run.global_batch_size * run.config.block_size
  return {
      'steps': run.total_steps, 'steps_this_run': steps_run, 'wall_time_s': wall,
      'tokens_per_s': tokens / wall if wall > 0 else 0.0,
      'eval_loss': evals[-1]['eval_loss'] if evals else float('nan'),
      'perplexity_before': evals[0]['eval_perplexity'] if evals else float('nan'),
      'perplexity_after': evals[-1]['eval_perplexity'] if evals else float('nan'),
      'eval_accuracy': evals[-1]['eval_accuracy'] if evals else float('nan'),
      'checkpoint_dir': checkpoint.checkpoint_dir(run.workdir),
      'export_dir': os.path.join(os.path.abspath(run.workdir), 'export'),
  }


def _print_summary(summary: dict) -> None:
  _log(f'Done: {summary["steps"]} steps ({summary["steps_this_run"]} in this run) in '
       f'{summary["wall_time_s"]:.1f} s, {summary["tokens_per_s"]:,.0f} tokens/s.\n'
       f'  eval loss {summary["eval_loss"]:.4f}, accuracy {summary["eval_accuracy"]:.3f}\n'
       f'  perplexity {summary["perplexity_before"]:.2f} before -> '
       f'{summary["perplexity_after"]:.2f} after training\n'
       f'  checkpoints: {summary["checkpoint_dir"]}\n  export: {summary["export_dir"]}')


def push_to_hub(export_dir: str, repo_id: str) -> None:
  """Uploads the export; a failure is reported, never fatal (everything is saved)."""
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    huggingface_hub.create_repo(repo_id, exist_ok=True)
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=export_dir)
    _log(f'Pushed {export_dir} to https://huggingface.co/{repo_id}')
  except Exception as e:  # pylint: disable=broad-except
    _log(f'push_to_hub failed ({type(e).__name__}: {first_line(e)}); '
         f'the export is saved in {export_dir}: upload it later with '
         f'`huggingface-cli upload {repo_id} {export_dir}`')


class _Loop:
  """The training loop's bookkeeping: logging, evaluation, checkpoints and stop checks."""

  def __init__(self, run: Run, steps: Steps, manager, writer: metrics_lib.MetricsWriter):
    self.run, self.steps, self.manager, self.writer = run, steps, manager, writer
    config = run.config
    self.bar = tqdm.tqdm(total=run.total_steps, disable=jax.process_index() != 0,
                         desc='train', dynamic_ncols=True)
    self.tokens_per_step = run.global_batch_size * config.block_size
    self.interval_start, self.interval_steps = time.time(), 0

  def evaluate(self, state: TrainState) -> None:
    step = int(sharding.to_host(state.step))
    self.writer.write(step, evaluate(self.steps, state.params, self.run.blocks.test,
                                     self.run.eval_batch_size))

  def check_finite(self, step: int, step_metrics: dict) -> None:
    """Stops after `max_nonfinite_steps` consecutive skipped updates."""
    skipped = int(sharding.to_host(step_metrics['nonfinite']))
    if skipped >= self.run.config.max_nonfinite_steps:
      raise UserError(
          f'{skipped} consecutive non-finite losses or gradients, the last at step {step}; '
          f'lower --config.learning_rate or check the data. The last good checkpoint is kept '
          f'in {checkpoint.checkpoint_dir(self.run.workdir)}')

  def log(self, step: int, step_metrics: dict) -> None:
    step_metrics = sharding.to_host(step_metrics)
    elapsed = time.time() - self.interval_start
    step_metrics['tokens_per_s'] = self.interval_steps * self.tokens_per_step / max(elapsed,
                                                                                  1e-9)
    self.interval_start, self.interval_steps = time.time(), 0
    self.writer.write(step, step_metrics)
    self.bar.set_postfix(loss=f'{step_metrics["loss"]:.3f}',
                         lr=f'{step_metrics["learning_rate"]:.2e}',
                         tok_s=f'{step_metrics["tokens_per_s"]:,.0f}')

  def after_step(self, step: int, state: TrainState, step_metrics: dict) -> None:
    """Logs, evaluates and saves as due after `step` (the host's count: reading
    `state.step` would wait for the device and stall the queue of dispatched steps)."""
    config = self.run.config
    last = step == self.run.total_steps
    self.interval_steps += 1
    if step % config.log_every_steps == 0 or last:
      self.log(step, step_metrics)
    if step % config.eval_every_steps == 0 or last:
      self.evaluate(state)
    if step % config.checkpoint_every_steps == 0 or last:
      _save(self.run, self.manager, state)
    self.bar.update(1)

  def stop(self, state: TrainState, stop: preemption.StopRequest) -> None:
    """Saves the state after the step in flight and raises `Stopped`."""
    step = int(sharding.to_host(state.step))
    if self.manager.latest_step() != step:
      _save(self.run, self.manager, state)
    _finish_saves(self.run, self.manager)
    self.writer.flush()
    number = stop.signal_number or signal.SIGTERM
    raise preemption.Stopped(
        f'stopped by {signal.Signals(number).name} at step {step} of {self.run.total_steps}; '
        f'checkpoint saved in {checkpoint.checkpoint_dir(self.run.workdir)}. Resume with the '
        f'same command (same --workdir={self.run.workdir})', 128 + number)

  def close(self) -> None:
    self.bar.close()
    self.writer.close()
    _finish_saves(self.run, self.manager)


def _train(run: Run, steps: Steps, state: TrainState, loop: _Loop) -> TrainState:
  """Runs the steps from `state.step` to the end; returns the final state."""
  start_step = int(sharding.to_host(state.step))
  loop.bar.update(start_step)
  if start_step == 0:
    loop.evaluate(state)
  batches = _prefetch(input_pipeline.train_batches(
      run.blocks.train, run.global_batch_size, run.config.grad_accum_steps, run.config.seed,
      start_step), steps.mesh)
  previous = None
  with preemption.StopRequest() as stop:
    for step in range(start_step + 1, run.total_steps + 1):
      state, step_metrics = steps.train(state, next(batches))
      # Checking the previous step's metrics keeps one step queued on the device.
      if previous is not None:
        loop.check_finite(step - 1, previous)
      previous = step_metrics
      loop.after_step(step, state, step_metrics)
      if stop.requested or loop.manager.reached_preemption(step):
        loop.stop(state, stop)
    if previous is not None:
      loop.check_finite(run.total_steps, previous)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains on `config`, resuming from `workdir` if it has a checkpoint; returns the summary."""
  check_workdir_writable(workdir)
  run = prepare(config, workdir)
  _log(f'{len(run.blocks.train)} train / {len(run.blocks.test)} test blocks of '
       f'{config.block_size} tokens; {jax.device_count()} device(s), global batch '
       f'{run.global_batch_size}; {run.total_steps} steps')

  mesh = sharding.make_mesh(config.fsdp)
  tx, schedule = make_optimizer(config, run.total_steps)
  state, state_shardings = sharding.place_state(
      create_train_state(run.model.params, tx, config.seed), mesh)
  spec = masking.masking_spec(run.tokenizer, config.mlm_probability)
  masked_head = config.masked_lm_head and model_lib.supports_masked_head(run.model)
  apply_fn, head_fn = model_lib.forward_fns(run.model, config.model_impl)
  steps = compile_steps(
      apply_fn, tx, schedule, spec, config.seed, mesh, state_shardings,
      head_fn=head_fn if masked_head else None,
      max_predictions=model_lib.max_predictions(config.block_size, config.mlm_probability))
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
  state = _restore_or_init(run, manager, state)
  start_step = int(sharding.to_host(state.step))
  if start_step >= run.total_steps:
    _log(f'{workdir} holds a finished run (step {start_step} of {run.total_steps}); '
         'nothing to train. Use a new --workdir to train again.')
    return _summary(run, metrics_lib.read_metrics(workdir), 0.0, 0)

  is_main = jax.process_index() == 0
  if is_main:  # What inference needs to rebuild the model around a checkpoint.
    run.model.config.save_pretrained(checkpoint.model_config_dir(workdir))
  start_time = time.time()
  loop = _Loop(run, steps, manager, metrics_lib.MetricsWriter(workdir, enabled=is_main))
  try:
    state = _train(run, steps, state, loop)
  finally:
    loop.close()
  wall = time.time() - start_time

  export_dir = os.path.join(workdir, 'export')
  params = sharding.to_host(state.params)  # Every host takes part in gathering sharded ones.
  if is_main:
    checkpoint.export(run.model, params, run.tokenizer, export_dir)
  summary = _summary(run, metrics_lib.read_metrics(workdir), wall, run.total_steps - start_step)
  _print_summary(summary)
  if config.push_to_hub and is_main:
    push_to_hub(export_dir, config.hub_model_id)
  return summary
