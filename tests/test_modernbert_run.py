"""ModernBERT through the whole package: configs/modernbert.py with a local tiny checkpoint.

The checkpoint is saved as the hub's is (config.json, model.safetensors and a byte-level BPE
tokenizer with ModernBERT's [CLS] ... [SEP] template and its special tokens at the end of
the vocabulary), then trained with the recipe's settings (masking rate 0.3, the wsd
schedule, document-aware attention) plus whole-word masking and bfloat16, resumed,
evaluated without training, exported and used for fill-mask, which must equal PyTorch's pipeline on the
export where torch is installed.
"""

import copy
import os
import shutil

import numpy as np
import pytest
import transformers

from mlm_jax import checkpoint
from mlm_jax import evaluation
from mlm_jax import infer
from mlm_jax import metric_writers
from mlm_jax import train
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError
from tests import tiny_models
from tests.conftest import load_config

TEXTS = ['the sky is [MASK] because of the sun.', 'why is the [MASK] blue?']


@pytest.fixture(scope='module')
def checkpoint_dir(tmp_path_factory):
  return tiny_models.save_modernbert(str(tmp_path_factory.mktemp('tiny_modernbert')))


def recipe(checkpoint_dir, cache_dir):
  config = load_config('modernbert')
  config.model_name_or_path = checkpoint_dir
  config.dataset = ''  # The shipped sample.
  config.split = 'train[:100]'
  config.block_size = 32
  config.masking = 'whole_word'
  config.dtype = 'bfloat16'
  config.learning_rate = 3e-3
  config.warmup_steps = 2
  config.per_device_batch_size = 8
  config.num_train_steps = 12
  config.wsd_decay_fraction = 0.5  # The last 6 steps decay: the logged rates show it.
  config.eval_every_steps = config.checkpoint_every_steps = 6
  config.log_every_steps = 3
  config.eval_batch_size = 16
  config.num_proc = 1
  config.cache_dir = cache_dir
  return config


@pytest.fixture(scope='module')
def run(checkpoint_dir, tmp_path_factory):
  config = recipe(checkpoint_dir, str(tmp_path_factory.mktemp('cache')))
  workdir = str(tmp_path_factory.mktemp('run'))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_the_recipe_trains_a_local_modernbert(run):
  config, workdir, summary = run
  assert (config.mlm_probability, config.lr_schedule, config.attention_scope) == (
      0.3, 'wsd', 'document')
  assert summary['perplexity_after'] < summary['perplexity_before']
  records = metric_writers.read_metrics(workdir)
  assert [r['learning_rate'] for r in records if 'loss' in r][-1] < config.learning_rate / 2
  assert checkpoint.make_manager(workdir, keep=None, create=False).latest_step() == 12


def test_whole_word_masking_finds_the_words_of_its_byte_level_tokenizer(run):
  _, workdir, _ = run
  tokenizer = infer.load_predictor(workdir).tokenizer
  starts = tokenizer_lib.word_start_table(tokenizer)
  ids = tokenizer(' the sky is blue')['input_ids']
  pieces = tokenizer.convert_ids_to_tokens(ids)
  assert [bool(starts[i]) for i in ids] == [p.startswith('Ġ') or p in tiny_models.MODERNBERT_SPECIALS for p in pieces]


def test_the_checkpoint_and_the_export_predict_alike(run):
  _, workdir, _ = run
  from_checkpoint = infer.fill_mask(infer.load_predictor(workdir), TEXTS, top_k=3)
  exported = infer.fill_mask(infer.load_predictor(os.path.join(workdir, 'export')), TEXTS,
                             top_k=3)
  for [a], [b] in zip(from_checkpoint, exported):
    assert [f['token'] for f in a] == [f['token'] for f in b]
    np.testing.assert_allclose([f['score'] for f in a], [f['score'] for f in b], rtol=1e-5)


def test_the_export_fills_masks_as_the_pytorch_pipeline(run):
  pytest.importorskip('torch')
  _, workdir, _ = run
  export = os.path.join(workdir, 'export')
  model, loading = transformers.AutoModelForMaskedLM.from_pretrained(
      export, output_loading_info=True)
  assert not loading['missing_keys'] and not loading['unexpected_keys'], loading
  pipe = transformers.pipeline('fill-mask', model=model, tokenizer=export)
  for text, [fills] in zip(TEXTS, infer.fill_mask(infer.load_predictor(export), TEXTS, top_k=3)):
    expected = pipe(text, top_k=3)
    assert [f['token'] for f in fills] == [f['token'] for f in expected], text
    np.testing.assert_allclose([f['score'] for f in fills], [f['score'] for f in expected],
                               rtol=0, atol=1e-4)


def test_evaluation_without_training_gives_the_runs_last_perplexity(run):
  config, workdir, summary = run
  figures = evaluation.evaluate_model(config, workdir, log=lambda _: None)
  assert figures['eval_perplexity'] == pytest.approx(summary['perplexity_after'], rel=1e-6)


def test_the_run_resumes_from_its_checkpoint(run, tmp_path):
  config, workdir, _ = run
  resumed = str(shutil.copytree(workdir, tmp_path / 'resumed'))
  longer = copy.deepcopy(config)
  longer.num_train_steps, longer.replan_schedule = 15, True
  assert train.train_and_evaluate(longer, resumed)['steps_this_run'] == 3


def test_a_block_longer_than_its_positions_is_one_line(checkpoint_dir, tmp_path):
  config = recipe(checkpoint_dir, str(tmp_path / 'cache'))
  config.block_size = 65  # The tiny model has 64 positions.
  with pytest.raises(UserError, match=r'block_size=65 is outside what the model allows '
                     r'\(1..64\); set --config.block_size to at most 64'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
