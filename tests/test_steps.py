"""The compiled train and eval steps (`mlm_jax.steps`), on the tiny model with real libraries.

Guards what one step computes: its gradients (compared through SGD with a non-zero rate,
where the update is the gradient; Adam would hide a gradient-scale error and a warmup
rate of 0 would hide everything), gradient accumulation, the masked-only head against the
full head, the skipped non-finite step and the rate it logs,
the interval sums, and the eval's token weighting, padding and fixed masking.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlm_jax import masking
from mlm_jax import metrics
from mlm_jax import model as model_lib
from mlm_jax import optim
from mlm_jax import run as run_lib
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from tests.conftest import load_config, traces_of


def _prepare(tmp_path_factory, dropout: float):
  config = load_config('tiny_test')
  config.model_config.hidden_dropout_prob = dropout
  config.model_config.attention_probs_dropout_prob = dropout
  config.cache_dir = str(tmp_path_factory.mktemp('cache'))
  return run_lib.prepare(config, str(tmp_path_factory.mktemp('workdir')))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """The tiny config prepared, without dropout (whose draws follow the micro-batch layout)."""
  return _prepare(tmp_path_factory, dropout=0.0)


@pytest.fixture(scope='module')
def dropout_run(tmp_path_factory):
  """With dropout on: the paths compared with it draw the same dropout masks."""
  return _prepare(tmp_path_factory, dropout=0.1)


def _sgd_update(run, ids, masked_head=False, schedule=None, state=None):
  """(parameters before minus after, metrics) of one plain-SGD step: with a constant rate
  of 1 that difference is the gradient itself."""
  schedule = schedule or optax.constant_schedule(1.0)
  tx = optax.sgd(schedule)
  steps = steps_lib.compile_steps(
      run.model, tx, schedule, masking.masking_spec(run.tokenizer, 0.15), run.config.seed,
      sharding.make_mesh(), head_fn=model_lib.head_fn(run.model) if masked_head else None,
      max_predictions=model_lib.max_predictions(run.config.block_size, 0.15))
  if state is None:
    params = jax.tree_util.tree_map(jnp.copy, model_lib.initial_params(run.model))  # The step donates its state.
    state = steps_lib.create_train_state(params, tx, run.config.seed)
  before = jax.tree_util.tree_map(np.asarray, state.params)
  new_state, step_metrics = steps.train(state, jnp.asarray(ids))
  return jax.tree_util.tree_map(lambda b, a: b - np.asarray(a), before, new_state.params), \
      step_metrics


def _assert_same_gradients(grads, expected, params):
  """Equal up to float32 rounding, leaf by leaf: of the reductions (relative to the leaf's
  largest entry) and of the update itself (one ulp of the leaf's largest parameter).

  The attention key biases are left out: their true gradient is zero (softmax ignores a
  shift shared by all keys), so what they get is rounding noise of any size.
  """
  flat, expected_flat = (jax.tree_util.tree_leaves_with_path(g) for g in (grads, expected))
  assert any(np.abs(e).max() > 0 for _, e in expected_flat)
  for (path, g), (_, e), p in zip(flat, expected_flat, jax.tree_util.tree_leaves(params)):
    if jax.tree_util.keystr(path).endswith("['key']['bias']"):
      continue
    atol = 1e-5 * np.abs(e).max() + 2 * np.spacing(np.abs(np.asarray(p)).max())
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


def _blocks(run, rows=8):
  return np.asarray(run.blocks.train[:rows])


def test_gradient_accumulation_equals_one_batch_k_times_larger(run):
  blocks = _blocks(run)
  whole, whole_metrics = _sgd_update(run, blocks.reshape(1, 8, -1))
  accumulated, accumulated_metrics = _sgd_update(run, blocks.reshape(4, 2, -1))
  _assert_same_gradients(accumulated, whole, model_lib.initial_params(run.model))
  assert metrics.summarize_train(accumulated_metrics['sums'], 1) == pytest.approx(
      metrics.summarize_train(whole_metrics['sums'], 1), rel=1e-5)


def test_masked_only_head_gives_the_full_heads_gradients(dropout_run):
  run = dropout_run
  masked, masked_metrics = _sgd_update(run, _blocks(run)[None], masked_head=True)
  full, full_metrics = _sgd_update(run, _blocks(run)[None], masked_head=False)
  _assert_same_gradients(masked, full, model_lib.initial_params(run.model))
  # The tied word embedding gets the head's gradient too, not the input side's alone.
  tied = masked['roberta']['embeddings']['word_embeddings']['embedding']
  assert np.abs(tied).max() > 0
  assert metrics.summarize_train(masked_metrics['sums'], 1)['loss'] == pytest.approx(
      metrics.summarize_train(full_metrics['sums'], 1)['loss'], rel=1e-5)


def test_masked_tokens_beyond_max_predictions_are_counted_as_dropped(run):
  # A row of 32 tokens with 15% masking exceeds max_predictions (14) with probability
  # ~1e-10; at 90% masking almost every row does.
  schedule = optax.constant_schedule(1.0)
  tx = optax.sgd(schedule)
  steps = steps_lib.compile_steps(
      run.model, tx, schedule, masking.masking_spec(run.tokenizer, 0.9), run.config.seed,
      sharding.make_mesh(), head_fn=model_lib.head_fn(run.model), max_predictions=4)
  state = steps_lib.create_train_state(jax.tree_util.tree_map(jnp.copy, model_lib.initial_params(run.model)), tx,
                                       run.config.seed)
  _, step_metrics = steps.train(state, jnp.asarray(_blocks(run))[None])
  summary = metrics.summarize_train(step_metrics['sums'], 1)
  assert summary['masked_tokens'] > 8 * 4  # About 0.9 * 30 a row.
  assert summary['dropped_masked_tokens'] == summary['masked_tokens'] - 8 * 4


def test_max_predictions_bounds_the_overflow_probability_below_1e_9():
  binom = pytest.importorskip('scipy.stats').binom
  for length in (16, 32, 64, 128, 512):
    k = model_lib.max_predictions(length, 0.15)
    assert binom.sf(k, length, 0.15) < 1e-9 <= binom.sf(k - 1, length, 0.15), length


def test_non_finite_step_is_skipped_and_the_logged_rate_is_the_applied_one(run):
  """The schedule reads the optimizer's count, which a skipped step does not advance."""
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  tx = optax.sgd(schedule)
  params = jax.tree_util.tree_map(jnp.copy, model_lib.initial_params(run.model))
  state = steps_lib.create_train_state(params, tx, run.config.seed)
  nan_state = state.replace(params=jax.tree_util.tree_map(lambda x: x * jnp.nan, params))
  _, skipped = _sgd_update(run, _blocks(run)[None], schedule=schedule, state=nan_state)
  assert int(skipped['nonfinite']) == 1
  assert metrics.summarize_train(skipped['sums'], 1)['skipped_steps'] == 1

  # Three steps were skipped before this one: state.step is 3, the optimizer's count 0.
  params = jax.tree_util.tree_map(jnp.copy, model_lib.initial_params(run.model))
  state = steps_lib.create_train_state(params, tx, run.config.seed).replace(
      step=jnp.asarray(3, jnp.int32))
  update, applied = _sgd_update(run, _blocks(run)[None], schedule=schedule, state=state)
  assert float(applied['learning_rate']) == 1.0  # schedule(0), not schedule(3) = 0.7.
  assert int(applied['nonfinite']) == 0
  # Rate 1 was what the update applied: the same update as a constant rate of 1 makes.
  constant = optax.constant_schedule(1.0)
  state = steps_lib.create_train_state(jax.tree_util.tree_map(jnp.copy, model_lib.initial_params(run.model)),
                                       optax.sgd(constant), run.config.seed)
  gradient, _ = _sgd_update(run, _blocks(run)[None], schedule=constant,
                            state=state.replace(step=jnp.asarray(3, jnp.int32)))
  _assert_same_gradients(update, gradient, model_lib.initial_params(run.model))


def test_the_train_step_compiled_ahead_for_the_host_is_the_one_the_loop_runs(run):
  """`fit_host_to_train_step` compiles the train step for the loop's batch (2 micro-batches
  here, placed as `shard_batch(..., batch_axis=1)` places them) before the first step: that
  step then compiles nothing. (A batch described with another shape, dtype or placement
  compiles the step twice, which at 8,192 tokens of ModernBERT-base is minutes.)"""
  tx, schedule = optim.make_optimizer(run.config, total_steps=10)  # As training builds it.
  mesh = sharding.make_mesh()
  state, state_shardings = steps_lib.init_train_state(run.model, tx, run.config.seed, mesh)
  steps = steps_lib.compile_steps(run.model, tx, schedule, run.spec, run.config.seed, mesh,
                                  state_shardings)
  batch = _blocks(run).reshape(2, 4, -1).astype(np.int32)  # As the input pipeline gives it.
  with traces_of('train_step') as traces:
    steps_lib.fit_host_to_train_step(steps, state, batch.shape, print)
    ahead = len(traces)
    steps.train(state, sharding.shard_batch(batch, mesh, batch_axis=1))
  assert ahead == 1 and len(traces) == 1


def test_summarize_train_weighs_every_token_of_the_interval():
  step = lambda loss_sum, tokens: metrics.TrainSums(
      loss_sum=jnp.float32(loss_sum), correct=jnp.float32(tokens / 2),
      predicted_tokens=jnp.float32(tokens), masked_tokens=jnp.float32(tokens + 1),
      grad_norm=jnp.float32(2.0), updates=jnp.float32(1.0))
  interval = jax.tree_util.tree_map(jnp.add, step(10.0, 10), step(90.0, 30))
  summary = metrics.summarize_train(interval, steps=3)  # One more step was skipped.
  assert summary['loss'] == pytest.approx(100 / 40)  # Not the mean of 1.0 and 3.0.
  assert summary['accuracy'] == pytest.approx(0.5)
  assert summary['grad_norm'] == pytest.approx(2.0)
  assert summary['dropped_masked_tokens'] == 2 and summary['skipped_steps'] == 1


# ----------------------------------------------------------------------------
# Evaluation.

_VOCAB = 37


def _token_logits(ids, params, train, segment_ids=None):
  """A model whose logits depend on the input token: losses differ from token to token."""
  del train, segment_ids

  class Output:
    logits = params['table'][ids]
  return Output()


def _evaluate(batch_size: int, seed: int = 0) -> dict:
  spec = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=_VOCAB)
  data_rng = np.random.default_rng(0)
  blocks = data_rng.integers(5, _VOCAB, (10, 16)).astype(np.int32)
  table = jnp.asarray(data_rng.normal(0, 2, (_VOCAB, _VOCAB)), jnp.float32)
  schedule = optax.constant_schedule(1.0)
  steps = steps_lib.compile_steps(_token_logits, optax.sgd(schedule), schedule, spec, seed=seed,
                                  mesh=sharding.make_mesh())
  return steps_lib.evaluate(steps, {'table': table}, blocks, batch_size)


@pytest.mark.parametrize('batch_size', [3, 4, 7, 16])
def test_eval_is_token_weighted_whatever_the_batching(batch_size):
  """One batch of all 10 blocks has no padding and no mean of means to get wrong."""
  whole = _evaluate(10)
  batched = _evaluate(batch_size)
  assert batched['eval_masked_tokens'] == whole['eval_masked_tokens']
  assert batched['eval_loss'] == pytest.approx(whole['eval_loss'], rel=1e-6)
  assert batched['eval_accuracy'] == pytest.approx(whole['eval_accuracy'], rel=1e-6)


def test_eval_masking_is_fixed_by_the_seed():
  """Two compilations agree (the eval key is derived, not drawn); another seed masks anew."""
  assert _evaluate(4) == _evaluate(4)
  assert _evaluate(4, seed=1)['eval_masked_tokens'] != _evaluate(4)['eval_masked_tokens']
