"""New vocabulary (`vocabulary.py`, `add_tokens`, `new_token_init`, `pad_vocab_to_multiple_of`).

Guards, on the golden PyTorch-saved checkpoints of every family (tied and untied decoders)
with the WordPiece tokenizers their ids fit: words are added as regular whole-word tokens,
a word already one token is one line of notice; the table, an untied decoder and the bias grow,
the old rows stay, and the new rows start exactly at the mean of their pieces (`subwords`) or
of the old rows (`mean`), or at draws of transformers' distribution (`mean_cov`, its
statistics); padded rows are never predicted; a lowercasing tokenizer matches a capitalised
word in any case and adds two casings of one word once. Through the real pipeline (RoBERTa, untied,
padded to 64): the export's config.json and tokenizer, the padded rows after training, PLL
scoring of a new word as one token, the one-line refusal of a resume with another word list,
and (where torch is installed) PyTorch's fill-mask on the export giving run_infer.py's top-k.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from mlm_jax import infer
from mlm_jax import train
from mlm_jax import validation
from mlm_jax import vocabulary
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import load_config
from tests.test_scoring import GOLDEN, GOLDENS, PLL_DIR

FIXTURES = ('roberta', 'roberta_untied', 'bert', 'distilbert', 'albert', 'modernbert',
            'modernbert_untied')
NEW_WORDS = ('unhappy', 'quickest')  # Pieces of the old tokenizer: un ##happ ##y, quick ##est.
WORDS = 'the a cat dog fox sat on over mat run jump quick slow lazy big red star sky'.split()


def pretrained(directory, fixture: str) -> str:
  """A golden PyTorch-saved checkpoint with the tokenizer whose ids fit it."""
  shutil.copytree(GOLDENS / fixture, directory, ignore=shutil.ignore_patterns('*.npz'))
  shutil.copytree(PLL_DIR / f'tokenizer_{GOLDEN["styles"][fixture]}', directory,
                  dirs_exist_ok=True)
  return str(directory)


def grown(directory: str, init: str, multiple: int = 1, words=NEW_WORDS):
  """(old model, old tokenizer, grown params, plan) for `words` added to `directory`'s."""
  model = FlaxAutoModelForMaskedLM.from_pretrained(directory)
  old = tokenizer_lib.load_pretrained_tokenizer(directory)
  new = tokenizer_lib.add_words(tokenizer_lib.load_pretrained_tokenizer(directory), list(words))
  plan = vocabulary.make_plan(old, new, model.config.vocab_size, multiple)
  params = vocabulary.grow(model.params, model.family.vocab_params, plan, init, seed=0)
  return model, old, params, plan


def tables(model, params) -> dict[str, np.ndarray]:
  """The vocabulary's parameters as [rows, ...] (the decoder kernel transposed)."""
  flat = traverse_util.flatten_dict(params, sep='/')
  vocab = model.family.vocab_params
  found = {path: np.asarray(flat[path]) for path in (vocab.embedding, vocab.decoder, vocab.bias)
           if path in flat}
  if vocab.decoder in found:
    found[vocab.decoder] = found[vocab.decoder].T
  return found


def test_words_become_regular_whole_word_tokens_and_a_known_word_is_one_notice():
  notices = []
  tokenizer = tokenizer_lib.add_words(
      tokenizer_lib.load_pretrained_tokenizer(str(PLL_DIR / 'tokenizer_bert')),
      ['unhappy', 'the', 'quickest', 'cat'], notices.append)
  assert notices == ["note: 'the', 'cat' are already one token of the vocabulary; not added "
                     'again']
  assert tokenizer.convert_tokens_to_ids(['unhappy', 'quickest']) == [48, 49]
  ids = tokenizer('the unhappy cat', add_special_tokens=False)['input_ids']
  assert tokenizer.convert_ids_to_tokens(ids) == ['the', 'unhappy', 'cat']
  assert 'unhappy' not in tokenizer.all_special_tokens
  assert tokenizer_lib.added_words(tokenizer) == ['unhappy', 'quickest']
  assert 48 not in tokenizer('unhappyish')['input_ids']  # Whole words only.


