"""From raw ELI5-style sources to cached token blocks: data.py, tokenizer.py, input checks.

Guards the guide's preprocessing (answers joined, documents concatenated and cut, each
document's own <s>/</s>), special-token strings in the text staying text, the block
cache (hit only for the same contents, tokenizer and block size), the tokenizer trained
from scratch or loaded, and a one-line error for each bad source.
"""

import csv
import json
import re

import datasets
import numpy as np
import pytest
import transformers

from mlm_jax import data, masking, model
from mlm_jax import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError

# Three ELI5 examples; the expected texts are computed by hand: each example's
# answers.text joined with one space (empty answers are skipped).
ELI5_RECORDS = [
    {'q_id': 'q1', 'title': 'Why is the sky blue?', 'selftext': '', 'category': 'Physics',
     'subreddit': 'askscience',
     'answers': {'a_id': ['q1_1', 'q1_2'],
                 'text': ['Air scatters blue light more than red light.',
                          'So blue light reaches your eyes from every direction.'],
                 'score': [12, 3]}},
    {'q_id': 'q2', 'title': 'Why do cats purr?', 'selftext': 'Asking for a friend.',
     'category': 'Biology', 'subreddit': 'explainlikeimfive',
     'answers': {'a_id': ['q2_1'], 'text': ['Purring is a signal that they are calm.'],
                 'score': [7]}},
    {'q_id': 'q3', 'title': 'What is inflation?', 'selftext': '', 'category': 'Economics',
     'subreddit': 'explainlikeimfive',
     'answers': {'a_id': ['q3_1', 'q3_2', 'q3_3'],
                 'text': ['Prices rise.', 'Money buys less.', 'Wages may lag behind.'],
                 'score': [5, 4, 1]}},
]
ELI5_TEXTS = [
    'Air scatters blue light more than red light. '
    'So blue light reaches your eyes from every direction.',
    'Purring is a signal that they are calm.',
    'Prices rise. Money buys less. Wages may lag behind.',
]


