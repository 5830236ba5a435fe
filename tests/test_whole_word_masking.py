"""Whole-word masking with real tokenizers: word boundaries read from the vocabulary, the
statistics on the shipped sample, agreement with transformers' collators, the config keys and
the bad-input error, and the train step's use of the scheme (micro-batches, evaluation, the
masked-only head's bound).

The tokenizers are real and trained on the sample with `tokenizers`: the run's byte-level BPE
(`tokenizer.train_bpe_tokenizer`, the default 4096 ids) and a BERT WordPiece.
"""

import dataclasses
import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers

from mlm_jax import masking, metric_writers, optim
from mlm_jax.data import sources
from mlm_jax import model as model_lib
from mlm_jax import run as run_lib
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax import train, validation
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError
from tests.conftest import load_config
from tests.test_masking import WORD_SPEC, make_ids

BLOCK = 64
SEEDS = range(8)


def sample_texts() -> list[str]:
  with open(sources.sample_data_path(), encoding='utf-8') as f:
    return [text for line in f for text in json.loads(line)['answers']['text']]


def train_wordpiece(texts: list[str], directory) -> transformers.BertTokenizerFast:
  """BERT's uncased WordPiece, trained on `texts` and loaded from its vocab.txt as BERT is."""
  wordpiece = tokenizers.BertWordPieceTokenizer(lowercase=True)
  wordpiece.train_from_iterator(texts, vocab_size=4096, show_progress=False)
  wordpiece.save_model(str(directory))
  return transformers.BertTokenizerFast.from_pretrained(str(directory))


@pytest.fixture(scope='module')
def texts():
  return sample_texts()


@pytest.fixture(scope='module', params=['byte_level_bpe', 'wordpiece'])
def tokenizer(request, texts, tmp_path_factory):
  if request.param == 'byte_level_bpe':
    return tokenizer_lib.train_bpe_tokenizer(texts, vocab_size=4096, model_max_length=510)
  return train_wordpiece(texts, tmp_path_factory.mktemp('wordpiece'))


def is_continuation(tokenizer, token: str) -> bool:
  """Each tokenizer's convention, on the token's string: WordPiece's `##`, BPE's missing `Ġ`."""
  if isinstance(tokenizer, transformers.BertTokenizerFast):
    return token.startswith('##')
  return not token.startswith('Ġ')


def continues_word(tokenizer, ids: np.ndarray) -> np.ndarray:
  """True where a token continues the previous token's word, from the token strings: not a
  row's first token, neither it nor the previous token special, and a continuation piece."""
  special = np.isin(ids, tokenizer.all_special_ids)
  continues = np.array([[is_continuation(tokenizer, t)
                         for t in tokenizer.convert_ids_to_tokens(row.tolist())] for row in ids])
  continues &= ~special
  continues[:, 1:] &= ~special[:, :-1]
  continues[:, 0] = False
  return continues


def whole_word_spec(tokenizer, probability=0.15, **kwargs) -> masking.MaskingSpec:
  return masking.masking_spec(tokenizer, probability, scheme='whole_word',
                              word_start_table=tokenizer_lib.word_start_table(tokenizer), **kwargs)


_mask_tokens = jax.jit(masking.mask_tokens, static_argnames='spec')


def mask(spec, ids: np.ndarray, seed: int):
  ids = jnp.asarray(ids)
  special = masking.special_tokens_mask(ids, spec.special_ids)
  return tuple(np.asarray(x) for x in _mask_tokens(jax.random.PRNGKey(seed), ids, special,
                                                   spec=spec))


# ----------------------------------------------------------------------------
# The word-start table.


def test_the_first_piece_of_every_word_starts_it_and_the_others_continue(tokenizer, texts):
  table = tokenizer_lib.word_start_table(tokenizer)
  assert table.shape == (len(tokenizer),)
  words = {w for text in texts[:100] for w in text.lower().split() if w.isalpha()}
  long_words = 0
  for word in sorted(words):
    ids = tokenizer(' ' + word, add_special_tokens=False)['input_ids']
    assert table[ids[0]], (word, tokenizer.convert_ids_to_tokens(ids))
    assert not table[ids[1:]].any(), (word, tokenizer.convert_ids_to_tokens(ids))
    long_words += len(ids) > 1
  assert long_words > 50  # Words split into several pieces were checked.


def test_byte_level_bpe_words_start_at_whitespace_bytes_too(texts):
  """A newline or a tab, not only a space, separates words: their byte-level tokens start one."""
  tokenizer = tokenizer_lib.train_bpe_tokenizer(texts, vocab_size=4096, model_max_length=510)
  ids = tokenizer('The sky.\n\n\tIt is blue', add_special_tokens=False)['input_ids']
  assert tokenizer.convert_ids_to_tokens(ids) == [
      'The', 'Ġsky', '.', 'Ċ', 'Ċ', 'ĉ', 'It', 'Ġis', 'Ġblue']
  assert tokenizer_lib.word_start_table(tokenizer)[ids].tolist() == [
      False, True, False, True, True, True, False, True, True]


