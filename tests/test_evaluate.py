"""Evaluation without training (`python -m mlm_jax.evaluate`, `evaluation.evaluate_model`).

Guards that a model's figures are exactly those training recorded (the same test blocks,
eval masks and eval step): a workdir's latest and earlier checkpoints and its export; the
entry point's printed line and JSON; that the config's attention scope applies; and
the pseudo-perplexity of `--metric=pll` against a plain loop; one-line errors for a model that is not there, a workdir without a checkpoint and a
block_size beyond the model's positions (refused before any data is prepared)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_jax import evaluation
from mlm_jax import infer
from mlm_jax import metric_writers
from mlm_jax import run as run_lib
from mlm_jax.data import preparation
from mlm_jax.errors import UserError
from tests.conftest import ROOT

_FIGURES = ('eval_loss', 'eval_perplexity', 'eval_accuracy', 'eval_masked_tokens')


@pytest.fixture(scope='module')
def recorded(tiny_run):
  """(config, workdir, summary, the eval records by step) of the shared finished tiny run."""
  config, workdir, summary = tiny_run
  evals = {r['step']: {k: r[k] for k in _FIGURES}
           for r in metric_writers.read_metrics(workdir) if 'eval_perplexity' in r}
  return config, workdir, summary, evals


def _figures(result: dict) -> dict:
  return {k: result[k] for k in _FIGURES}


def test_a_workdir_evaluates_to_the_final_eval_training_recorded(recorded):
  config, workdir, summary, evals = recorded
  figures = evaluation.evaluate_model(config, workdir)
  assert _figures(figures) == evals[config.num_train_steps]  # Exactly: the same computation.
  assert figures['eval_perplexity'] == summary['perplexity_after']
  assert figures['eval_blocks'] == 274  # The tiny run's test split, whole.


def test_an_earlier_checkpoint_evaluates_to_its_steps_eval(recorded):
  config, workdir, _, evals = recorded
  assert _figures(evaluation.evaluate_model(config, workdir, step=10)) == evals[10]
  assert evals[10] != evals[config.num_train_steps]


def test_the_attention_scope_of_the_config_applies(recorded):
  """A model trained with 'block' scores otherwise under 'document' (a few test blocks hold
  a separator): the evaluation runs the config's scope, as training's did."""
  config, workdir, _, evals = recorded
  config = config.copy_and_resolve_references()
  config.attention_scope = 'document'
  figures = _figures(evaluation.evaluate_model(config, workdir))
  assert figures['eval_loss'] != evals[config.num_train_steps]['eval_loss']
  assert figures['eval_loss'] == pytest.approx(evals[config.num_train_steps]['eval_loss'],
                                               rel=1e-3)


def _plain_loop_pll(predictor: infer.Predictor, block: np.ndarray) -> tuple[float, int]:
  """(PLL, scored tokens) of a block the plain way: each non-special token masked in turn,
  one copy at a time through the model's whole forward (every position's logits)."""
  forward = jax.jit(lambda ids: jax.nn.log_softmax(
      predictor.model(ids[None], params=predictor.params).logits[0], axis=-1))
  special = set(predictor.tokenizer.all_special_ids)
  total, tokens = 0.0, 0
  for position, token in enumerate(block):
    if int(token) in special:
      continue
    copy = block.copy()
    copy[position] = predictor.tokenizer.mask_token_id
    total += float(forward(copy)[position, token])
    tokens += 1
  return total, tokens


def test_pll_metric_is_the_evaluated_blocks_pseudo_perplexity(recorded):
  config, workdir, _, _ = recorded
  config = config.copy_and_resolve_references()
  # Ten blocks, the first ten of the seeded draw to hold a text's end (special tokens): most
  # blocks lie inside a text.
  config.max_eval_blocks = 10
  figures = evaluation.evaluate_model(config, workdir, pll=True)
  predictor = infer.load_predictor(workdir)
  test = preparation.prepare(config, predictor.tokenizer, lambda _: None,
                             check_tokenizer=run_lib.tokenizer_check(config)).blocks.test
  blocks = evaluation.evaluated_block_ids(test, config)
  assert len(blocks) == 10 and all((test == block).all(1).any() for block in blocks)
  plls, tokens = zip(*(_plain_loop_pll(predictor, block) for block in blocks))
  assert figures['eval_pll_tokens'] == sum(tokens) < blocks.size  # Special tokens unscored.
  assert figures['eval_pseudo_perplexity'] == pytest.approx(np.exp(-sum(plls) / sum(tokens)),
                                                            rel=1e-5)
  assert (f'pseudo-perplexity {figures["eval_pseudo_perplexity"]:.4f} over '
          f'{sum(tokens)} tokens') in evaluation.describe(figures, config.block_size)


def _evaluate_cli(*args):
  return subprocess.run([sys.executable, '-m', 'mlm_jax.evaluate', *args], cwd=ROOT,
                        env=dict(os.environ, PYTHONUNBUFFERED='1'), capture_output=True,
                        text=True, timeout=600, check=False)


def test_cli_on_the_export_prints_and_writes_the_final_eval(recorded, tmp_path):
  config, workdir, _, evals = recorded
  export = os.path.join(workdir, 'export')
  result = _evaluate_cli(f'--model={export}', '--config=configs/tiny_test.py',
                         f'--json={tmp_path / "figures.json"}')
  assert result.returncode == 0, result.stderr[-2000:]
  final = evals[config.num_train_steps]
  assert result.stdout.strip().splitlines()[-1].startswith(
      f'{export}: perplexity {final["eval_perplexity"]:.4f}, masked-token accuracy '
      f'{final["eval_accuracy"]:.4f}, loss {final["eval_loss"]:.4f} over 1,321 masked tokens')
  written = json.loads((tmp_path / 'figures.json').read_text())
  assert written == {'model': export, 'step': None, **final, 'eval_blocks': 274}


def _workdir_without_checkpoints(workdir, tmp_path):
  """A workdir stopped before its first checkpoint: its model config and tokenizer only."""
  stopped = tmp_path / 'stopped'
  for name in ('model', 'tokenizer'):
    shutil.copytree(os.path.join(workdir, name), stopped / name)
  (stopped / 'checkpoints').mkdir()
  return str(stopped)


@pytest.mark.parametrize('case, says', [
    ('missing', "'/nonexistent/model' is not a model directory"),
    ('no_checkpoint', 'has no checkpoint; train first or pass an export directory'),
    ('long_blocks', 'block_size=1000 is outside what the model allows (1..512)'),
])
def test_bad_input_is_one_error_before_any_data_is_prepared(recorded, tmp_path, case, says):
  config, workdir, _, _ = recorded
  config = config.copy_and_resolve_references()
  config.cache_dir = str(tmp_path / 'cache')
  model = {'missing': '/nonexistent/model', 'long_blocks': workdir,
           'no_checkpoint': _workdir_without_checkpoints(workdir, tmp_path)}[case]
  if case == 'long_blocks':
    config.block_size = 1000
  with pytest.raises(UserError) as error:
    evaluation.evaluate_model(config, model)
  assert says in str(error.value) and '\n' not in str(error.value)
  assert not (tmp_path / 'cache').exists()


def test_cli_reports_bad_input_in_one_line():
  result = _evaluate_cli('--model=/nonexistent/model', '--config=configs/tiny_test.py')
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: '/nonexistent/model' is not a model directory; "
                                   'pass a directory with config.json or a hub id')
