"""Fill-mask inference on a tiny trained model, with real transformers, tokenizers, jax and orbax.

Guards the predictions (the softmax of the model called directly, the PyTorch pipeline's
tokens, scores and sequences), the sources (a workdir's checkpoints, parameters only, an
export), bounded batches whose size never changes a text's fills, batches of one padded
length whose fills come back in the texts' order, the model's length limit, one-line errors for bad texts, targets, steps and paths, and that the command line
compiles nothing for a model it has seen before, and that fill-mask is compiled with the
project's CPU options (`compiler_options`).
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, trainers

from mlm_jax import checkpoint
from mlm_jax import compiler_options
from mlm_jax import infer
from mlm_jax.errors import UserError
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import ROOT

TEXT = 'The sky is <mask> because of the sun.'
LONGER_TEXTS = (
    'A much longer text about why the sky is <mask> and what the sun does to the air, '
    'every day of the year, in every season.',
    'Another <mask> text that is rather long, with <mask> words and more tokens than the first.',
)


@pytest.fixture(scope='module')
def workdir(tiny_run):
  """A finished tiny training run (checkpoints at steps 10 and 20, and an export)."""
  return tiny_run[1]


@pytest.fixture(scope='module')
def predictor(workdir):
  return infer.load_predictor(workdir)


@pytest.fixture(scope='module')
def export_predictor(workdir):
  return infer.load_predictor(os.path.join(workdir, 'export'))


def _ids(predictor_, text):
  """The unpadded ids of `text`, with the user's <mask> spelled as the tokenizer's mask token."""
  tokenizer = predictor_.tokenizer
  return tokenizer(text.replace(infer.USER_MASK, tokenizer.mask_token))['input_ids']


def _direct_probs(predictor_, text):
  """[masks, vocab] probabilities at the mask positions, from one unpadded forward pass."""
  ids = np.asarray([_ids(predictor_, text)], np.int32)
  logits = predictor_.model(ids, params=predictor_.params).logits[0]
  positions = np.flatnonzero(ids[0] == predictor_.tokenizer.mask_token_id)
  return np.asarray(jax.nn.softmax(logits[positions].astype(np.float32), axis=-1))


def _tokens(fills):
  return [fill['token'] for fill in fills]


def _scores(fills):
  return np.asarray([fill['score'] for fill in fills])


def _assert_same_fills(actual, expected, atol=1e-5):
  assert _tokens(actual) == _tokens(expected)
  np.testing.assert_allclose(_scores(actual), _scores(expected), rtol=0, atol=atol)


# ----------------------------------------------------------------------------
# Predictions.


def test_fills_have_the_pipeline_keys_best_first(predictor):
  [[fills]] = infer.fill_mask(predictor, [TEXT], top_k=5)
  assert len(fills) == 5
  for fill in fills:
    assert set(fill) == {'score', 'token', 'token_str', 'sequence'}
    assert isinstance(fill['score'], float) and isinstance(fill['token'], int)
    assert fill['token_str'] == predictor.tokenizer.decode([fill['token']])
  scores = _scores(fills)
  assert np.all(np.diff(scores) <= 0)
  assert np.all((scores > 0) & (scores < 1))


def test_scores_and_ranking_match_softmax_of_the_flax_model_called_directly(predictor):
  [[fills]] = infer.fill_mask(predictor, [TEXT], top_k=5)
  [probs] = _direct_probs(predictor, TEXT)
  expected_tokens = np.argsort(-probs, kind='stable')[:5]
  assert _tokens(fills) == expected_tokens.tolist()
  np.testing.assert_allclose(_scores(fills), probs[expected_tokens], rtol=0, atol=1e-5)


def test_latest_checkpoint_is_the_default_step(workdir, predictor):
  latest = checkpoint.make_manager(workdir, keep=None, create=False).latest_step()
  at_latest = infer.load_predictor(workdir, step=latest)
  _assert_same_fills(infer.fill_mask(at_latest, [TEXT], top_k=5)[0][0],
                     infer.fill_mask(predictor, [TEXT], top_k=5)[0][0])


def test_earlier_step_loads_that_checkpoint_and_predicts_differently(workdir, predictor):
  steps = sorted(checkpoint.make_manager(workdir, keep=None, create=False).all_steps())
  assert len(steps) >= 2, steps
  earlier = infer.load_predictor(workdir, step=steps[0])
  [[fills]] = infer.fill_mask(earlier, [TEXT], top_k=5)
  [probs] = _direct_probs(earlier, TEXT)
  np.testing.assert_allclose(_scores(fills), np.sort(probs)[::-1][:5], rtol=0, atol=1e-5)
  [[latest_fills]] = infer.fill_mask(predictor, [TEXT], top_k=5)
  assert (_tokens(fills) != _tokens(latest_fills)
          or np.abs(_scores(fills) - _scores(latest_fills)).max() > 1e-4)


def test_export_dir_predicts_like_the_latest_checkpoint(predictor, export_predictor):
  assert isinstance(export_predictor.model, FlaxAutoModelForMaskedLM)
  _assert_same_fills(infer.fill_mask(export_predictor, [TEXT], top_k=5)[0][0],
                     infer.fill_mask(predictor, [TEXT], top_k=5)[0][0])


def test_two_masks_give_one_list_per_mask_ranked_at_its_own_position(predictor):
  text = 'Why is the <mask> blue? Because of the <mask>.'
  [per_mask] = infer.fill_mask(predictor, [text], top_k=4)
  assert len(per_mask) == 2
  probs = _direct_probs(predictor, text)
  for fills, mask_probs in zip(per_mask, probs):
    expected = np.argsort(-mask_probs, kind='stable')[:4]
    assert _tokens(fills) == expected.tolist()
    np.testing.assert_allclose(_scores(fills), mask_probs[expected], rtol=0, atol=1e-5)


def test_sequence_skips_special_tokens_for_one_mask_only_as_the_pipeline_does(predictor):
  tokenizer = predictor.tokenizer
  for text, single in ((TEXT, True), ('Why is the <mask> blue? Because of the <mask>.', False)):
    ids = np.asarray(_ids(predictor, text))
    positions = np.flatnonzero(ids == tokenizer.mask_token_id)
    [per_mask] = infer.fill_mask(predictor, [text], top_k=3)
    for position, fills in zip(positions, per_mask):
      for fill in fills:
        filled = ids.copy()
        filled[position] = fill['token']
        assert fill['sequence'] == tokenizer.decode(filled, skip_special_tokens=single)
        # With two masks, the other mask and <s> ... </s> stay visible.
        assert (tokenizer.mask_token in fill['sequence']) == (not single)
        assert fill['sequence'].startswith(tokenizer.bos_token) == (not single)


def test_batching_with_longer_texts_does_not_change_a_texts_fills(predictor):
  lengths = [len(_ids(predictor, t)) for t in (TEXT, *LONGER_TEXTS)]
  assert infer._bucket(lengths[0]) < infer._bucket(max(lengths))  # Really padded differently.
  [[alone]] = infer.fill_mask(predictor, [TEXT], top_k=5)
  batched = infer.fill_mask(predictor, [LONGER_TEXTS[0], TEXT, LONGER_TEXTS[1]], top_k=5)
  assert [len(masks) for masks in batched] == [1, 1, 2]
  _assert_same_fills(batched[1][0], alone)


def test_texts_run_in_batches_of_at_most_batch_size(predictor):
  encoded = infer.encode(predictor.tokenizer, [TEXT] * 1025, max_length=512)
  batches = list(infer.padded_batches(predictor.tokenizer, encoded, batch_size=64))
  assert [len(b.encoded) for b in batches] == [64] * 16 + [1]
  assert max(b.ids.shape[0] for b in batches) == 64 and batches[-1].ids.shape[0] == 1


def test_fills_do_not_depend_on_the_batch_size(predictor):
  texts = [TEXT, *LONGER_TEXTS, 'Why is the <mask> blue?', 'The <mask> is wet.']
  for alone, batched in zip(infer.fill_mask(predictor, texts, top_k=3),
                            infer.fill_mask(predictor, texts, top_k=3, batch_size=2)):
    for alone_fills, batched_fills in zip(alone, batched):
      _assert_same_fills(batched_fills, alone_fills)


def test_texts_of_similar_length_share_a_batch_whatever_their_order(predictor):
  short, long = _ids(predictor, TEXT), _ids(predictor, LONGER_TEXTS[0])
  assert infer._bucket(len(short)) < infer._bucket(len(long))
  encoded = [long, short, long, short]
  batches = list(infer.padded_batches(predictor.tokenizer, encoded, batch_size=2))
  assert [b.order for b in batches] == [[1, 3], [0, 2]]
  assert [b.encoded for b in batches] == [[short, short], [long, long]]
  assert [b.ids.shape[1] for b in batches] == [infer._bucket(len(short)),
                                               infer._bucket(len(long))]


def test_a_batch_holds_one_padded_length_unless_its_bucket_has_few_texts():
  """Batch size 8 (a quarter: 2): 5 texts padded to 16 make a batch alone; the one text
  padded to 24 is too few, so it joins the 6 padded to 32 (fixed batches of 8 would pad 5
  texts of 16 tokens and one of 20 to 32)."""
  lengths = [30, 12, 28, 12, 20, 30, 12, 32, 12, 30, 29, 12]
  assert [infer._bucket(n) for n in (12, 20, 30)] == [16, 24, 32]
  batches = infer.length_batches(lengths, batch_size=8)
  assert batches == [[1, 3, 6, 8, 11], [4, 2, 10, 0, 5, 9, 7]]
  assert infer.length_batches([40] * 20, batch_size=8) == [list(range(8)), list(range(8, 16)),
                                                         list(range(16, 20))]


def test_fills_come_back_in_the_texts_order_across_sorted_windows(predictor, monkeypatch):
  """Windows of one batch of 2: the texts are reordered by length within each window, and
  every text's fills still come back at its own place."""
  monkeypatch.setattr(infer, 'SORTED_BATCHES', 1)
  texts = [LONGER_TEXTS[0], TEXT, 'The <mask> is wet.', *LONGER_TEXTS[::-1]]
  streamed = list(infer.iter_fill_mask(predictor, texts, top_k=3, batch_size=2))
  assert len(streamed) == len(texts)
  for text, masks in zip(texts, streamed):
    for fills, alone in zip(masks, infer.fill_mask(predictor, [text], top_k=3)[0], strict=True):
      _assert_same_fills(fills, alone)


