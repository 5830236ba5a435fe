"""A BERT with a WordPiece tokenizer, from a local directory, trained end to end.

Everything else in the suite trains RoBERTa; BERT, DistilBERT and ALBERT also train here
through `model_name_or_path`. This guards that path: another tokenizer family (WordPiece,
[CLS]/[SEP]/[MASK]), another head, another position scheme, and an
export that the transformers PyTorch `fill-mask` pipeline reads with our predictions.
"""

import json
import os

import numpy as np
import pytest
import tokenizers
import transformers

from mlm_jax.data import sources
from mlm_jax import infer
from mlm_jax import metric_writers
from mlm_jax import train
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import load_config


@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory):
  """A fresh tiny BERT and a WordPiece tokenizer trained on the sample, saved as a hub
  model would be."""
  directory = str(tmp_path_factory.mktemp('tiny_bert'))
  with open(sources.sample_data_path(), encoding='utf-8') as f:
    texts = [' '.join(json.loads(line)['answers']['text']) for line in f]
  wordpiece = tokenizers.BertWordPieceTokenizer(lowercase=True)
  wordpiece.train_from_iterator(texts, vocab_size=500, min_frequency=2)
  tokenizer = transformers.BertTokenizerFast(tokenizer_object=wordpiece._tokenizer,  # pylint: disable=protected-access
                                             model_max_length=64)
  tokenizer.save_pretrained(directory)
  config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64,
                                   pad_token_id=tokenizer.pad_token_id)
  FlaxAutoModelForMaskedLM.from_config(config, seed=0).save_pretrained(directory)
  return directory


@pytest.fixture(scope='module')
def bert_run(bert_dir, tmp_path_factory):
  config = load_config('tiny_test')
  config.model_name_or_path = bert_dir
  config.cache_dir = str(tmp_path_factory.mktemp('cache'))
  workdir = str(tmp_path_factory.mktemp('bert_run'))
  return workdir, train.train_and_evaluate(config, workdir)


def test_trains_a_local_bert_with_its_wordpiece_tokenizer(bert_run):
  workdir, summary = bert_run
  assert summary['perplexity_after'] < summary['perplexity_before']
  losses = [r['loss'] for r in metric_writers.read_metrics(workdir) if 'loss' in r]
  assert losses[-1] < losses[0]
  tokenizer = infer.load_predictor(workdir).tokenizer
  assert isinstance(tokenizer, transformers.BertTokenizerFast)
  assert tokenizer.mask_token == '[MASK]'


def test_bert_export_matches_the_pytorch_fill_mask_pipeline(bert_run):
  pytest.importorskip('torch')
  workdir, _ = bert_run
  export = os.path.join(workdir, 'export')
  pipe = transformers.pipeline(
      'fill-mask', model=transformers.AutoModelForMaskedLM.from_pretrained(export),
      tokenizer=export)
  predictor = infer.load_predictor(export)
  texts = ['the sky is <mask> because of the sun.', 'why is the <mask> blue?']
  for text, [fills] in zip(texts, infer.fill_mask(predictor, texts, top_k=3)):
    expected = pipe(text.replace(infer.USER_MASK, '[MASK]'), top_k=3)
    assert [f['token'] for f in fills] == [f['token'] for f in expected], text
    np.testing.assert_allclose([f['score'] for f in fills], [f['score'] for f in expected],
                               rtol=0, atol=1e-4)
    assert [f['sequence'] for f in fills] == [f['sequence'] for f in expected]


def test_bert_checkpoint_predicts_like_its_export(bert_run):
  workdir, _ = bert_run
  text = ['the sky is <mask> because of the sun.']
  [[from_checkpoint]] = infer.fill_mask(infer.load_predictor(workdir), text, top_k=3)
  [[exported]] = infer.fill_mask(infer.load_predictor(os.path.join(workdir, 'export')), text,
                                 top_k=3)
  assert [f['token'] for f in from_checkpoint] == [f['token'] for f in exported]
  np.testing.assert_allclose([f['score'] for f in from_checkpoint],
                             [f['score'] for f in exported], rtol=1e-5)