def read_sample() -> list[dict]:
  with open(data.sample_data_path(), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def write_jsonl(path, records) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
  return str(path)


def all_texts(splits: datasets.DatasetDict) -> list[str]:
  return sorted(list(splits['train']['text']) + list(splits['test']['text']))


@pytest.fixture(scope='module')
def tokenizer():
  """A byte-level BPE with 300 tokens, trained on 400 sentences of the shipped sample."""
  sentences = []
  for record in read_sample():
    for answer in record['answers']['text']:
      sentences.extend(s for s in re.split(r'(?<=[.!?])\s+', answer) if s)
  return tokenizer_lib.train_bpe_tokenizer(sentences[:400], vocab_size=300,
                                           model_max_length=512)


@pytest.fixture
def eli5_jsonl(tmp_path):
  """The first 20 examples of the shipped sample as a JSONL file."""
  return write_jsonl(tmp_path / 'eli5.jsonl', read_sample()[:20])


# ----------------------------------------------------------------------------
# to_texts


def test_to_texts_joins_each_examples_answers_with_a_space():
  texts = data.to_texts(datasets.Dataset.from_list(ELI5_RECORDS))
  assert texts.column_names == ['text']
  assert list(texts['text']) == ELI5_TEXTS


def test_to_texts_skips_empty_answers_when_joining():
  record = {'q_id': 'q', 'answers': {'a_id': ['1', '2', '3'], 'text': ['x y', '', 'z'],
                                     'score': [1, 2, 3]}}
  assert list(data.to_texts(datasets.Dataset.from_list([record]))['text']) == ['x y z']


def test_to_texts_passes_a_plain_text_column_through():
  plain = datasets.Dataset.from_dict({'text': ['first document', 'second one'],
                                      'id': [1, 2]})
  texts = data.to_texts(plain)
  assert texts.column_names == ['text']
  assert list(texts['text']) == ['first document', 'second one']


# ----------------------------------------------------------------------------
# texts_to_blocks and make_blocks


def test_texts_to_blocks_concatenates_and_cuts_dropping_the_remainder(tokenizer):
  texts = datasets.Dataset.from_dict({'text': ELI5_TEXTS})
  block_size = 7
  ids = [i for text in ELI5_TEXTS for i in tokenizer(text)['input_ids']]
  assert len(ids) % block_size, 'the data must leave a remainder for this test'

  blocks = data.texts_to_blocks(texts, tokenizer, block_size)

  assert blocks.dtype == np.int32
  assert blocks.shape == (len(ids) // block_size, block_size)
  np.testing.assert_array_equal(blocks.ravel(), ids[:blocks.size])


def test_texts_to_blocks_keeps_each_documents_own_s_and_end_tokens(tokenizer):
  texts = datasets.Dataset.from_dict({'text': ['one', 'two']})
  one, two = (tokenizer(t)['input_ids'] for t in ('one', 'two'))
  blocks = data.texts_to_blocks(texts, tokenizer, len(one) + len(two))
  assert blocks.tolist() == [one + two]
  assert one[0] == two[0] == 0 and one[-1] == two[-1] == 2


def test_special_token_strings_in_the_text_are_tokenized_as_text(tokenizer):
  """A literal <mask>, <pad> or </s> in the data would be an id masking never trains on (and
  a pad id shifts RoBERTa's position ids): only the tokenizer's own wrapping is special."""
  texts = datasets.Dataset.from_dict({'text': ['Write <mask> or <pad> or </s> or <s> here.']})
  [block] = data.texts_to_blocks(texts, tokenizer, block_size=1)[None].reshape(1, -1)
  special = set(tokenizer.all_special_ids)
  assert [i for i, token in enumerate(block) if token in special] == [0, len(block) - 1]
  assert tokenizer.decode(block[1:-1]) == 'Write <mask> or <pad> or </s> or <s> here.'


def test_make_blocks_second_call_is_a_cache_hit(tiny_config, tokenizer, eli5_jsonl):
  tiny_config.data_files = eli5_jsonl
  tiny_config.block_size = 16
  splits = data.load_texts(tiny_config, log=lambda _: None)
  messages = []

  first = data.make_blocks(tiny_config, tokenizer, splits, log=messages.append)
  assert not messages  # Tokenized afresh.
  second = data.make_blocks(tiny_config, tokenizer, splits, log=messages.append)

  np.testing.assert_array_equal(first.train, second.train)
  np.testing.assert_array_equal(first.test, second.test)
  np.testing.assert_array_equal(first.train, data.texts_to_blocks(splits['train'], tokenizer, 16))
  np.testing.assert_array_equal(first.test, data.texts_to_blocks(splits['test'], tokenizer, 16))
  assert len(messages) == 1 and 'cache' in messages[0]


def test_make_blocks_with_another_block_size_is_a_cache_miss(tiny_config, tokenizer, eli5_jsonl):
  tiny_config.data_files = eli5_jsonl
  tiny_config.block_size = 16
  splits = data.load_texts(tiny_config, log=lambda _: None)
  data.make_blocks(tiny_config, tokenizer, splits, log=lambda _: None)

  tiny_config.block_size = 8
  messages = []
  blocks = data.make_blocks(tiny_config, tokenizer, splits, log=messages.append)

  assert not messages  # Not 'Loaded tokenized blocks from the cache'.
  assert blocks.train.shape[1] == 8


def test_make_blocks_cache_is_keyed_by_file_contents(tiny_config, tokenizer, tmp_path):
  path = tmp_path / 'eli5.jsonl'
  tiny_config.data_files = write_jsonl(path, read_sample()[:20])
  tiny_config.block_size = 16
  data.make_blocks(tiny_config, tokenizer, data.load_texts(tiny_config, log=lambda _: None),
                   log=lambda _: None)

  write_jsonl(path, read_sample()[20:40])
  splits = data.load_texts(tiny_config, log=lambda _: None)
  messages = []
  blocks = data.make_blocks(tiny_config, tokenizer, splits, log=messages.append)

  assert not messages  # Not 'Loaded tokenized blocks from the cache'.
  np.testing.assert_array_equal(blocks.train, data.texts_to_blocks(splits['train'], tokenizer, 16))


def test_make_blocks_cache_notices_changed_files_in_a_dataset_directory(
    tiny_config, tokenizer, tmp_path):
  directory = tmp_path / 'eli5_dir'
  directory.mkdir()
  tiny_config.dataset = str(directory)
  tiny_config.block_size = 16
  write_jsonl(directory / 'train.jsonl', read_sample()[:20])
  data.make_blocks(tiny_config, tokenizer, data.load_texts(tiny_config, log=lambda _: None),
                   log=lambda _: None)

  write_jsonl(directory / 'train.jsonl', read_sample()[20:40])
  splits = data.load_texts(tiny_config, log=lambda _: None)
  blocks = data.make_blocks(tiny_config, tokenizer, splits, log=lambda _: None)

  np.testing.assert_array_equal(blocks.train, data.texts_to_blocks(splits['train'], tokenizer, 16))


# ----------------------------------------------------------------------------
# load_texts: one code path for every local format


def _write_jsonl(path):
  write_jsonl(path, ELI5_RECORDS)


def _write_json(path):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(ELI5_RECORDS, f, indent=2)


def _write_parquet(path):
  datasets.Dataset.from_list(ELI5_RECORDS).to_parquet(str(path))


def _write_csv(path):
  """CSV cannot nest: a flattened `answers.text` column holds the joined answers."""
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['q_id', 'title', 'answers.text'])
    for record in ELI5_RECORDS:
      writer.writerow([record['q_id'], record['title'], ' '.join(record['answers']['text'])])


def _write_txt(path):
  path.write_text(''.join(text + '\n' for text in ELI5_TEXTS), encoding='utf-8')


@pytest.mark.parametrize('extension, write', [
    ('jsonl', _write_jsonl), ('json', _write_json), ('parquet', _write_parquet),
    ('csv', _write_csv), ('txt', _write_txt)])
def test_load_texts_reads_the_same_eli5_data_from_every_format(
    tiny_config, tmp_path, extension, write):
  path = tmp_path / f'eli5.{extension}'
  write(path)
  tiny_config.data_files = str(path)

  splits = data.load_texts(tiny_config, log=lambda _: None)

  assert splits['train'].column_names == splits['test'].column_names == ['text']
  assert all_texts(splits) == sorted(ELI5_TEXTS)


def test_load_texts_accepts_a_plain_text_column_in_csv(tiny_config, tmp_path):
  path = tmp_path / 'plain.csv'
  path.write_text('text,source\n' + ''.join(f'"{t}",web\n' for t in ELI5_TEXTS),
                  encoding='utf-8')
  tiny_config.data_files = str(path)
  assert all_texts(data.load_texts(tiny_config, log=lambda _: None)) == sorted(ELI5_TEXTS)


def test_load_texts_expands_comma_separated_globs(tiny_config, tmp_path):
  write_jsonl(tmp_path / 'part-1.jsonl', ELI5_RECORDS[:2])
  write_jsonl(tmp_path / 'part-2.jsonl', ELI5_RECORDS[2:])
  tiny_config.data_files = f'{tmp_path}/part-1.jsonl, {tmp_path}/part-2*.jsonl'
  assert all_texts(data.load_texts(tiny_config, log=lambda _: None)) == sorted(ELI5_TEXTS)


# ----------------------------------------------------------------------------
# The embedded sample


def test_sample_has_enough_eli5_questions_and_answer_text():
  records = read_sample()
  answer_bytes = sum(len(t.encode('utf-8')) for r in records for t in r['answers']['text'])
  assert len(records) >= 300
  assert answer_bytes >= 100_000
  assert len({r['q_id'] for r in records}) == len(records)


def test_sample_follows_the_eli5_schema():
  records = read_sample()
  for record in records:
    assert set(record) == {'q_id', 'title', 'selftext', 'category', 'subreddit', 'answers'}
    answers = record['answers']
    assert set(answers) == {'a_id', 'text', 'score'}
    assert len(answers['a_id']) == len(answers['text']) == len(answers['score']) >= 1
    assert all(isinstance(t, str) and t for t in answers['text'])
  assert len({r['category'] for r in records}) >= 5


def test_empty_data_files_and_dataset_load_the_sample(tiny_config):
  tiny_config.data_files = ''
  tiny_config.dataset = ''
  tiny_config.split = 'train'
  records = read_sample()

  splits = data.load_texts(tiny_config, log=lambda _: None)

  assert data.source_of(tiny_config) == {'kind': 'files', 'files': [data.sample_data_path()]}
  assert len(splits['test']) == round(len(records) * tiny_config.test_size)
  assert all_texts(splits) == sorted(' '.join(r['answers']['text']) for r in records)


# ----------------------------------------------------------------------------
# The hub code path, through local directories


def test_load_hub_dataset_loads_a_local_dataset_directory(tmp_path):
  write_jsonl(tmp_path / 'train.jsonl', ELI5_RECORDS)
  messages = []

  dataset = data.load_hub_dataset(str(tmp_path), '', 'train', log=messages.append)

  assert len(dataset) == len(ELI5_RECORDS)
  assert list(data.to_texts(dataset)['text']) == ELI5_TEXTS
  assert not messages


def test_config_dataset_goes_through_the_hub_path(tiny_config, tmp_path):
  directory = tmp_path / 'eli5_dir'
  directory.mkdir()
  write_jsonl(directory / 'train.jsonl', ELI5_RECORDS)
  tiny_config.dataset = str(directory)

  assert data.source_of(tiny_config)['kind'] == 'hub'
  assert all_texts(data.load_texts(tiny_config, log=lambda _: None)) == sorted(ELI5_TEXTS)


def test_load_hub_dataset_that_cannot_be_loaded_says_to_pass_local_files(tmp_path):
  missing = str(tmp_path / 'no_such_dataset')  # A path: a hub id would wait on the network.
  with pytest.raises(UserError, match=r'no_such_dataset.*pass local files .*--config\.data_files'):
    data.load_hub_dataset(missing, '', 'train', log=lambda _: None)


@pytest.fixture
def script_dataset_dir(tmp_path):
  """A local dataset directory holding only a loading script, `name/name.py`."""
  directory = tmp_path / 'eli5_script'
  directory.mkdir()
  (directory / 'eli5_script.py').write_text(
      'import datasets\n\n'
      'class Eli5Script(datasets.GeneratorBasedBuilder):\n'
      '  def _info(self):\n'
      '    return datasets.DatasetInfo(features=datasets.Features(\n'
      '        {"text": datasets.Value("string")}))\n'
      '  def _split_generators(self, dl_manager):\n'
      '    return [datasets.SplitGenerator(name="train")]\n'
      '  def _generate_examples(self):\n'
      '    yield 0, {"text": "hello"}\n')
  return str(directory)


def test_datasets_refuses_dataset_scripts(script_dataset_dir):
  """The premise of load_hub_dataset's fallback: `datasets` 4+ rejects loading scripts."""
  with pytest.raises(Exception, match='Dataset scripts are no longer supported'):
    datasets.load_dataset(script_dataset_dir, split='train')


def test_load_hub_dataset_falls_back_to_parquet_for_script_datasets(script_dataset_dir):
  messages = []
  with pytest.raises(UserError, match=r'parquet conversion.*--config\.data_files'):
    data.load_hub_dataset(script_dataset_dir, '', 'train', log=messages.append)
  assert len(messages) == 1
  assert '\n' not in messages[0]
  assert 'script-based' in messages[0] and 'refs/convert/parquet' in messages[0]


# ----------------------------------------------------------------------------
# split_train_test


def test_split_train_test_uses_test_size():
  splits = data.split_train_test(datasets.Dataset.from_dict({'i': list(range(20))}), 0.25, 0)
  assert len(splits['test']) == 5 and len(splits['train']) == 15
  assert sorted(list(splits['train']['i']) + list(splits['test']['i'])) == list(range(20))


def test_split_train_test_is_deterministic_for_a_seed():
  dataset = datasets.Dataset.from_dict({'i': list(range(50))})
  first = data.split_train_test(dataset, 0.2, seed=3)
  again = data.split_train_test(dataset, 0.2, seed=3)
  other = data.split_train_test(dataset, 0.2, seed=4)
  assert list(first['test']['i']) == list(again['test']['i'])
  assert list(first['train']['i']) == list(again['train']['i'])
  assert list(first['test']['i']) != list(other['test']['i'])


# ----------------------------------------------------------------------------
# The tokenizer


def test_trained_tokenizer_has_robertas_special_token_ids(tokenizer):
  ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer_lib.SPECIAL_TOKENS}
  assert ids == {'<s>': 0, '<pad>': 1, '</s>': 2, '<unk>': 3, '<mask>': 4}
  assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
          tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
  assert tokenizer_lib.special_token_ids(tokenizer) == (0, 1, 2, 3, 4)
  assert len(tokenizer) == 300


