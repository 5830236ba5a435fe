"""Memory (`mlm_jax.memory`): eval and fill-mask batches sized to the memory free, checked on
the compiled program before it runs, and running out of memory as one line naming what to
lower."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlm_jax import cli
from mlm_jax import infer
from mlm_jax import masking
from mlm_jax import memory
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax.errors import UserError
from tests import tiny_models
from tests.conftest import traces_of

_VOCAB, _LENGTH = 37, 256


def _square_logits(ids, params, train, segment_ids=None):
  """Logits through a [length, length] product per row: memory quadratic in length, as dense
  attention's."""
  del train, segment_ids
  embedded = params['table'][ids]  # [rows, length, vocab]
  scores = jax.nn.softmax(jnp.einsum('btv,bsv->bts', embedded, embedded), axis=-1)

  class Output:
    logits = jnp.einsum('bts,bsv->btv', scores, embedded)
  return Output()


def _steps():
  spec = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=_VOCAB)
  schedule = optax.constant_schedule(1.0)
  return steps_lib.compile_steps(_square_logits, optax.sgd(schedule), schedule, spec, seed=0,
                                 mesh=sharding.make_mesh())


_PARAMS = {'table': jnp.asarray(np.random.default_rng(0).normal(0, 1, (_VOCAB, _VOCAB)),
                                jnp.float32)}


def _need(steps, rows: int) -> int:
  ids = jax.ShapeDtypeStruct((rows, _LENGTH), jnp.int32)
  weights = jax.ShapeDtypeStruct((rows,), jnp.float32)
  return memory.needed_bytes(steps.evaluate_batch.lower(_PARAMS, ids, weights,
                                                        np.int32(0)).compile())


def test_an_eval_batch_too_large_for_the_free_memory_evaluates_fewer_rows_and_says_so():
  steps = _steps()
  available = int(_need(steps, 5) / memory.USABLE_FRACTION)  # Room for 5 rows, not 6.
  said = []
  rows = steps_lib.eval_rows_that_fit(steps, _PARAMS, 64, _LENGTH, said.append, available)
  assert 1 <= rows < 64
  assert _need(steps, rows) <= memory.USABLE_FRACTION * available
  assert len(said) == 1 and 'eval_batch_size=64' in said[0] and f'{rows} rows' in said[0]


def test_an_eval_batch_that_fits_is_kept_and_nothing_is_said():
  steps = _steps()
  said = []
  available = int(_need(steps, 64) / memory.USABLE_FRACTION) + 1
  assert steps_lib.eval_rows_that_fit(steps, _PARAMS, 64, _LENGTH, said.append, available) == 64
  assert not said


def test_the_eval_step_sized_ahead_is_the_one_the_evaluation_runs():
  """Sizing the eval batch compiles the eval step for batches placed as the evaluation places
  them: the evaluation then traces (and compiles) nothing more."""
  steps = _steps()
  blocks = np.random.default_rng(0).integers(5, _VOCAB, (8, _LENGTH)).astype(np.int32)
  with traces_of('eval_step') as traces:
    rows = steps_lib.eval_rows_that_fit(steps, _PARAMS, 64, _LENGTH, print, blocks=8)
    ahead = len(traces)
    steps_lib.evaluate(steps, _PARAMS, blocks, rows)
  assert rows == 8 and ahead == 1 and len(traces) == 1


def test_a_single_row_too_large_is_one_line_naming_block_size():
  steps = _steps()
  with pytest.raises(UserError, match=r'evaluating 1 row\(s\) of 256 tokens needs .* more '
                     r'than the .* free; lower --config.block_size'):
    steps_lib.eval_rows_that_fit(steps, _PARAMS, 64, _LENGTH, print, _need(steps, 1) // 2)


def test_a_fill_mask_batch_too_large_for_the_free_memory_runs_in_parts_alike(tmp_path,
                                                                             monkeypatch):
  predictor = infer.load_predictor(tiny_models.save_modernbert(str(tmp_path)))
  texts = [f'the sky is [MASK] on day {day} of the year.' for day in range(8)]
  whole = infer.fill_mask(predictor, texts, top_k=3)
  # Every batch checked, and no room for more than one row.
  monkeypatch.setattr(infer, 'CHECKED_FROM_TOKENS', 0)
  monkeypatch.setattr(memory, 'free_bytes', lambda device: 1)
  forward, rows_run = predictor.top_k_at, []

  class CountingRows:  # The compiled forward, noting the rows of each call.
    lower = forward.lower

    def __call__(self, params, ids, *args, **kwargs):
      rows_run.append(len(ids))
      return forward(params, ids, *args, **kwargs)
  predictor.top_k_at = CountingRows()
  parts = infer.fill_mask(predictor, texts, top_k=3)
  assert rows_run == [1] * len(texts)
  for [a], [b] in zip(whole, parts):
    assert [f['token'] for f in a] == [f['token'] for f in b]
    np.testing.assert_allclose([f['score'] for f in a], [f['score'] for f in b], rtol=1e-5)


def _allocate_too_much() -> None:
  """A real allocation that fails: a [300000, 300000] float32 temporary, 360 GB."""
  x = jnp.ones((300_000,))
  jax.block_until_ready(jax.jit(lambda x: jnp.sort(x[:, None] * x[None, :], axis=1)[:, 0])(x))


def test_running_out_of_memory_is_one_line_naming_what_to_lower(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.run_user_facing(_allocate_too_much)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith('error: out of memory (RESOURCE_EXHAUSTED')
  for key in ('per_device_batch_size', 'eval_batch_size', 'block_size', 'remat_policy=full'):
    assert f'--config.{key}' in lines[0]
  assert 'checkpoints already saved are kept' in lines[0]


def test_fill_mask_out_of_memory_names_its_batch_size(capsys):
  with pytest.raises(SystemExit):
    cli.run_user_facing(_allocate_too_much, out_of_memory=memory.INFER_ADVICE)
  assert capsys.readouterr().err.strip().endswith('lower --batch_size, or shorten the texts')


def test_other_runtime_errors_keep_their_traceback():
  def bug():
    raise RuntimeError('INTERNAL: something else')
  with pytest.raises(RuntimeError, match='INTERNAL'):
    cli.run_user_facing(bug)


def test_the_free_memory_of_this_host_is_known():
  free = memory.free_bytes(jax.devices()[0])
  assert free is None if not sys.platform.startswith('linux') else 0 < free