def test_a_lowercasing_tokenizer_matches_a_capitalised_word_in_any_case_and_adds_it_once(
    tmp_path):
  """This tokenizer lowercases the text, as BERT uncased does, and tokenizers normalizes an
  added word alike before matching it: `Unhappy` is one token wherever the text has the word
  in any case, its rows start from the pieces of `unhappy`, and `unhappy` beside it is one
  notice, not a second token that no text would ever reach. Fill-mask decodes it lowercased
  (as docs/domain_adaptation.md says), and the saved tokenizer keeps the word as given, so a
  resume adds the same words."""
  old = tokenizer_lib.load_pretrained_tokenizer(str(PLL_DIR / 'tokenizer_bert'))
  notices = []
  tokenizer = tokenizer_lib.add_words(
      tokenizer_lib.load_pretrained_tokenizer(str(PLL_DIR / 'tokenizer_bert')),
      ['Unhappy', 'unhappy', 'QUICKEST'], notices.append)
  assert notices == ["note: the tokenizer normalizes (lowercases) the text, so it reads "
                     "'unhappy' as 'Unhappy'; added once"]
  assert tokenizer_lib.added_words(tokenizer) == ['Unhappy', 'QUICKEST']
  ids = tokenizer('the unhappy cat The UNHAPPY quickest dog', add_special_tokens=False)
  the, cat, dog = tokenizer.convert_tokens_to_ids(['the', 'cat', 'dog'])
  assert ids['input_ids'] == [the, 48, cat, the, 48, 49, dog]
  plan = vocabulary.make_plan(old, tokenizer, 48, 1)
  assert plan.pieces == [tokenizer_lib.word_pieces(old, w) for w in ('unhappy', 'quickest')]
  assert tokenizer.decode([48, 49]) == 'unhappy quickest'
  tokenizer.save_pretrained(tmp_path)
  saved = tokenizer_lib.load_pretrained_tokenizer(str(tmp_path))
  assert tokenizer_lib.added_words(saved) == ['Unhappy', 'QUICKEST']


@pytest.mark.parametrize('fixture', FIXTURES)
@pytest.mark.parametrize('init', ['subwords', 'mean'])
def test_the_new_rows_start_at_the_mean_of_their_pieces_or_of_the_old_rows(fixture, init,
                                                                            tmp_path):
  model, old_tokenizer, params, plan = grown(pretrained(tmp_path / 'm', fixture), init, 64)
  assert plan.new_ids == [48, 49] and plan.rows == 64 and plan.padded_from == 50
  pieces = [old_tokenizer(' ' + w, add_special_tokens=False)['input_ids'] for w in NEW_WORDS]
  assert [len(p) for p in pieces] == [3, 2]
  before, after = tables(model, model.params), tables(model, params)
  assert len(after) == (3 if 'untied' in fixture else 2)  # The decoder grows where untied.
  for path, old in before.items():
    new = after[path]
    assert new.shape[0] == 64
    np.testing.assert_array_equal(new[:48], old)  # The pretrained rows stay.
    for row, word_pieces in zip(new[48:50], pieces):
      expected = old[word_pieces].mean(axis=0) if init == 'subwords' else old.mean(axis=0)
      np.testing.assert_allclose(row, expected, rtol=1e-6, atol=1e-7)
    if path == model.family.vocab_params.bias:
      assert (new[50:] == vocabulary.PADDED_BIAS).all()
    else:
      assert (new[50:] == 0).all()