def test_trained_tokenizer_wraps_each_sequence_in_s_and_end_tokens(tokenizer):
  ids = tokenizer('The sky is blue.')['input_ids']
  assert ids[0] == 0 and ids[-1] == 2
  assert not set(ids[1:-1]) & {0, 1, 2, 3, 4}
  assert tokenizer.decode(ids[1:-1]) == 'The sky is blue.'


def test_get_tokenizer_saves_to_workdir_and_reloads_it(tiny_config, tmp_path):
  tiny_config.tokenizer_vocab_size = 300
  workdir = str(tmp_path / 'run')
  texts = ELI5_TEXTS * 20
  probe = ['The sky is blue.', 'a <mask> b', 'Purring is calm.']

  trained = tokenizer_lib.get_tokenizer(tiny_config, workdir, texts)
  tokenizer_lib.save_tokenizer(trained, workdir)
  reloaded = tokenizer_lib.get_tokenizer(tiny_config, workdir, train_texts=None)

  assert (tmp_path / 'run' / 'tokenizer' / 'tokenizer_config.json').exists()
  assert isinstance(reloaded, transformers.PreTrainedTokenizerFast)
  assert reloaded(probe)['input_ids'] == trained(probe)['input_ids']
  assert reloaded.mask_token_id == trained.mask_token_id == 4
  assert len(reloaded) == len(trained)