def test_a_text_longer_than_the_models_positions_is_refused_by_its_number(predictor):
  """The limit is the model's (514 positions: 512 tokens), whatever the tokenizer says."""
  tokenizer = copy.deepcopy(predictor.tokenizer)
  tokenizer.model_max_length = 2048
  longer = dataclasses.replace(predictor, tokenizer=tokenizer)
  with pytest.raises(UserError, match=r'^text 2 has \d+ tokens; .* at most 512: shorten it$'):
    infer.fill_mask(longer, [TEXT, 'sky ' * 600 + '<mask>'])


def test_a_workdir_restores_its_parameters_alone(workdir, predictor):
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params = checkpoint.restore_params(workdir, None, device)
  assert set(params) == set(predictor.model.params_shape_tree)  # No optimizer state.
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(predictor.params)):
    np.testing.assert_array_equal(a, b)


def test_targets_rank_only_the_target_ids_with_their_full_vocabulary_probability(predictor):
  target_ids = [100, 200, 300]
  targets = predictor.tokenizer.convert_ids_to_tokens(target_ids)
  [[fills]] = infer.fill_mask(predictor, [TEXT], top_k=5, targets=targets)
  assert len(fills) == len(targets)  # top_k capped at the number of targets.
  assert sorted(_tokens(fills)) == target_ids
  assert np.all(np.diff(_scores(fills)) <= 0)
  [probs] = _direct_probs(predictor, TEXT)
  np.testing.assert_allclose(_scores(fills), probs[_tokens(fills)], rtol=0, atol=1e-5)


