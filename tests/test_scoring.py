"""Pseudo-log-likelihood scoring (`mlm_jax.scoring`, `infer.score_texts`, `python -m
mlm_jax.score`).

Guards that our batched scorer gives what a plain PyTorch transformers loop gives, one masked
copy at a time (tests/goldens/pll/plls.json, made by tests/goldens/make_pll_goldens.py), for
every family and both variants; which tokens `within_word_l2r` masks; that the result does
not depend on how the copies are batched and windowed; the entry point's JSON lines; and
one-line errors for bad texts and a bad variant.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_jax import infer
from mlm_jax import scoring
from mlm_jax import validation
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import ROOT
from tests.test_goldens import GOLDENS

PLL_DIR = GOLDENS / 'pll'
GOLDEN = json.loads((PLL_DIR / 'plls.json').read_text(encoding='utf-8'))
ATOL = 1e-4  # The bound; float32 forwards agree to about 1e-6.
FAMILIES = ('roberta', 'bert', 'distilbert', 'albert', 'modernbert')


def predictor_of(fixture: str) -> infer.Predictor:
  model = FlaxAutoModelForMaskedLM.from_pretrained(str(GOLDENS / fixture))
  tokenizer = tokenizer_lib.load_pretrained_tokenizer(
      str(PLL_DIR / f'tokenizer_{GOLDEN["styles"][fixture]}'))
  return infer.Predictor(model, model.params, tokenizer)


def plls(predictor: infer.Predictor, texts, variant: str, batch_size: int) -> np.ndarray:
  return np.array([s.pll for s in infer.score_texts(predictor, texts, variant, batch_size)])


@pytest.mark.parametrize('fixture', FAMILIES)
def test_plls_equal_a_pytorch_loop_one_masked_copy_at_a_time(fixture):
  predictor = predictor_of(fixture)
  for variant in scoring.VARIANTS:  # One compiled program serves both.
    np.testing.assert_allclose(plls(predictor, GOLDEN['texts'], variant, batch_size=64),
                               GOLDEN['plls'][fixture][variant], rtol=0, atol=ATOL,
                               err_msg=variant)


def test_the_variants_differ_exactly_on_texts_with_a_word_of_several_pieces():
  tokenizer = tokenizer_lib.load_pretrained_tokenizer(str(PLL_DIR / 'tokenizer_roberta'))
  golden = GOLDEN['plls']['roberta']
  split_words = 0
  for text, original, l2r in zip(GOLDEN['texts'], golden['original'], golden['within_word_l2r']):
    words = [w for w in tokenizer(text).word_ids() if w is not None]
    split = len(set(words)) < len(words)
    assert (original != l2r) == split, text
    split_words += split
  assert 0 < split_words < len(GOLDEN['texts'])


def test_within_word_l2r_masks_the_scored_piece_and_the_later_pieces_of_its_word():
  # [CLS] un ##happ ##y cat ##s [SEP]
  sequence = scoring.Encoded(ids=np.array([2, 10, 11, 12, 13, 14, 3]),
                             scored=np.array([0, 1, 1, 1, 1, 1, 0], bool),
                             words=np.array([-1, 0, 0, 0, 1, 1, -1]))
  copies, positions = scoring.masked_copies(sequence, mask_id=4, variant='within_word_l2r')
  np.testing.assert_array_equal(positions, [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(copies, [[2, 4, 4, 4, 13, 14, 3],
                                         [2, 10, 4, 4, 13, 14, 3],
                                         [2, 10, 11, 4, 13, 14, 3],
                                         [2, 10, 11, 12, 4, 4, 3],
                                         [2, 10, 11, 12, 13, 4, 3]])
  copies, _ = scoring.masked_copies(sequence, mask_id=4, variant='original')
  np.testing.assert_array_equal(copies, np.where(np.eye(7, dtype=bool)[1:6], 4, sequence.ids))


def test_scores_do_not_depend_on_batching_or_windows():
  """Batches of 3 copies in windows of 24 (each text's copies split across batches and its
  neighbours across windows) give each text what one batch of all copies gives."""
  predictor = predictor_of('bert')
  texts = GOLDEN['texts'] * 2
  np.testing.assert_allclose(plls(predictor, texts, 'original', batch_size=3),
                             GOLDEN['plls']['bert']['original'] * 2, rtol=0, atol=ATOL)


def test_pseudo_perplexity_is_exp_of_minus_pll_per_token():
  score = scoring.Score(pll=-6.0, tokens=3)
  assert score.pseudo_perplexity == pytest.approx(math.exp(2.0))
  assert scoring.corpus_pseudo_perplexity(
      [score, scoring.Score(-2.0, 1)]) == pytest.approx(math.exp(2.0))


@pytest.mark.parametrize('texts, variant, message', [
    (['the cat', '  '], 'original', 'text 2 is empty'),
    (['the cat ' * 10], 'original', 'text 1 has 22 tokens'),
    (['\u200b'], 'original', 'has only special tokens'),  # The normalizer drops it.
    (['the cat'], 'l2r', "variant 'l2r' is not supported"),
])
def test_bad_input_is_one_user_error_naming_it(texts, variant, message):
  tokenizer = tokenizer_lib.load_pretrained_tokenizer(str(PLL_DIR / 'tokenizer_bert'))
  with pytest.raises(UserError, match=message):
    scoring.encode_texts(tokenizer, texts, max_length=14, variant=variant)


def test_a_batch_of_no_copies_is_refused_in_one_line():
  with pytest.raises(UserError, match='batch_size=0 must be at least 1; pass --batch_size'):
    validation.check_scoring('original', 0)


@pytest.fixture(scope='module')
def bert():
  return predictor_of('bert')


def _plain_loop_target_log_prob(predictor, text: str, pieces: list[int]) -> float:
  """log P(target) in the mask's place the plain way: for each piece, a copy with it and the
  later pieces masked through the model's whole forward."""
  tokenizer = predictor.tokenizer
  ids = tokenizer(text.replace('<mask>', tokenizer.mask_token))['input_ids']
  at = ids.index(tokenizer.mask_token_id)
  filled = np.array(ids[:at] + pieces + ids[at + 1:])
  total = 0.0
  for i, piece in enumerate(pieces):
    copy = filled.copy()
    copy[at + i:at + len(pieces)] = tokenizer.mask_token_id
    logits = predictor.model(copy[None], params=predictor.params).logits[0, at + i]
    total += float(jax.nn.log_softmax(logits)[piece])
  return total