# ----------------------------------------------------------------------------
# Bad input: each a UserError naming the input


def test_missing_data_file_is_a_user_error(tiny_config, tmp_path):
  tiny_config.data_files = str(tmp_path / 'nope.jsonl')
  with pytest.raises(UserError, match=r"'.*nope\.jsonl' does not exist"):
    data.load_texts(tiny_config, log=lambda _: None)


def test_columns_without_text_are_a_user_error(tiny_config, tmp_path):
  tiny_config.data_files = write_jsonl(tmp_path / 'qa.jsonl', [
      {'question': 'Why?', 'body': 'Because.'}, {'question': 'How?', 'body': 'Like so.'}])
  with pytest.raises(UserError, match=r'no text: columns are (body, question|question, body)'):
    data.load_texts(tiny_config, log=lambda _: None)


def test_malformed_jsonl_line_is_a_user_error_naming_the_line(tiny_config, tmp_path):
  path = tmp_path / 'broken.jsonl'
  path.write_text(json.dumps(ELI5_RECORDS[0]) + '\n' + json.dumps(ELI5_RECORDS[1]) + '\n'
                  + '{"q_id": "q3", "answers": oops}\n', encoding='utf-8')
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'broken\.jsonl, line 3'):
    data.load_texts(tiny_config, log=lambda _: None)