def test_targets_with_top_k_below_their_number_keep_the_best(predictor):
  target_ids = [100, 200, 300, 350]
  targets = predictor.tokenizer.convert_ids_to_tokens(target_ids)
  [[fills]] = infer.fill_mask(predictor, [TEXT], top_k=2, targets=targets)
  [probs] = _direct_probs(predictor, TEXT)
  best = sorted(target_ids, key=lambda i: -probs[i])[:2]
  assert _tokens(fills) == best


@pytest.fixture(scope='module')
def bracket_mask_predictor():
  """A WordLevel tokenizer whose mask token is '[MASK]', and a tiny random RoBERTa for it."""
  backend = tokenizers.Tokenizer(models.WordLevel(unk_token='[UNK]'))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.train_from_iterator(
      ['a b c d e f g', 'a b c'],
      trainers.WordLevelTrainer(special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']))
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, mask_token='[MASK]', pad_token='[PAD]', unk_token='[UNK]',
      cls_token='[CLS]', sep_token='[SEP]')
  config = transformers.RobertaConfig(
      vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=16, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id)
  model = FlaxAutoModelForMaskedLM.from_config(config, _do_init=False)
  # Random weights drawn directly: cheaper than compiling the model's initializer.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda leaf: (rng.normal(size=leaf.shape) * 0.5).astype(
      leaf.dtype), model.params_shape_tree)
  return infer.Predictor(model, params, tokenizer)