def test_mean_cov_draws_rows_from_transformers_distribution(tmp_path):
  """Many new rows at once: their mean is the old rows', their covariance 1e-9 times theirs
  (transformers' `resize_token_embeddings` with `mean_resizing`; the bias's 1e-9 deviation
  is lost to float32 there too)."""
  model = FlaxAutoModelForMaskedLM.from_pretrained(pretrained(tmp_path / 'm', 'roberta_untied'))
  draws = 20_000
  plan = vocabulary.Plan(list(range(48, 48 + draws)), [], 48 + draws, 48 + draws)
  before = tables(model, model.params)
  after = tables(model, vocabulary.grow(model.params, model.family.vocab_params, plan,
                                        'mean_cov', seed=0))
  for path, old in before.items():
    new = after[path][48:].astype(np.float64)
    np.testing.assert_allclose(new.mean(axis=0), old.mean(axis=0), atol=1e-5)
    if old.ndim == 1:  # 1e-9 of the deviation is below float32's resolution, as in PyTorch.
      np.testing.assert_allclose(new, old.mean(dtype=np.float64), rtol=1e-6)
    else:
      assert len(np.unique(new, axis=0)) == draws  # Draws, not one repeated mean.
      centered = old - old.mean(axis=0)
      covariance = 1e-9 * centered.T @ centered / len(old)
      np.testing.assert_allclose(np.cov(new, rowvar=False), covariance,
                                 atol=0.05 * np.abs(covariance).max())


@pytest.mark.parametrize('fixture', ['bert', 'modernbert_untied'])
def test_padded_rows_are_never_predicted(fixture, tmp_path):
  directory = pretrained(tmp_path / 'm', fixture)
  model, _, params, plan = grown(directory, 'subwords', 64)
  tokenizer = tokenizer_lib.add_words(tokenizer_lib.load_pretrained_tokenizer(directory),
                                      list(NEW_WORDS))
  predictor = infer.Predictor(model.with_vocab_size(plan.rows, params), params, tokenizer)
  mask = tokenizer.mask_token
  ids = np.array([tokenizer(f'the {mask} cat sat')['input_ids']])
  log_probs = jax.nn.log_softmax(predictor.model(ids, params=params).logits, axis=-1)
  assert np.exp(np.asarray(log_probs)[..., plan.padded_from:]).max() == 0.0
  fills = infer.fill_mask(predictor, ['the <mask> cat sat'], top_k=100)[0][0]
  assert len(fills) == len(tokenizer) == plan.padded_from
  assert {fill['token'] for fill in fills} == set(range(plan.padded_from))


# --- the configuration -------------------------------------------------------------------

def vocab_config(**overrides):
  config = load_config('tiny_test')
  config.model_name_or_path = '/a/model'
  config.update(overrides)
  return config


@pytest.mark.parametrize('content, message', [
    (None, r"^add_tokens_file='.*' cannot be read \(No such file or directory\)"),
    ('\n  \n', r"^add_tokens_file='.*' is empty; put one token per line"),
    ('good\nnot one\n', r"^the new token 'not one' holds whitespace")])
def test_a_bad_token_file_is_one_line(content, message, tmp_path):
  path = tmp_path / 'tokens.txt'
  if content is not None:
    path.write_text(content, encoding='utf-8')
  with pytest.raises(UserError, match=message):
    validation.validate_config(vocab_config(add_tokens_file=str(path)))


def test_the_token_list_joins_the_flag_and_the_file_in_order_once(tmp_path):
  path = tmp_path / 'tokens.txt'
  path.write_text('mitochondria\n\nribosome\nkinase\n', encoding='utf-8')
  config = vocab_config(add_tokens=' kinase, ,cytosol', add_tokens_file=str(path))
  assert validation.new_tokens(config) == ['kinase', 'cytosol', 'mitochondria', 'ribosome']


@pytest.mark.parametrize('overrides, message', [
    (dict(new_token_init='zeros'), '^new_token_init=.zeros. is not supported'),
    (dict(pad_vocab_to_multiple_of=0), '^pad_vocab_to_multiple_of=0 must be at least 1'),
    (dict(model_name_or_path='', add_tokens='kinase'), '^add_tokens, add_tokens_file and pad'),
    (dict(model_name_or_path='', pad_vocab_to_multiple_of=64), '^add_tokens, add_tokens_file')])
def test_bad_vocabulary_settings_are_one_line(overrides, message):
  with pytest.raises(UserError, match=message):
    validation.validate_config(vocab_config(**overrides))


