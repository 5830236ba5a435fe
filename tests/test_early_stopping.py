"""The best checkpoint (`keep_best_by`) and early stopping (`early_stopping_patience`).

Guards the count (`early_stopping.Record`: the evaluation at step 0 not counted, only a
strictly lower finite loss improves), and through the real pipeline on the tiny config, at a
learning rate high enough that the eval loss rises after step 2: the run stops at step 6
(two evaluations without improvement) and ends normally, orbax keeps the best checkpoint
(step 2) beside the newest, the export is of the best, the summary names it, a rerun of the
stopped run trains no further (the count comes back from the checkpoint) and one with more
patience trains on; and the one-line errors for a bad setting.
"""

import shutil

import jax
import numpy as np
import pytest

from mlm_jax import checkpoint
from mlm_jax import early_stopping
from mlm_jax import metric_writers
from mlm_jax import train
from mlm_jax import validation
from mlm_jax.errors import UserError
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import load_config

EARLY_STOP_STEP = 6  # The eval losses at steps 2, 4 and 6 were 6.43, 6.87 and 9.89.
BEST_STEP = 2


def early_config(patience: int = 2):
  config = load_config('tiny_test')
  config.learning_rate = 0.3  # High: the eval loss rises after step 2.
  config.num_train_steps, config.eval_every_steps, config.max_eval_blocks = 40, 2, 64
  config.checkpoint_every_steps, config.log_every_steps = 1000, 40
  config.keep_checkpoints = 1  # The newest; the best is kept beside it.
  config.early_stopping_patience = patience
  return config


@pytest.fixture(scope='module')
def early_run(tmp_path_factory):
  """(workdir, summary) of the tiny run with patience 2."""
  workdir = str(tmp_path_factory.mktemp('early') / 'run')
  return workdir, train.train_and_evaluate(early_config(), workdir)


def _params(workdir: str, step: int):
  return checkpoint.restore_params(workdir, step,
                                   jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def _assert_same_tree(a, b) -> None:
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_record_counts_evaluations_since_the_lowest_finite_loss_after_step_zero():
  record = early_stopping.Record()
  assert not record.update(0, 1.0)  # The model before training.
  assert record.update(2, 5.0) and record.update(4, 4.0)
  assert not record.update(6, 4.0)  # Equal is no improvement.
  assert not record.update(8, float('nan'))
  assert (record.best_step, record.best_loss, record.evals_since_best) == (4, 4.0, 2)
  assert record.exhausted(2) and not record.exhausted(3) and not record.exhausted(0)
  assert early_stopping.Record.from_dict(record.to_dict()) == record
  assert early_stopping.Record.from_dict(None) == early_stopping.Record()


def test_the_run_stops_after_patience_evaluations_without_improvement(early_run):
  workdir, summary = early_run
  records = metric_writers.read_metrics(workdir)
  evals = [(r['step'], r['eval_loss']) for r in records if 'eval_loss' in r]
  assert [step for step, _ in evals] == [0, 2, 4, 6]
  assert evals[1][1] < evals[2][1] < evals[3][1]
  assert max(r['step'] for r in records) == EARLY_STOP_STEP
  assert summary['steps'] == EARLY_STOP_STEP and summary['stopped_early']
  assert summary['planned_steps'] == 40


def test_the_best_checkpoint_is_kept_beside_the_newest_and_exported(early_run):
  workdir, _ = early_run
  manager = checkpoint.make_manager(workdir, None, create=False, best_by='eval_loss')
  assert manager.all_steps() == [BEST_STEP, EARLY_STOP_STEP]
  assert manager.best_step() == BEST_STEP
  exported = FlaxAutoModelForMaskedLM.from_pretrained(f'{workdir}/export').params
  _assert_same_tree(exported, _params(workdir, BEST_STEP))
  with pytest.raises(AssertionError):
    _assert_same_tree(exported, _params(workdir, EARLY_STOP_STEP))


def test_the_summary_names_the_best_step_and_its_perplexity(early_run):
  workdir, summary = early_run
  at_best = next(r for r in metric_writers.read_metrics(workdir)
                 if r['step'] == BEST_STEP and 'eval_perplexity' in r)
  assert summary['best_step'] == BEST_STEP
  assert summary['best_perplexity'] == at_best['eval_perplexity']


def test_a_rerun_of_a_stopped_run_trains_no_further(early_run, tmp_path, capsys):
  """The count comes back from the checkpoint: a fresh count would train on from step 6."""
  workdir = tmp_path / 'run'
  shutil.copytree(early_run[0], workdir)
  summary = train.train_and_evaluate(early_config(), str(workdir))
  assert summary['steps_this_run'] == 0 and summary['best_step'] == BEST_STEP
  assert 'stopped early); nothing to train' in capsys.readouterr().out
  assert checkpoint.make_manager(str(workdir), None, create=False).latest_step() == \
      EARLY_STOP_STEP


def test_more_patience_on_resume_trains_on_from_the_saved_count(early_run, tmp_path):
  """Patience 3 after the count of 2: the eval at step 8 (the loss falls again there) is
  the third; it improves on step 2's, so the run goes on past it."""
  workdir = tmp_path / 'run'
  shutil.copytree(early_run[0], workdir)
  config = early_config(patience=3)
  config.num_train_steps = 10
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['steps_this_run'] == 4 and not summary['stopped_early']
  cursor, _ = checkpoint.read_metadata(
      checkpoint.make_manager(str(workdir), None, create=False), 10)
  assert cursor['early_stopping'] == {'best_step': 10, 'best_loss': pytest.approx(6.02, abs=0.01),
                                      'evals_since_best': 0}


@pytest.mark.parametrize('key, value, message', [
    ('keep_best_by', 'accuracy', "keep_best_by='accuracy' is not an eval loss"),
    ('early_stopping_patience', -1, 'early_stopping_patience=-1 must not be negative'),
])
def test_a_bad_setting_is_one_line(key, value, message):
  config = load_config('tiny_test')
  config[key] = value
  with pytest.raises(UserError, match=message):
    validation.validate_config(config)


def test_patience_without_a_loss_to_watch_is_refused():
  config = load_config('tiny_test')
  config.keep_best_by, config.early_stopping_patience = '', 3
  with pytest.raises(UserError, match='needs a loss to watch'):
    validation.validate_config(config)