def test_targets_by_pll_score_a_whole_word_and_a_one_piece_one_as_fill_mask_does(bert):
  text = 'the <mask> sat on the mat.'
  targets = ['cat', 'dog', 'cats', 'jumpers']  # 1, 1, 2 and 3 pieces.
  [[fills]] = list(infer.iter_fill_targets_by_pll(bert, [text], targets, top_k=4))
  by_target = {fill['token_str']: fill for fill in fills}
  assert sorted(by_target) == sorted(targets)
  assert [len(by_target[t]['tokens']) for t in targets] == [1, 1, 2, 3]
  assert by_target['cats']['sequence'] == 'the cats sat on the mat.'
  assert [f['score'] for f in fills] == sorted((f['score'] for f in fills), reverse=True)
  [[pipeline_fills]] = infer.fill_mask(bert, [text], top_k=2, targets=['cat', 'dog'])
  for fill in pipeline_fills:
    assert by_target[fill['token_str']]['score'] == pytest.approx(fill['score'], rel=1e-5)
  for target in ('cats', 'jumpers'):
    expected = _plain_loop_target_log_prob(bert, text, by_target[target]['tokens'])
    assert math.log(by_target[target]['score']) == pytest.approx(expected, abs=1e-4)


def test_targets_by_pll_take_texts_with_one_mask(bert):
  with pytest.raises(UserError, match='text 2 has 2 masks'):
    list(infer.iter_fill_targets_by_pll(bert, ['a <mask>', 'the <mask> <mask>'], ['cats']))


def test_cli_prints_a_json_line_per_text(tmp_path):
  """`--text` then `--input_file`'s lines, in order, from a model directory."""
  model = tmp_path / 'model'
  shutil.copytree(GOLDENS / 'distilbert', model, ignore=shutil.ignore_patterns('*.npz'))
  shutil.copytree(PLL_DIR / 'tokenizer_bert', model, dirs_exist_ok=True)
  (tmp_path / 'texts.txt').write_text('\n'.join(GOLDEN['texts'][1:]) + '\n', encoding='utf-8')
  result = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.score', f'--model={model}', '--json',
       f'--text={GOLDEN["texts"][0]}', f'--input_file={tmp_path / "texts.txt"}',
       '--variant=within_word_l2r'],
      cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED='1'), capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert [line['text'] for line in lines] == GOLDEN['texts']
  np.testing.assert_allclose([line['pll'] for line in lines],
                             GOLDEN['plls']['distilbert']['within_word_l2r'], rtol=0, atol=ATOL)
  for line in lines:
    assert line['pseudo_perplexity'] == pytest.approx(math.exp(-line['pll'] / line['tokens']))
  assert [line['tokens'] for line in lines] == [7, 11, 12, 4, 2, 5]  # Non-special tokens.