def test_user_mask_is_mapped_to_a_differently_spelled_mask_token(bracket_mask_predictor):
  tokenizer = bracket_mask_predictor.tokenizer
  assert tokenizer.mask_token == '[MASK]' and infer.USER_MASK not in tokenizer.get_vocab()
  vocab_size = len(tokenizer)
  [[fills]] = infer.fill_mask(bracket_mask_predictor, ['a <mask> b'], top_k=vocab_size)
  assert len(fills) == vocab_size
  ids = np.asarray([tokenizer.convert_tokens_to_ids(['a', '[MASK]', 'b'])], np.int32)
  logits = bracket_mask_predictor.model(ids, params=bracket_mask_predictor.params).logits
  probs = np.asarray(jax.nn.softmax(logits[0, 1]))  # The mask is the second token.
  np.testing.assert_allclose(_scores(fills), probs[_tokens(fills)], rtol=0, atol=1e-5)
  special = set(tokenizer.all_special_ids)
  for fill in fills:
    if fill['token'] not in special:
      assert fill['sequence'] == f'a {fill["token_str"]} b'


def test_same_padded_shape_reuses_the_compiled_forward(predictor):
  first, second = 'The sky is <mask> blue.', 'The sea is <mask> green.'
  lengths = [len(_ids(predictor, t)) for t in (first, second)]
  assert lengths[0] != lengths[1] and infer._bucket(lengths[0]) == infer._bucket(lengths[1])
  [[first_fills]] = infer.fill_mask(predictor, [first], top_k=5)
  cache_size = getattr(predictor.top_k_at, '_cache_size', None)
  before = cache_size() if cache_size else None
  [[second_fills]] = infer.fill_mask(predictor, [second], top_k=5)
  assert first_fills[0]['sequence'] != second_fills[0]['sequence']
  if cache_size is None:
    pytest.skip(f'jax {jax.__version__} has no jit _cache_size() to count compilations')
  assert before >= 1
  assert cache_size() == before


def test_fill_mask_is_compiled_with_the_cpu_options(predictor, monkeypatch):
  """An option XLA does not know makes compiling fail: seen, it reached the compiler (past
  the probe that would drop it)."""
  monkeypatch.setattr(compiler_options, '_CPU', {'not_an_xla_option': 1})
  monkeypatch.setattr(compiler_options, 'accepted', dict)
  fresh = infer.Predictor(predictor.model, predictor.params, predictor.tokenizer)
  with pytest.raises(jax.errors.JaxRuntimeError, match='not_an_xla_option'):
    infer.fill_mask(fresh, ['The sky is <mask> blue.'])


# ----------------------------------------------------------------------------
# Bad input.


def test_text_without_mask_is_a_user_error(predictor):
  with pytest.raises(UserError, match=r"text 2 \('No mask here.'\) has no mask token; write <mask>"):
    infer.fill_mask(predictor, [TEXT, 'No mask here.'])


@pytest.mark.parametrize('text', ['', '   '])
def test_empty_text_is_a_user_error(predictor, text):
  with pytest.raises(UserError, match='text 1 is empty'):
    infer.fill_mask(predictor, [text])


def test_directory_without_checkpoint_or_model_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='holds neither a checkpoint nor a model'):
    infer.load_predictor(str(tmp_path))


@pytest.mark.parametrize('model, says', [
    ('nonexistent-dir', 'is not a model directory; pass a directory with config.json or a hub id'),
    ('no-such-user/no-such-model', 'could not fetch .* from the hub .*; pass a hub id you can '
     'reach or a local model directory')])
def test_missing_path_or_unknown_hub_id_is_a_user_error(tmp_path, model, says):
  if model == 'nonexistent-dir':
    model = str(tmp_path / model)
  with pytest.raises(UserError, match=says):
    infer.load_predictor(model)


def test_missing_step_is_a_user_error_listing_the_available_steps(workdir):
  steps = sorted(checkpoint.make_manager(workdir, keep=None, create=False).all_steps())
  with pytest.raises(UserError) as error:
    infer.load_predictor(workdir, step=7)
  assert 'no checkpoint at step 7' in str(error.value)
  assert f'available steps: {", ".join(map(str, steps))}' in str(error.value)


@pytest.mark.parametrize('top_k', [0, -1])
def test_top_k_below_one_is_a_user_error(predictor, top_k):
  with pytest.raises(UserError, match=f'top_k={top_k} must be at least 1'):
    infer.fill_mask(predictor, [TEXT], top_k=top_k)


def test_targets_none_of_which_are_in_the_vocabulary_are_a_user_error(predictor):
  # A byte-level BPE spells every non-empty string; only an empty target has no token.
  with pytest.raises(UserError, match=r"none of the targets \['', ''\] is in the vocabulary"):
    infer.fill_mask(predictor, [TEXT], targets=['', ''])


