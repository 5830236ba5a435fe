"""ModernBERT at long context through the whole package, as a new user runs it:
configs/modernbert.py with --config.block_size=8192 --config.per_device_batch_size=1 and every
other default (eval_batch_size=64 among them), on a local tiny ModernBERT of 8,192 positions
saved as the hub's are: prepare, train, evaluate during training and without it, fill a mask
deep in a long text, and an export that PyTorch loads.

The default eval batch would need hundreds of GB at 8,192 tokens through dense attention:
the run evaluates the rows that fit instead (`steps.eval_rows_that_fit`), with the same
figures. The 8,192-token run takes minutes on 2 CPU cores (marked slow); the same at 1,024
tokens, on a fifth of the sample, runs in the default suite.
"""

import json
import os

import numpy as np
import pytest
import transformers

from mlm_jax import evaluation
from mlm_jax import infer
from mlm_jax import train
from mlm_jax.data import sources
from tests import tiny_models
from tests.conftest import load_config

POSITIONS = 8192


@pytest.fixture(scope='module')
def checkpoint_dir(tmp_path_factory):
  return tiny_models.save_modernbert(str(tmp_path_factory.mktemp('long_modernbert')),
                                     positions=POSITIONS)


def recipe(checkpoint_dir: str, cache_dir: str, block_size: int, split: str = 'train'):
  """configs/modernbert.py as the command line sets it, on (a `split` of) the shipped sample."""
  config = load_config('modernbert')
  config.model_name_or_path = checkpoint_dir
  config.dataset = ''
  config.split = split
  config.block_size = block_size
  config.per_device_batch_size = 1
  config.num_train_steps = 2
  config.cache_dir = cache_dir
  return config


def long_text(tokenizer, tokens: int) -> str:
  """The shipped sample's answers joined and cut at about `tokens` tokens, with a mask at its
  end: the fill sees the whole text."""
  with open(sources.sample_data_path(), encoding='utf-8') as f:
    text = ' '.join(' '.join(json.loads(line)['answers']['text']) for line in f)
  offsets = tokenizer(text, return_offsets_mapping=True)['offset_mapping']
  return text[:offsets[tokens - 12][1]] + ' and the [MASK] is blue.'


def run_end_to_end(checkpoint_dir: str, tmp_path, block_size: int, split: str = 'train') -> None:
  config = recipe(checkpoint_dir, str(tmp_path / 'cache'), block_size, split)
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir)
  assert np.isfinite(summary['perplexity_after'])
  assert config.eval_batch_size == 64  # The default, left as it is.

  figures = evaluation.evaluate_model(config, workdir, log=lambda _: None)
  assert figures['eval_perplexity'] == pytest.approx(summary['perplexity_after'], rel=1e-6)

  export = os.path.join(workdir, 'export')
  predictor = infer.load_predictor(export)
  text = long_text(predictor.tokenizer, block_size)
  assert len(predictor.tokenizer(text)['input_ids']) > block_size - 16
  [[fills]] = infer.fill_mask(predictor, [text], top_k=3)
  assert len(fills) == 3 and fills[0]['score'] >= fills[1]['score'] >= fills[2]['score']

  if transformers.utils.is_torch_available():
    model = transformers.AutoModelForMaskedLM.from_pretrained(export)
    assert model.config.max_position_embeddings == POSITIONS


def test_modernbert_runs_end_to_end_at_1024_tokens(checkpoint_dir, tmp_path):
  run_end_to_end(checkpoint_dir, tmp_path, 1024, split='train[:60]')


@pytest.mark.slow
def test_modernbert_runs_end_to_end_at_8192_tokens(checkpoint_dir, tmp_path):
  run_end_to_end(checkpoint_dir, tmp_path, POSITIONS)