def test_jsonl_line_that_is_not_an_object_is_a_user_error(tiny_config, tmp_path):
  path = tmp_path / 'arrays.jsonl'
  path.write_text('{"text": "fine"}\n[1, 2]\n', encoding='utf-8')
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'arrays\.jsonl, line 2: not a JSON object'):
    data.load_texts(tiny_config, log=lambda _: None)


def test_malformed_json_array_is_a_user_error_naming_the_bad_line(tiny_config, tmp_path):
  lines = json.dumps(ELI5_RECORDS, indent=2).splitlines()
  lines[6] += ' oops'  # A stray word after line 7's value.
  path = tmp_path / 'broken.json'
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'broken\.json, line 7'):
    data.load_texts(tiny_config, log=lambda _: None)


def test_non_utf8_text_file_is_a_user_error_naming_the_line(tiny_config, tmp_path):
  path = tmp_path / 'latin1.txt'
  path.write_bytes('first line\n'.encode() + 'caf\u00e9 au lait\n'.encode('latin-1'))
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'latin1\.txt, line 2 is not UTF-8'):
    data.load_texts(tiny_config, log=lambda _: None)


def test_non_utf8_jsonl_file_is_a_user_error_naming_the_line(tiny_config, tmp_path):
  path = tmp_path / 'latin1.jsonl'
  path.write_bytes(b'{"text": "first"}\n{"text": "second"}\n{"text": "third"}\n'
                   + '{"text": "caf\u00e9"}\n'.encode('latin-1'))
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'latin1\.jsonl, line 4'):
    data.load_texts(tiny_config, log=lambda _: None)


