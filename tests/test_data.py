"""From raw ELI5-style sources to streamed train/test texts: sources.py, tokenizer.py, input checks.

Guards the guide's preprocessing (answers joined), the seeded train/test split (a fraction or
a count of examples, source order kept), split slices, the tokenizer trained from scratch or
loaded, and a one-line error for each bad source.
"""

import csv
import json
import re

import datasets
import pytest
import transformers

from mlm_jax import masking, model
from mlm_jax.data import sources
from mlm_jax.data import tokenizer as tokenizer_lib
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
  with open(sources.sample_data_path(), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def write_jsonl(path, records) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
  return str(path)


def split_texts(corpus: sources.Corpus) -> tuple[list[str], list[str]]:
  """(train texts, test texts) of a corpus, in source order."""
  train, test = [], []
  for train_batch, test_batch in corpus.batches():
    train += train_batch
    test += test_batch
  return train, test


def all_texts(corpus: sources.Corpus) -> list[str]:
  train, test = split_texts(corpus)
  return sorted(train + test)


def load(config) -> sources.Corpus:
  return sources.load_corpus(config, log=lambda _: None)


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
# texts_of


def _columns(records: list[dict]) -> dict[str, list]:
  """Records as the column batch a `datasets` stream yields."""
  return {key: [r[key] for r in records] for key in records[0]}


def test_texts_of_joins_each_examples_answers_with_a_space():
  assert sources.texts_of(_columns(ELI5_RECORDS)) == ELI5_TEXTS


def test_texts_of_skips_empty_answers_when_joining():
  record = {'q_id': 'q', 'answers': {'a_id': ['1', '2', '3'], 'text': ['x y', '', 'z'],
                                     'score': [1, 2, 3]}}
  assert sources.texts_of(_columns([record])) == ['x y z']


def test_texts_of_passes_a_plain_text_column_through():
  assert sources.texts_of({'text': ['first document', 'second one'], 'id': [1, 2]}) == [
      'first document', 'second one']


# ----------------------------------------------------------------------------
# load_corpus: one code path for every local format


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
def test_load_corpus_reads_the_same_eli5_data_from_every_format(
    tiny_config, tmp_path, extension, write):
  path = tmp_path / f'eli5.{extension}'
  write(path)
  tiny_config.data_files = str(path)
  assert all_texts(load(tiny_config)) == sorted(ELI5_TEXTS)


def test_load_corpus_accepts_a_plain_text_column_in_csv(tiny_config, tmp_path):
  path = tmp_path / 'plain.csv'
  path.write_text('text,source\n' + ''.join(f'"{t}",web\n' for t in ELI5_TEXTS),
                  encoding='utf-8')
  tiny_config.data_files = str(path)
  assert all_texts(load(tiny_config)) == sorted(ELI5_TEXTS)


def test_load_corpus_expands_comma_separated_globs(tiny_config, tmp_path):
  write_jsonl(tmp_path / 'part-1.jsonl', ELI5_RECORDS[:2])
  write_jsonl(tmp_path / 'part-2.jsonl', ELI5_RECORDS[2:])
  tiny_config.data_files = f'{tmp_path}/part-1.jsonl, {tmp_path}/part-2*.jsonl'
  assert all_texts(load(tiny_config)) == sorted(ELI5_TEXTS)


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

  corpus = load(tiny_config)

  assert sources.source_of(tiny_config) == {'kind': 'files', 'files': [sources.sample_data_path()]}
  assert len(split_texts(corpus)[1]) == round(len(records) * tiny_config.test_size)
  assert all_texts(corpus) == sorted(' '.join(r['answers']['text']) for r in records)


# ----------------------------------------------------------------------------
# The hub code path, through local directories


def test_load_hub_dataset_loads_a_local_dataset_directory(tmp_path):
  write_jsonl(tmp_path / 'train.jsonl', ELI5_RECORDS)
  messages = []

  dataset = sources.load_hub_dataset(str(tmp_path), '', 'train', log=messages.append)

  assert [t for batch in dataset.iter(batch_size=2) for t in sources.texts_of(batch)] == ELI5_TEXTS
  assert not messages


def test_config_dataset_goes_through_the_hub_path(tiny_config, tmp_path):
  directory = tmp_path / 'eli5_dir'
  directory.mkdir()
  write_jsonl(directory / 'train.jsonl', ELI5_RECORDS)
  tiny_config.dataset = str(directory)

  assert sources.source_of(tiny_config)['kind'] == 'hub'
  assert all_texts(load(tiny_config)) == sorted(ELI5_TEXTS)


def test_load_hub_dataset_that_cannot_be_loaded_says_to_pass_local_files(tmp_path):
  missing = str(tmp_path / 'no_such_dataset')  # A path: a hub id would wait on the network.
  with pytest.raises(UserError, match=r'no_such_dataset.*pass local files .*--config\.data_files'):
    sources.load_hub_dataset(missing, '', 'train', log=lambda _: None)


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
    sources.load_hub_dataset(script_dataset_dir, '', 'train', log=messages.append)
  assert len(messages) == 1
  assert '\n' not in messages[0]
  assert 'script-based' in messages[0] and 'refs/convert/parquet' in messages[0]


# ----------------------------------------------------------------------------
# The train/test split


def _numbered_jsonl(tmp_path, count: int) -> str:
  return write_jsonl(tmp_path / 'numbered.jsonl', [{'text': str(i)} for i in range(count)])


def test_a_fractional_test_size_takes_that_share_of_the_examples(tiny_config, tmp_path):
  tiny_config.data_files = _numbered_jsonl(tmp_path, 20)
  tiny_config.split, tiny_config.test_size = 'train', 0.25
  train, test = split_texts(load(tiny_config))
  assert len(test) == 5 and len(train) == 15
  assert sorted(train + test, key=int) == [str(i) for i in range(20)]


def test_a_whole_test_size_is_a_count_of_examples(tiny_config, tmp_path):
  tiny_config.data_files = _numbered_jsonl(tmp_path, 20)
  tiny_config.split, tiny_config.test_size = 'train', 3
  train, test = split_texts(load(tiny_config))
  assert len(test) == 3 and len(train) == 17


def test_the_split_is_seeded_and_keeps_source_order(tiny_config, tmp_path):
  tiny_config.data_files = _numbered_jsonl(tmp_path, 50)
  tiny_config.split, tiny_config.test_size = 'train', 0.2
  first, again = split_texts(load(tiny_config)), split_texts(load(tiny_config))
  tiny_config.seed = 4
  other = split_texts(load(tiny_config))
  assert first == again
  assert first[1] != other[1]
  assert first[0] == sorted(first[0], key=int)


def test_a_split_slice_selects_those_examples(tiny_config, tmp_path):
  tiny_config.data_files = _numbered_jsonl(tmp_path, 50)
  tiny_config.split, tiny_config.test_size = 'train[10:30]', 0.5
  assert all_texts(load(tiny_config)) == sorted(str(i) for i in range(10, 30))
  tiny_config.split = 'train[90%:]'
  assert all_texts(load(tiny_config)) == sorted(str(i) for i in range(45, 50))


@pytest.mark.parametrize('test_size', [0, -0.5, 2.5])
def test_a_test_size_neither_fraction_nor_count_is_a_user_error(test_size):
  with pytest.raises(UserError, match=r'test_size=.* must be a fraction in \(0, 1\) or a whole'):
    sources.test_count(test_size, 100)


def test_a_test_size_count_not_below_the_examples_is_a_user_error(tiny_config, tmp_path):
  tiny_config.data_files = _numbered_jsonl(tmp_path, 20)
  tiny_config.split, tiny_config.test_size = 'train', 20
  with pytest.raises(UserError, match=r'test_size=20 makes 20 test example\(s\) of the 20 '):
    load(tiny_config)


# ----------------------------------------------------------------------------
# The tokenizer


def test_trained_tokenizer_has_robertas_special_token_ids(tokenizer):
  ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer_lib.SPECIAL_TOKENS}
  assert ids == {'<s>': 0, '<pad>': 1, '</s>': 2, '<unk>': 3, '<mask>': 4}
  assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
          tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
  assert masking.special_ids(tokenizer) == (0, 1, 2, 3, 4)
  assert len(tokenizer) == 300