# ----------------------------------------------------------------------------
# The command line.


def _run_infer(*args, env: dict | None = None):
  return subprocess.run([sys.executable, str(ROOT / 'run_infer.py'), *args], cwd=ROOT,
                        env=env or dict(os.environ), capture_output=True, text=True, timeout=600,
                        check=False)


_FILE_TEXTS = ['The sky is <mask> blue.', 'Why is <mask> wet?']


@pytest.fixture(scope='module')
def cli_json(workdir, tmp_path_factory) -> list[dict]:
  """`run_infer.py --json` on one --text and an --input_file of two more texts, in batches
  of two: the JSON is streamed batch by batch and must still be one document."""
  input_file = tmp_path_factory.mktemp('cli') / 'texts.txt'
  input_file.write_text('\n'.join(_FILE_TEXTS) + '\n', encoding='utf-8')
  result = _run_infer(f'--model={workdir}', f'--text={TEXT}', f'--input_file={input_file}',
                      '--top_k=3', '--json', '--batch_size=2')
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout)


def test_cli_prints_json_with_top_k_fills(cli_json, predictor):
  entry = cli_json[0]
  assert entry['text'] == TEXT
  [fills] = entry['masks']
  assert len(fills) == 3
  _assert_same_fills(fills, infer.fill_mask(predictor, [TEXT], top_k=3)[0][0])


def test_cli_reads_one_text_per_line_of_input_file_after_the_texts(cli_json):
  assert [entry['text'] for entry in cli_json[1:]] == _FILE_TEXTS
  assert all(len(entry['masks']) == 1 and len(entry['masks'][0]) == 3 for entry in cli_json)


def test_cli_table_names_the_predicted_tokens(workdir, predictor):
  result = _run_infer(f'--model={workdir}', f'--text={TEXT}', '--top_k=3')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0] == TEXT
  for rank, fill in enumerate(infer.fill_mask(predictor, [TEXT], top_k=3)[0][0], start=1):
    assert any(line.strip().startswith(f'{rank}.') and repr(fill['token_str']) in line
               and fill['sequence'] in line for line in lines), (fill, result.stdout)


def test_cli_text_without_mask_exits_2_with_a_one_line_error(workdir):
  result = _run_infer(f'--model={workdir}', '--text=No mask here.')
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error:') and 'no mask token' in last
  assert 'Traceback' not in result.stderr


def test_cli_run_on_a_model_seen_before_compiles_nothing(workdir, tmp_path):
  """Every program the first run compiles lands in `$MLM_JAX_CACHE/jax` (the tests' own
  JAX_COMPILATION_CACHE_DIR unset), and the second run adds none: it compiled nothing anew.
  Breaks if run_infer.py stops using the cache."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['MLM_JAX_CACHE'] = str(tmp_path)
  programs = lambda: sorted(p.name for p in (tmp_path / 'jax').iterdir())
  assert _run_infer(f'--model={workdir}', f'--text={TEXT}', env=env).returncode == 0
  first = programs()
  assert first
  assert _run_infer(f'--model={workdir}', f'--text={TEXT}', env=env).returncode == 0
  assert programs() == first


# ----------------------------------------------------------------------------
# Parity with the transformers PyTorch pipeline (only where torch is installed).


@pytest.mark.parametrize('targets', [None, ['the', 'sky', ' blue', ' sun']],
                         ids=['all-vocabulary', 'targets'])
def test_matches_the_pytorch_fill_mask_pipeline(workdir, export_predictor, targets):
  pytest.importorskip('torch')
  export = os.path.join(workdir, 'export')
  pipe = transformers.pipeline(
      'fill-mask', model=transformers.AutoModelForMaskedLM.from_pretrained(export),
      tokenizer=export)
  for text in (TEXT, 'Why is the <mask> blue?', '<mask> is the colour of the sky.'):
    expected = pipe(text.replace(infer.USER_MASK, pipe.tokenizer.mask_token), top_k=3,
                    targets=targets)
    [[actual]] = infer.fill_mask(export_predictor, [text], top_k=3, targets=targets)
    assert _tokens(actual) == _tokens(expected), text
    np.testing.assert_allclose(_scores(actual), _scores(expected), rtol=0, atol=1e-4)
    assert [f['sequence'] for f in actual] == [f['sequence'] for f in expected]
    assert [f['token_str'] for f in actual] == [f['token_str'] for f in expected]


def test_a_folder_with_checkpoints_but_no_model_config_is_a_user_error(tmp_path):
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(UserError, match='no model/config.json'):
    infer.load_predictor(str(tmp_path))
