"""Workdirs and exports written by the release built on transformers 4's Flax classes.

`tests/fixtures/release_0_1_workdir` was written by that release (commit 8328742 with
transformers 4.57.6, no torch, so its export holds only `flax_model.msgpack`): the tiny
config with hidden 16, a 300-token BPE, 4 steps. Guards that its orbax checkpoint and its
export restore into the project's own models with the same predictions, and that the run
resumes under today's config (whose new keys an older checkpoint lacks).
"""

import os
import shutil

import numpy as np
import pytest

from mlm_jax import checkpoint
from mlm_jax import infer
from mlm_jax import train
from tests.conftest import ROOT, load_config

FIXTURE = ROOT / 'tests' / 'fixtures' / 'release_0_1_workdir'
TEXT = 'Why is the sky <mask>?'


@pytest.fixture
def workdir(tmp_path):
  """A copy: a test must never change the fixture."""
  return str(shutil.copytree(FIXTURE, tmp_path / 'workdir'))


def _fills(predictor):
  [[fills]] = infer.fill_mask(predictor, [TEXT], top_k=5)
  return [f['token'] for f in fills], np.array([f['score'] for f in fills])


def test_its_checkpoint_predicts_like_its_flax_export(workdir):
  from_checkpoint = infer.load_predictor(workdir)
  from_export = infer.load_predictor(os.path.join(workdir, 'export'))
  assert os.listdir(os.path.join(workdir, 'export')).count('flax_model.msgpack') == 1
  tokens, scores = _fills(from_checkpoint)
  export_tokens, export_scores = _fills(from_export)
  assert tokens == export_tokens
  np.testing.assert_allclose(scores, export_scores, rtol=1e-5)
  assert scores[0] > 1.5 / 300  # Trained weights, not a fresh uniform-ish model.


def test_its_run_resumes_and_exports_safetensors(workdir, tmp_path):
  config = load_config('tiny_test')
  config.tokenizer_vocab_size = 300
  config.model_config.hidden_size = 16
  config.model_config.intermediate_size = 32
  config.checkpoint_every_steps = config.eval_every_steps = config.log_every_steps = 2
  config.keep_checkpoints = 1
  config.num_train_steps = 6  # The release trained 4; a longer run is a resumable change.
  config.replan_schedule = True
  config.cache_dir = str(tmp_path / 'cache')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['steps_this_run'] == 2
  assert checkpoint.make_manager(workdir, keep=None, create=False).latest_step() == 6
  assert os.path.isfile(os.path.join(workdir, 'export', 'model.safetensors'))