def test_trained_tokenizer_wraps_each_sequence_in_s_and_end_tokens(tokenizer):
  ids = tokenizer('The sky is blue.')['input_ids']
  assert ids[0] == 0 and ids[-1] == 2
  assert not set(ids[1:-1]) & {0, 1, 2, 3, 4}
  assert tokenizer.decode(ids[1:-1]) == 'The sky is blue.'


def test_a_saved_tokenizer_reloads_from_the_workdir(tiny_config, tmp_path):
  tiny_config.tokenizer_vocab_size = 300
  workdir = str(tmp_path / 'run')
  texts = ELI5_TEXTS * 20
  probe = ['The sky is blue.', 'a <mask> b', 'Purring is calm.']

  assert tokenizer_lib.saved_tokenizer(workdir) is None
  trained = tokenizer_lib.train_bpe_tokenizer(texts, 300, model_max_length=512)
  tokenizer_lib.save_tokenizer(trained, workdir)
  reloaded = tokenizer_lib.saved_tokenizer(workdir)

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
    load(tiny_config)


def test_columns_without_text_are_a_user_error(tiny_config, tmp_path):
  tiny_config.data_files = write_jsonl(tmp_path / 'qa.jsonl', [
      {'question': 'Why?', 'body': 'Because.'}, {'question': 'How?', 'body': 'Like so.'}])
  with pytest.raises(UserError, match=r'no text: columns are (body, question|question, body)'):
    load(tiny_config)


