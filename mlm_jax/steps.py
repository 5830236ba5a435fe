"""The train state and the compiled train and eval steps.

The train state is one pytree; the train and eval steps are pure functions of it,
compiled with `jax.jit` over a (`data`, `fsdp`) mesh (see `sharding.py`). Masking runs inside
the step on the device; every random draw derives from (seed, step), so a resumed
run continues exactly where the interrupted one was.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from mlm_jax.data import input_pipeline
from mlm_jax import compiler_options
from mlm_jax import host_memory
from mlm_jax import masking
from mlm_jax import memory
from mlm_jax import metrics as metrics_lib
from mlm_jax import model as model_lib
from mlm_jax import optim
from mlm_jax import sharding
from mlm_jax import threefry
from mlm_jax.errors import UserError

EVAL_STREAM = 1  # Eval masking draws from fold_in(PRNGKey(seed), EVAL_STREAM), fixed.


class TrainState(struct.PyTreeNode):
  """Everything that changes during training; checkpointed whole."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # Fixed; per-step keys are fold_in(rng, step).
  nonfinite: jax.Array  # Consecutive steps skipped for a non-finite loss or gradient.


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed), nonfinite=jnp.zeros((), jnp.int32))


def init_train_state(model, tx: optax.GradientTransformation, seed: int,
                     mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
  """The train state, born sharded over `mesh`; returns (state, its shardings).

  One jitted function with `out_shardings` creates it (as flax's lm1b and big_vision
  do), so each device only ever holds its shard of the parameters and Adam moments: a
  model built without parameters (`_do_init=False`) is initialised inside it, and a
  pretrained one's weights are fetched to the host and sent shard by shard.
  """
  if model._is_initialized:  # pylint: disable=protected-access  (pretrained weights)
    create = lambda params: create_train_state(params, tx, seed)
    args = (jax.device_get(model.params),)
  else:  # Initialised inside the jit, hence straight into its shards.
    create = lambda: create_train_state(model_lib.initial_params(model), tx, seed)
    args = ()
  shardings = sharding.state_sharding(jax.eval_shape(create, *args), mesh)
  in_shardings = (shardings.params,) if args else ()
  return jax.jit(create, in_shardings=in_shardings, out_shardings=shardings)(*args), shardings


def mask_micro_batches(rng: jax.Array, ids: jax.Array, spec: masking.MaskingSpec):
  """Masks [micro_batches, rows, length] ids; row r of micro-batch a is global row a*rows+r."""
  rows = ids.shape[1]
  special = masking.special_tokens_mask(ids, spec.special_ids)
  return jax.vmap(lambda a, i, s: masking.mask_tokens(rng, i, s, spec, first_row=a * rows))(
      jnp.arange(ids.shape[0]), ids, special)


def document_ids(ids: jax.Array, sep_id: int) -> jax.Array:
  """Each token's document within its row, for `attention_scope='document'`: the model
  attends within equal ids (`segment_ids`). A block is cut from texts concatenated as the
  tokenizer wraps each (RoBERTa `<s> ... </s>`, BERT `[CLS] ... [SEP]`), so a document ends
  with, and owns, the `sep_id` that closes it; the next one starts after it. Computed in
  the step: the prepared blocks stay as they are.

  Absolute positions do not restart at each document (BERT and RoBERTa number a block's
  tokens straight through): RoBERTa's FULL-SENTENCES pretraining packed documents with
  continuing positions, so pretrained position embeddings have seen offsets past 0.
  """
  is_sep = (ids == sep_id).astype(jnp.int32)
  return jnp.cumsum(is_sep, axis=-1) - is_sep


def micro_batch_predictions(rows: int, length: int, probability: float,
                            row_bound: int) -> int:
  """Tokens that `rows` rows of `length` pooled predict with the masked-only head, from the
  bound of one row (`model.max_predictions`): their mean plus sqrt(rows) times the row's
  margin over its mean, as a sum of independent rows spreads by sqrt(rows) times one row's
  spread.

  The pool then overflows less often than a row overflows its own bound (its count is
  closer to normal than a row's), and the head runs on 2.3x fewer tokens than with a bound
  per row at 32 x 64 tokens (423 instead of 960; the exact 1e-9 bound of the pool is 408).
  """
  mean = length * probability
  pooled = math.ceil(rows * mean + math.sqrt(rows) * (row_bound - mean))
  return max(1, min(rows * row_bound, pooled))


def train_step(state: TrainState, ids: jax.Array, *, apply_fn: Callable,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               spec: masking.MaskingSpec, head_fn: Callable | None = None,
               max_predictions: int = 0,
               prediction_groups: int = 1,
               sep_id: int | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over a [grad_accum_steps, rows, length] batch of token ids.

  The loss is the mean cross-entropy over all masked tokens of all micro-batches,
  so k accumulated micro-batches give the gradient of one batch k times larger.
  With `head_fn` (see `model.head_fn`) the vocabulary head runs only on the masked
  tokens: those of each of `prediction_groups` groups of a micro-batch's rows (one per
  device, so that each device's head runs on its own rows) pooled, at most
  `micro_batch_predictions(rows in the group, ..., max_predictions)` of them. With `sep_id`
  attention stays within each document (`document_ids`). A non-finite loss or gradient skips
  the update and is counted.

  Returns the new state and the step's metrics: `sums` (a `metrics.TrainSums`, zero for a
  skipped step, to be added up over a log interval), `nonfinite` (consecutive skipped
  steps) and `learning_rate` (the rate this update applied).
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  mask_rng, dropout_rng = jax.random.split(step_rng)
  inputs, labels, weights = mask_micro_batches(mask_rng, ids, spec)
  masked = weights.sum()
  if head_fn is None:
    predict_at = jnp.zeros(ids.shape[:2] + (0,), jnp.int32)  # Unused: every token.
  else:  # Each device's masked tokens first (weight 1 sorts before 0), as flat indices.
    pooled = lambda x: x.reshape(x.shape[0], prediction_groups, -1)
    bound = micro_batch_predictions(ids.shape[1] // prediction_groups, ids.shape[2],
                                    spec.probability, max_predictions)
    predict_at = jax.lax.top_k(pooled(weights), bound)[1]
    labels = jnp.take_along_axis(pooled(labels), predict_at, axis=-1)
    weights = jnp.take_along_axis(pooled(weights), predict_at, axis=-1)
  total = jnp.maximum(weights.sum(), 1.0)
  segments = None if sep_id is None else document_ids(ids, sep_id)

  def logits_of(params, micro_inputs, micro_predict_at, micro_segments, rng):
    if head_fn is None:
      return apply_fn(micro_inputs, params=params, train=True, dropout_rng=rng,
                      segment_ids=micro_segments).logits
    return head_fn(micro_inputs, micro_predict_at, params, True, rng,
                   segment_ids=micro_segments)

  def micro_step(carry, micro):
    index, micro_inputs, micro_predict_at, micro_labels, micro_weights, micro_segments = micro

    def loss_fn(params):
      logits = logits_of(params, micro_inputs, micro_predict_at, micro_segments,
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
      (jnp.arange(ids.shape[0]), inputs, predict_at, labels, weights, segments))
  loss, grad_norm = loss_sum / total, optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state = optim.update_if_finite(tx, grads, state.opt_state, state.params, finite)
  keep_if_finite = lambda new, old: jax.tree_util.tree_map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
  sums = keep_if_finite(metrics_lib.TrainSums(
      loss_sum=loss_sum, correct=correct, predicted_tokens=weights.sum(), masked_tokens=masked,
      grad_norm=grad_norm, updates=jnp.ones(())), metrics_lib.TrainSums.zeros())
  return new_state, {'sums': sums, 'nonfinite': new_state.nonfinite,
                     'learning_rate': optim.applied_learning_rate(schedule, state.opt_state)}


def eval_step(params: Any, ids: jax.Array, row_weights: jax.Array, first_row: jax.Array, *,
              apply_fn: Callable, spec: masking.MaskingSpec, rng: jax.Array,
              sep_id: int | None = None) -> jax.Array:
  """[loss sum, correct, masked count] of one eval batch under the fixed eval masking
  (attention within each document with `sep_id`, as `train_step`)."""
  special = masking.special_tokens_mask(ids, spec.special_ids)
  inputs, labels, weights = masking.mask_tokens(rng, ids, special, spec, first_row=first_row)
  weights = weights * row_weights[:, None]
  segments = None if sep_id is None else document_ids(ids, sep_id)
  logits = apply_fn(inputs, params=params, train=False, segment_ids=segments).logits
  loss_sum, correct = metrics_lib.masked_lm_sums(logits, labels, weights)
  return jnp.stack([loss_sum, correct, weights.sum()])


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled steps of a run, and the layout they expect."""
  train: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
  evaluate_batch: Callable[..., jax.Array]  # See `eval_step`.
  mesh: jax.sharding.Mesh


def compile_steps(apply_fn: Callable, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, spec: masking.MaskingSpec, seed: int,
                  mesh: jax.sharding.Mesh, state_shardings: Any = None,
                  head_fn: Callable | None = None, max_predictions: int = 0,
                  sep_id: int | None = None) -> Steps:
  """jit the steps over `mesh`: the state donated, batches sharded over every device.

  `state_shardings` (a TrainState of shardings, see `sharding.state_sharding`)
  defaults to replicated. `head_fn` and `max_predictions` select the masked-only
  vocabulary head for training; evaluation always scores every masked token. `sep_id`
  (see `run.document_separator`) keeps attention within documents in both steps.
  """
  threefry.install()  # The same random bits, without a rolled loop per draw on CPU.
  host_memory.keep_freed_memory_on(mesh.devices.flat[0].platform)  # No fresh pages per step.
  replicated = sharding.replicated(mesh)
  options = compiler_options.for_mesh(mesh)
  remat = getattr(apply_fn, 'remat_policy', 'none') != 'none'  # A model's; see layers.py.
  family = getattr(getattr(apply_fn, 'config', None), 'model_type', None)
  if state_shardings is None:
    state_shardings = replicated
    params_shardings = replicated
  else:
    params_shardings = state_shardings.params
  train = jax.jit(
      functools.partial(train_step, apply_fn=apply_fn, tx=tx, schedule=schedule, spec=spec,
                        head_fn=head_fn, max_predictions=max_predictions,
                        prediction_groups=mesh.size, sep_id=sep_id),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh, batch_axis=1)),
      out_shardings=(state_shardings, replicated), donate_argnums=0,
      compiler_options=compiler_options.for_mesh(mesh, saving_memory=remat, family=family))
  eval_rng = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_STREAM)
  evaluate_batch = jax.jit(
      functools.partial(eval_step, apply_fn=apply_fn, spec=spec, rng=eval_rng, sep_id=sep_id),
      in_shardings=(params_shardings, sharding.batch_sharding(mesh),
                    sharding.batch_sharding(mesh), replicated),
      out_shardings=replicated, compiler_options=options)
  return Steps(train, evaluate_batch, mesh)


def fit_host_to_train_step(steps: Steps, state: TrainState, batch_shape: tuple[int, ...],
                           log: Callable[[str], None]) -> None:
  """Compiles the train step for `batch_shape` ([micro-batches, global rows, length]) ahead
  of its first call (jit's cache keeps the program for it) and, on the CPU, fits the C
  allocator's policy to its temporaries (`host_memory.fit_to_step`)."""
  platform = steps.mesh.devices.flat[0].platform
  if platform != 'cpu':
    return
  batch = jax.ShapeDtypeStruct(batch_shape, jnp.int32,
                               sharding=sharding.batch_sharding(steps.mesh, batch_axis=1))
  stats = steps.train.lower(state, batch).compile().memory_analysis()
  if stats is not None and host_memory.fit_to_step(platform, stats.temp_size_in_bytes):
    log(f'The train step\'s {memory.gigabytes(stats.temp_size_in_bytes)} of temporaries get '
        'pages of their own each step (a kept heap can come to hold them twice)')


def eval_rows_that_fit(steps: Steps, params: Any, rows: int, length: int,
                       log: Callable[[str], None], available: int | None = None,
                       blocks: int | None = None) -> int:
  """The rows of an eval batch (`rows`, the configured `eval_batch_size`, or fewer) whose
  compiled eval step fits the memory free on the devices (`available` bytes per device,
  default `memory.free_bytes`), said once in the log where they are fewer; no more than
  the `blocks` evaluated need (rounded up to the devices). The figures do not change: each
  row's masks follow from its index among the evaluated rows. Every host takes the fewest
  rows any host can hold. One row that does not fit is a `UserError`."""
  if blocks:
    rows = min(rows, math.ceil(blocks / steps.mesh.size) * steps.mesh.size)
  # Placed as `shard_batch` places a batch, so that the first evaluation reuses the program.
  rows_sharding = sharding.batch_sharding(steps.mesh)
  def need(batch_rows: int) -> int:
    ids = jax.ShapeDtypeStruct((batch_rows, length), jnp.int32, sharding=rows_sharding)
    row_weights = jax.ShapeDtypeStruct((batch_rows,), jnp.float32, sharding=rows_sharding)
    return memory.needed_bytes(
        steps.evaluate_batch.lower(params, ids, row_weights, np.int32(0)).compile())
  if available is None:
    available = memory.free_bytes(steps.mesh.devices.flat[0])
  fitted, needed = memory.rows_that_fit(need, rows, steps.mesh.size, available)
  fitted = int(sharding.gather_hosts(np.int32(fitted)).min())
  where = f'{steps.mesh.devices.flat[0].platform} device'
  if available is not None and needed > available:
    raise UserError(f'evaluating {fitted} row(s) of {length} tokens needs '
                    f'{memory.gigabytes(needed)} per {where}, more than the '
                    f'{memory.gigabytes(available)} free; lower --config.block_size')
  if fitted < rows:
    log(f'eval_batch_size={rows} at {length} tokens a row needs more than the '
        f'{memory.gigabytes(available)} free per {where}: evaluating {fitted} rows at a time '
        '(the same figures)')
  return fitted


def _eval_totals(steps: Steps, params: Any, blocks: np.ndarray, global_batch_size: int,
                 max_blocks: int, seed: int) -> np.ndarray:
  """(loss sum, correct, masked tokens) over the evaluated blocks."""
  totals = np.zeros(3, np.float64)
  for index, (ids, row_weights) in enumerate(
      input_pipeline.eval_batches(blocks, global_batch_size, max_blocks, seed)):
    ids, row_weights = sharding.shard_batch((ids, row_weights), steps.mesh)
    totals += sharding.to_host(steps.evaluate_batch(params, ids, row_weights,
                                                    np.int32(index * global_batch_size)))
  return totals


def evaluate(steps: Steps, params: Any, blocks: np.ndarray, global_batch_size: int,
             max_blocks: int = 0, seed: int = 0) -> dict[str, float]:
  """Perplexity and accuracy over the evaluated blocks (all, or a fixed seeded
  `max_blocks` of them; see `input_pipeline.eval_batches`), each counted once."""
  return metrics_lib.summarize_eval(
      *_eval_totals(steps, params, blocks, global_batch_size, max_blocks, seed))


def evaluate_sources(steps: Steps, params: Any, sources, global_batch_size: int,
                     max_blocks: int = 0, seed: int = 0) -> dict[str, float]:
  """`evaluate` of each source's test blocks (`mixture.SourceBlocks`, `max_blocks` of each),
  named `eval/NAME/...`, and the overall figures over all of them, as one split's. A run of
  one unnamed source gets the overall figures only, as `evaluate`'s."""
  totals, figures = np.zeros(3, np.float64), {}
  for source in sources:
    own = _eval_totals(steps, params, source.blocks.test, global_batch_size, max_blocks, seed)
    totals += own
    if source.name:
      figures.update(metrics_lib.source_figures(source.name, metrics_lib.summarize_eval(*own)))
  return {**metrics_lib.summarize_eval(*totals), **figures}