def test_data_too_small_for_one_block_is_a_user_error(tiny_config, tokenizer, tmp_path):
  tiny_config.data_files = write_jsonl(tmp_path / 'small.jsonl', ELI5_RECORDS)
  tiny_config.block_size = 512
  splits = data.load_texts(tiny_config, log=lambda _: None)
  with pytest.raises(UserError, match=r'zero blocks of block_size=512'):
    data.make_blocks(tiny_config, tokenizer, splits, log=lambda _: None)


@pytest.mark.parametrize('name', ['eli5.xml', 'eli5'])
def test_unsupported_extension_is_a_user_error(tiny_config, tmp_path, name):
  path = tmp_path / name
  path.write_text('<eli5/>', encoding='utf-8')
  tiny_config.data_files = str(path)
  extension = name[len('eli5'):]
  with pytest.raises(UserError, match=rf"extension '{re.escape(extension)}' are not supported"):
    data.load_texts(tiny_config, log=lambda _: None)


def test_mixed_formats_are_a_user_error(tiny_config, tmp_path):
  write_jsonl(tmp_path / 'a.jsonl', ELI5_RECORDS)
  _write_csv(tmp_path / 'b.csv')
  tiny_config.data_files = f'{tmp_path}/a.jsonl,{tmp_path}/b.csv'
  with pytest.raises(UserError, match=r'mix formats \(\.csv, \.jsonl\)'):
    data.load_texts(tiny_config, log=lambda _: None)


@pytest.mark.parametrize('probability', [0, 1.5])
def test_masking_probability_outside_0_1_is_a_user_error(probability):
  with pytest.raises(UserError, match=rf'mlm_probability={probability} must be in \(0, 1\)'):
    masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=300,
                        probability=probability)


def test_block_size_above_the_models_maximum_is_a_user_error():
  config = transformers.RobertaConfig(max_position_embeddings=66, pad_token_id=1)
  assert model.max_block_size(config) == 64
  model.check_block_size(64, config)
  with pytest.raises(UserError, match=r'block_size=65 .*1\.\.64'):
    model.check_block_size(65, config)