def test_special_tokens_start_words(tokenizer):
  assert tokenizer_lib.word_start_table(tokenizer)[tokenizer.all_special_ids].all()


def test_sentencepiece_word_starts_are_read_from_the_vocabulary(texts):
  unigram = tokenizers.SentencePieceUnigramTokenizer()
  unigram.train_from_iterator(texts, vocab_size=2000, special_tokens=['<pad>', '<mask>'],
                              show_progress=False)
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=unigram._tokenizer,  # pylint: disable=protected-access
      pad_token='<pad>', mask_token='<mask>')
  table = tokenizer_lib.word_start_table(tokenizer)
  ids = tokenizer(' photosynthesis happens', add_special_tokens=False)['input_ids']
  tokens = tokenizer.convert_ids_to_tokens(ids)
  assert len(tokens) > 2, tokens
  assert table[ids].tolist() == [t.startswith('▁') for t in tokens]
  assert table[ids].sum() == 2


# ----------------------------------------------------------------------------
# Statistics on the sample's blocks, as training sees them.


@pytest.fixture(scope='module')
def masked_blocks(tokenizer, texts):
  """(spec, blocks, weights over SEEDS) of the sample cut into 64-token blocks."""
  ids = np.concatenate([tokenizer(text)['input_ids'] for text in texts]).astype(np.int32)
  blocks = ids[:len(ids) // BLOCK * BLOCK].reshape(-1, BLOCK)  # As preparation.py cuts them.
  spec = whole_word_spec(tokenizer)
  weights = np.stack([mask(spec, blocks, seed)[2] for seed in SEEDS])
  return spec, blocks, weights


def test_every_token_of_a_chosen_word_is_chosen_on_real_text(tokenizer, masked_blocks):
  _, blocks, weights = masked_blocks
  continues = continues_word(tokenizer, blocks)
  assert continues.mean() > 0.1
  chosen = weights == 1
  np.testing.assert_array_equal(chosen[:, :, 1:][:, continues[:, 1:]],
                                chosen[:, :, :-1][:, continues[:, 1:]])


def test_no_special_token_is_ever_chosen(tokenizer, masked_blocks):
  _, blocks, weights = masked_blocks
  special = np.isin(blocks, tokenizer.all_special_ids)
  assert special.sum() > 100  # Every document's <s> </s> (or [CLS] [SEP]).
  assert (weights[:, special] == 0).all()


def test_masked_token_rate_is_mlm_probability_within_5_standard_errors(tokenizer,
                                                                      masked_blocks):
  spec, blocks, weights = masked_blocks
  special = np.isin(blocks, tokenizer.all_special_ids)
  word = np.cumsum(~continues_word(tokenizer, blocks).ravel())
  lengths = np.bincount(word[~special.ravel()])
  p, draws = spec.probability, len(SEEDS)
  assert lengths.max() > 2 and lengths.sum() == (~special).sum()
  # A word of n tokens, chosen whole, adds n^2 p (1 - p) to the count's variance.
  sigma = math.sqrt(draws * p * (1 - p) * (lengths.astype(float) ** 2).sum())
  expected = draws * (~special).sum() * p
  assert abs(weights.sum() - expected) <= 5 * sigma, (weights.sum() / expected * p, sigma)


# ----------------------------------------------------------------------------
# Against transformers' collators, on the same padded texts.


def collator_masks(collator, features: list[dict], draws: int) -> np.ndarray:
  """bool [draws, rows, length]: the positions `collator` chose, one draw per call."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # Deprecation and BertTokenizer-only notices.
    return np.stack([collator(features)['labels'] != -100 for _ in range(draws)])


def offset_collator(tokenizer, probability: float):
  """transformers' DataCollatorForLanguageModeling(whole_word_mask=True): a word is the tokens
  whose character offsets touch, each word chosen with probability p; every chosen token
  becomes the mask (its whole-word path supports no 80/10/10)."""
  return transformers.DataCollatorForLanguageModeling(
      tokenizer, whole_word_mask=True, mlm_probability=probability, mask_replace_prob=1.0,
      random_replace_prob=0.0, return_tensors='np', seed=1)


@pytest.fixture(scope='module')
def padded(tokenizer, texts):
  """(ids [rows, 64], features with offsets) of the first 150
  texts, each in its own row."""
  encoded = tokenizer(texts[:150], truncation=True, max_length=BLOCK, padding='max_length',
                      return_offsets_mapping=True, return_special_tokens_mask=True)
  ids = np.asarray(encoded['input_ids'], np.int32)
  with_offsets = [{k: encoded[k][i] for k in ('input_ids', 'offset_mapping',
                                              'special_tokens_mask')} for i in range(len(ids))]
  return ids, with_offsets


def test_word_boundaries_are_transformers_whole_word_boundaries(tokenizer, padded):
  """Against the offsets collator, for byte-level BPE. Two neighbouring tokens belong to one of
  the collator's words iff it never masks one without the other: with p = 0.5 and 40 draws a
  boundary is missed with probability 1e-12. WordPiece's reference, DataCollatorForWholeWordMask
  (`##` pieces join the word before), left transformers in version 5, and WordPiece offsets also
  join punctuation to the word before it, which `##` does not: its rule is checked on its own
  by test_the_first_piece_of_every_word_starts_it_and_the_others_continue."""
  if isinstance(tokenizer, transformers.BertTokenizerFast):
    pytest.skip('transformers 5 has no WordPiece whole-word collator to compare with')
  ids, with_offsets = padded
  theirs = collator_masks(offset_collator(tokenizer, 0.5), with_offsets, draws=40)
  separate = (theirs[:, :, 1:] != theirs[:, :, :-1]).any(axis=0)
  special = np.isin(ids, tokenizer.all_special_ids)
  ours = masking.word_starts(ids, special, tokenizer_lib.word_start_table(tokenizer), xp=np)[:, 1:]
  pairs = ~special[:, 1:] & ~special[:, :-1]
  assert pairs.sum() > 5000 and 0.05 < 1 - separate[pairs].mean() < 0.5  # Both occur.
  np.testing.assert_array_equal(ours[pairs], separate[pairs])


def test_masked_token_rate_matches_transformers_within_sampling_error(tokenizer, padded):
  """The same rate as the offsets collator, which also draws each word with probability p.
  (DataCollatorForWholeWordMask instead fills a budget of round(length * p) tokens per
  sequence, [CLS] and [SEP] counted in the length: on these rows it masks about 0.156 of the
  eligible tokens for p = 0.15.)"""
  ids, with_offsets = padded
  theirs = collator_masks(offset_collator(tokenizer, 0.15), with_offsets, draws=30)
  spec = whole_word_spec(tokenizer)
  ours = np.stack([mask(spec, ids, seed)[2] == 1 for seed in range(30)])
  eligible = (~np.isin(ids, tokenizer.all_special_ids)).sum()
  rates = [m.reshape(len(m), -1).sum(axis=1) / eligible for m in (theirs, ours)]
  error = math.sqrt(sum(r.var(ddof=1) / len(r) for r in rates))
  assert abs(rates[0].mean() - rates[1].mean()) <= 5 * error, (rates[0].mean(),
                                                              rates[1].mean(), error)
  assert abs(rates[1].mean() - 0.15) <= 5 * math.sqrt(rates[1].var(ddof=1) / len(rates[1]))


# ----------------------------------------------------------------------------
# Config and bad input.


@pytest.mark.parametrize('key, value, message', [
    ('masking', 'span', r"masking='span' is not a masking scheme; set --config.masking to "
                        r'token or whole_word'),
    ('mask_replace_prob', 1.2, r'mask_replace_prob=1.2 must be in \[0, 1\]'),
    ('random_replace_prob', -0.1, r'random_replace_prob=-0.1 must be in \[0, 1\]'),
    ('random_replace_prob', 0.3, r'mask_replace_prob \+ random_replace_prob = 0.8 \+ 0.3 '
                                 r'exceeds 1'),
])
def test_bad_masking_keys_are_user_errors(key, value, message):
  config = load_config('tiny_test')
  config[key] = value
  with pytest.raises(UserError, match=message):
    validation.validate_config(config)


def word_level_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
  """Whole words as tokens: the vocabulary marks no word starts or continuations."""
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token='[UNK]'))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  backend.train_from_iterator(texts, tokenizers.trainers.WordLevelTrainer(
      vocab_size=2000, special_tokens=['[UNK]', '[PAD]', '[MASK]']))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token='[UNK]',
                                              pad_token='[PAD]', mask_token='[MASK]')


def test_a_tokenizer_without_word_boundaries_is_a_one_line_user_error(texts):
  tokenizer = word_level_tokenizer(texts[:100])
  with pytest.raises(UserError) as error:
    tokenizer_lib.word_start_table(tokenizer)
  message = str(error.value)
  assert '\n' not in message
  assert f"tokenizer '{type(tokenizer).__name__}' shows no word boundaries" in message
  assert message.endswith('use --config.masking=token')
  assert masking.masking_spec(tokenizer, 0.15).scheme == 'token'  # Token masking is fine.


def test_the_run_stops_before_tokenizing_when_the_tokenizer_has_no_word_boundaries(
    texts, tmp_path):
  directory = tmp_path / 'word_level'
  word_level_tokenizer(texts[:100]).save_pretrained(directory)
  config = load_config('tiny_test')
  config.update(tokenizer_name=str(directory), masking='whole_word',
                cache_dir=str(tmp_path / 'cache'))
  with pytest.raises(UserError, match=f"tokenizer '{directory}' shows no word boundaries"):
    run_lib.prepare(config, str(tmp_path / 'workdir'))
  assert not (tmp_path / 'cache' / 'blocks').exists()  # Nothing was tokenized.


# ----------------------------------------------------------------------------
# The train step: micro-batches, evaluation, the masked-only head's bound.


def test_the_steps_micro_batches_mask_like_the_whole_batch():
  ids = make_ids()
  micro = jax.jit(steps_lib.mask_micro_batches, static_argnames='spec')(
      jax.random.PRNGKey(4), jnp.asarray(ids).reshape(4, -1, ids.shape[1]), spec=WORD_SPEC)
  whole = mask(WORD_SPEC, ids, seed=4)
  for name, part, full in zip(('inputs', 'labels', 'weights'), micro, whole):
    np.testing.assert_array_equal(np.asarray(part).reshape(full.shape), full, err_msg=name)


def _uniform_logits(ids, params, train, segment_ids=None):
  """A 'model' whose logits are `params['vocab']` everywhere."""
  del train, segment_ids

  class Output:
    logits = jnp.broadcast_to(params['vocab'], ids.shape + params['vocab'].shape)
  return Output()


@pytest.mark.parametrize('spec', [dataclasses.replace(WORD_SPEC, scheme='token', word_starts=b''),
                                  WORD_SPEC], ids=['token', 'whole_word'])
def test_evaluation_masks_with_the_runs_scheme_and_a_fixed_key(spec):
  ids = make_ids()[:32]
  tx, schedule = optim.make_optimizer(load_config('tiny_test'), 10)
  steps = steps_lib.compile_steps(_uniform_logits, tx, schedule, spec, seed=0,
                              mesh=sharding.make_mesh())
  counted = steps_lib.evaluate(steps, {'vocab': jnp.zeros(spec.vocab_size)}, ids,
                           len(ids))['eval_masked_tokens']
  eval_rng = jax.random.fold_in(jax.random.PRNGKey(0), steps_lib.EVAL_STREAM)
  special = masking.special_tokens_mask(jnp.asarray(ids), spec.special_ids)
  weights = masking.mask_tokens(eval_rng, jnp.asarray(ids), special, spec)[2]
  assert counted == float(weights.sum())


def test_count_dispersion_is_the_words_length_weighted_mean_length():
  words = np.tile(np.array([6, 7, 8], np.int32), 20)[None]  # 20 words of 3 tokens.
  blocks = np.concatenate([np.concatenate([[[0]], words, [[2]]], axis=1)] * 4)
  assert masking.count_dispersion(blocks, WORD_SPEC) == pytest.approx(3.0)
  blocks[:, 1:61] = 9  # 60 one-token words.
  assert masking.count_dispersion(blocks, WORD_SPEC) == pytest.approx(1.0)
  assert masking.count_dispersion(blocks, dataclasses.replace(
      WORD_SPEC, scheme='token', word_starts=b'')) == 1.0


def test_max_predictions_follows_the_rate_and_the_word_dispersion():
  assert model_lib.max_predictions(128, 0.3) > model_lib.max_predictions(128, 0.15)
  assert model_lib.max_predictions(128, 0.15, 2.0) > model_lib.max_predictions(128, 0.15)
  token_bound = model_lib.max_predictions(128, 0.15)  # The exact binomial tail's.
  assert model_lib.max_predictions(128, 0.15, 2.0) == math.ceil(
      128 * 0.15 + (token_bound - 128 * 0.15) * math.sqrt(2.0))


def test_a_run_trains_and_evaluates_with_whole_word_masking(tmp_path):
  """End to end, with the masked-only head at a 30% rate: evaluation counts exactly the
  tokens whole-word masking with the fixed eval key chooses in the test blocks."""
  config = load_config('tiny_test')
  config.update(masking='whole_word', mlm_probability=0.3, num_train_steps=2,
                eval_every_steps=2, cache_dir=str(tmp_path / 'cache'))
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir)
  assert math.isfinite(summary['perplexity_after'])
  run = run_lib.prepare(config, workdir)
  assert run.spec.scheme == 'whole_word' and run.spec.probability == 0.3
  eval_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), steps_lib.EVAL_STREAM)
  test = jnp.asarray(run.blocks.test)
  special = masking.special_tokens_mask(test, run.spec.special_ids)
  expected = float(masking.mask_tokens(eval_rng, test, special, run.spec)[2].sum())
  counted = [r['eval_masked_tokens'] for r in metric_writers.read_metrics(workdir)
             if 'eval_masked_tokens' in r]
  assert counted == [expected, expected]  # Before training and at the end.