def test_malformed_jsonl_line_is_a_user_error_naming_the_line(tiny_config, tmp_path):
  path = tmp_path / 'broken.jsonl'
  path.write_text(json.dumps(ELI5_RECORDS[0]) + '\n' + json.dumps(ELI5_RECORDS[1]) + '\n'
                  + '{"q_id": "q3", "answers": oops}\n', encoding='utf-8')
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'broken\.jsonl, line 3'):
    load(tiny_config)


def test_jsonl_line_that_is_not_an_object_is_a_user_error(tiny_config, tmp_path):
  path = tmp_path / 'arrays.jsonl'
  path.write_text('{"text": "fine"}\n[1, 2]\n', encoding='utf-8')
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'arrays\.jsonl, line 2: not a JSON object'):
    load(tiny_config)


def test_malformed_json_array_is_a_user_error_naming_the_bad_line(tiny_config, tmp_path):
  lines = json.dumps(ELI5_RECORDS, indent=2).splitlines()
  lines[6] += ' oops'  # A stray word after line 7's value.
  path = tmp_path / 'broken.json'
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'broken\.json, line 7'):
    load(tiny_config)


def test_non_utf8_text_file_is_a_user_error_naming_the_line(tiny_config, tmp_path):
  path = tmp_path / 'latin1.txt'
  path.write_bytes('first line\n'.encode() + 'caf\u00e9 au lait\n'.encode('latin-1'))
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'latin1\.txt, line 2 is not UTF-8'):
    load(tiny_config)


def test_non_utf8_jsonl_file_is_a_user_error_naming_the_line(tiny_config, tmp_path):
  path = tmp_path / 'latin1.jsonl'
  path.write_bytes(b'{"text": "first"}\n{"text": "second"}\n{"text": "third"}\n'
                   + '{"text": "caf\u00e9"}\n'.encode('latin-1'))
  tiny_config.data_files = str(path)
  with pytest.raises(UserError, match=r'latin1\.jsonl, line 4'):
    load(tiny_config)


@pytest.mark.parametrize('name', ['eli5.xml', 'eli5'])
def test_unsupported_extension_is_a_user_error(tiny_config, tmp_path, name):
  path = tmp_path / name
  path.write_text('<eli5/>', encoding='utf-8')
  tiny_config.data_files = str(path)
  extension = name[len('eli5'):]
  with pytest.raises(UserError, match=rf"extension '{re.escape(extension)}' are not supported"):
    load(tiny_config)


def test_mixed_formats_are_a_user_error(tiny_config, tmp_path):
  write_jsonl(tmp_path / 'a.jsonl', ELI5_RECORDS)
  _write_csv(tmp_path / 'b.csv')
  tiny_config.data_files = f'{tmp_path}/a.jsonl,{tmp_path}/b.csv'
  with pytest.raises(UserError, match=r'mix formats \(\.csv, \.jsonl\)'):
    load(tiny_config)


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