# --- through the pipeline ----------------------------------------------------------------

def run_config(model: str, data: str, **overrides):
  config = load_config('tiny_test')
  config.update({**dict(model_name_or_path=model, data_files=data, block_size=12,
                        add_tokens='unhappy,quickest,the', pad_vocab_to_multiple_of=64,
                        num_train_steps=2, eval_every_steps=2, per_device_batch_size=8,
                        max_eval_blocks=16, learning_rate=1e-2), **overrides})
  return config


@pytest.fixture(scope='module')
def vocab_run(tmp_path_factory):
  """(workdir, config) of a 2-step run of the untied RoBERTa with two new words, padded."""
  root = tmp_path_factory.mktemp('vocab')
  model = pretrained(root / 'model', 'roberta_untied')
  rng = np.random.RandomState(0)
  words = WORDS + list(NEW_WORDS)
  (root / 'data.txt').write_text(
      '\n'.join(' '.join(rng.choice(words, 12)) + ' .' for _ in range(120)), encoding='utf-8')
  config = run_config(model, str(root / 'data.txt'))
  workdir = str(root / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir, config


def test_the_export_has_the_new_words_and_the_padded_table(vocab_run):
  workdir, _ = vocab_run
  export = f'{workdir}/export'
  with open(f'{export}/config.json', encoding='utf-8') as f:
    assert json.load(f)['vocab_size'] == 64
  for directory in (export, f'{workdir}/tokenizer'):
    tokenizer = tokenizer_lib.load_pretrained_tokenizer(directory)
    assert tokenizer_lib.added_words(tokenizer) == list(NEW_WORDS) and len(tokenizer) == 50
  model = FlaxAutoModelForMaskedLM.from_pretrained(export)
  bias = tables(model, model.params)[model.family.vocab_params.bias]
  assert (bias[50:] == vocabulary.PADDED_BIAS).all()  # Training left the padding as it was.


def test_pll_scoring_scores_a_new_word_as_one_token(vocab_run):
  workdir, _ = vocab_run
  predictor = infer.load_predictor(workdir)
  [score] = infer.score_texts(predictor, ['the unhappy cat sat .'])
  assert score.tokens == 5


def test_a_resume_with_the_same_words_takes_up_the_run(vocab_run):
  workdir, config = vocab_run
  config = run_config(config.model_name_or_path, config.data_files, num_train_steps=3)
  summary = train.train_and_evaluate(config, workdir)
  assert summary['steps'] == 3 and summary['steps_this_run'] == 1


def test_a_resume_with_another_word_list_is_refused_in_one_line(vocab_run):
  workdir, config = vocab_run
  config = run_config(config.model_name_or_path, config.data_files,
                      add_tokens='unhappy,quickest,kinase')
  with pytest.raises(UserError, match=r"^the run in .* added the tokens \['unhappy', "
                     r"'quickest'\] to its tokenizer, and this config adds \['unhappy', "
                     r"'quickest', 'kinase'\]; resume with the same"):
    train.train_and_evaluate(config, workdir)


def test_pytorch_fill_mask_on_the_export_gives_run_infers_top_k(vocab_run):
  torch = pytest.importorskip('torch')
  import transformers  # pylint: disable=import-outside-toplevel
  export = f'{vocab_run[0]}/export'
  texts = ['the <mask> cat sat .', 'a quickest <mask> is unhappy .']
  pipeline = transformers.pipeline('fill-mask', model=export, tokenizer=export, top_k=50)
  ours = infer.fill_mask(infer.load_predictor(export), texts, top_k=50)
  with torch.no_grad():
    theirs = [pipeline(text.replace('<mask>', pipeline.tokenizer.mask_token)) for text in texts]
  for mine, reference in zip(ours, theirs):
    assert [f['token'] for f in mine[0]] == [f['token'] for f in reference]
    np.testing.assert_allclose([f['score'] for f in mine[0]], [f['score'] for f in reference],
                               atol=1e-5)
  assert any(f['token'] >= 48 for f in theirs[0])  # The new words are among the candidates.
