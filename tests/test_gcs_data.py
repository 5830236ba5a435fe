"""Data files and the cache in a gs:// bucket: read, keyed and prepared as local ones are;
a bucket's file of new words, and a bucket workdir's extended tokenizer on resume.

Against the GCS emulator (`gcs_env` in conftest.py); each test keeps to its own folder of
the bucket, and the environment that points gcsfs at the emulator is set per test.
"""

import os
import time
import uuid

import fsspec
import numpy as np
import pytest

from mlm_jax.data import block_store
from mlm_jax.data import sources
from mlm_jax.data import preparation
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax import run
from mlm_jax import storage
from mlm_jax import validation
from mlm_jax.errors import UserError
from tests.conftest import GCS_BUCKET
from tests.test_data import read_sample
from tests.test_vocabulary import NEW_WORDS, WORDS, pretrained, run_config


@pytest.fixture
def bucket_dir(gcs_env, monkeypatch):
  """A fresh folder of the emulator's bucket, as a gs:// URL string."""
  for name, value in gcs_env.items():
    monkeypatch.setenv(name, value)
  return f'gs://{GCS_BUCKET}/{uuid.uuid4().hex}'


def _lines() -> list[str]:
  """120 one-line documents from the shipped sample."""
  return [' '.join(r['answers']['text']).replace('\n', ' ') for r in read_sample()[:120]]


def _write_texts(folder: str) -> None:
  """Three .txt files of 40 documents each, with a file in a subfolder the glob must skip."""
  lines, folder = _lines(), storage.path(folder)
  (folder / 'other').mkdir(parents=True, exist_ok=True)  # In a bucket: nothing to make.
  for index in range(3):
    text = '\n'.join(lines[40 * index:40 * (index + 1)]) + '\n'
    (folder / f'part{index}.txt').write_text(text)
  (folder / 'other' / 'part9.txt').write_text('not selected\n')


def _prepare(config, data_files: str, cache_dir: str) -> tuple[preparation.Prepared, list[str]]:
  config.data_files, config.cache_dir = data_files, cache_dir
  messages = []
  return preparation.prepare(config, log=messages.append, progress=False), messages


def test_data_files_and_cache_in_a_bucket_prepare_what_local_ones_do(
    bucket_dir, tiny_config, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _write_texts(str(tmp_path / 'data'))
  _write_texts(f'{bucket_dir}/data')
  local, _ = _prepare(tiny_config, str(tmp_path / 'data' / '*.txt'), str(tmp_path / 'cache'))
  remote, messages = _prepare(tiny_config, f'{bucket_dir}/data/*.txt', f'{bucket_dir}/cache')

  assert not remote.from_cache and any(m.startswith('Training a') for m in messages)
  assert (preparation.tokenizer_fingerprint(remote.tokenizer)
          == preparation.tokenizer_fingerprint(local.tokenizer))
  assert len(local.blocks.train) > 0 and len(local.blocks.test) > 0
  np.testing.assert_array_equal(remote.blocks.train, local.blocks.train)
  np.testing.assert_array_equal(remote.blocks.test, local.blocks.test)

  cache = storage.path(f'{bucket_dir}/cache')
  assert os.fspath(remote.blocks.directory).startswith(f'{bucket_dir}/cache/blocks/')
  bucket = fsspec.filesystem('gs')
  written = {p.name: bucket.info(os.fspath(p)) for p in remote.blocks.directory.iterdir()}
  assert sorted(written) == ['meta.json', 'test.bin', 'train.bin']
  # meta.json last: a bucket has no rename, and a reader takes it to mean complete.
  assert all(written['meta.json']['updated'] > written[f'{s}.bin']['updated']
             for s in block_store.SPLITS)
  assert len(list(cache.glob('tokenizers/*/tokenizer.json'))) == 1
  assert not [p for p in cache.glob('*/*') if p.name.startswith(block_store.TEMPORARY_PREFIX)]
  assert not (tmp_path / 'gs:').exists()  # Nothing went to a local folder named after the URL.

  again, messages = _prepare(tiny_config, f'{bucket_dir}/data/*.txt', f'{bucket_dir}/cache')
  assert again.from_cache and len(messages) == 2
  assert messages[0].startswith(f'Loaded the tokenizer from the cache {cache}/tokenizers/')
  assert messages[1] == f'Loaded tokenized blocks from the cache {remote.blocks.directory}'
  np.testing.assert_array_equal(again.blocks.train, local.blocks.train)


def test_a_bucket_file_is_keyed_by_its_content(bucket_dir, tiny_config):
  """The bucket's own checksum keys a file: a same-size edit is noticed, a rewrite is not."""
  file = storage.path(f'{bucket_dir}/data/a.txt')
  tiny_config.data_files = os.fspath(file)
  file.write_text('the sky is blue\n')
  first = preparation.source_fingerprint(tiny_config)
  file.write_text('the sky is blue\n')
  assert preparation.source_fingerprint(tiny_config) == first
  file.write_text('the sky is bluE\n')
  changed = preparation.source_fingerprint(tiny_config)
  assert changed != first and changed['source']['content'][0].endswith(',size=16')


def test_a_gs_glob_matching_nothing_is_a_one_line_user_error_naming_the_pattern(bucket_dir):
  storage.path(f'{bucket_dir}/data/a.txt').write_text('one line\n')
  assert sources.resolve_data_files(f'{bucket_dir}/data/*.txt') == [f'{bucket_dir}/data/a.txt']
  pattern = f'{bucket_dir}/data/*.jsonl'
  with pytest.raises(UserError) as error:
    sources.resolve_data_files(pattern)
  assert str(error.value).count('\n') == 0 and repr(pattern) in str(error.value)


def test_a_recursive_gs_glob_is_a_user_error_naming_the_pattern(bucket_dir):
  pattern = f'{bucket_dir}/data/**/*.txt'
  with pytest.raises(UserError, match=r"`\*\*` is not supported in a bucket") as error:
    sources.resolve_data_files(pattern)
  assert repr(pattern) in str(error.value)


def test_a_non_utf8_bucket_file_is_a_user_error_naming_the_line(bucket_dir, tiny_config):
  file = storage.path(f'{bucket_dir}/latin1.txt')
  file.write_bytes('first line\n'.encode() + 'caf\u00e9 au lait\n'.encode('latin-1'))
  tiny_config.data_files = os.fspath(file)
  with pytest.raises(UserError, match=rf'{file}, line 2 is not UTF-8'):
    sources.load_corpus(tiny_config, log=lambda _: None)


def test_a_stale_temporary_folder_in_a_bucket_is_removed_and_a_live_one_kept(
    bucket_dir, monkeypatch):
  """Bucket objects keep the server's times, which a test cannot age: the limit is shortened."""
  monkeypatch.setattr(block_store, 'STALE_AFTER_S', 2.0)
  monkeypatch.setattr(block_store, 'HEARTBEAT_EVERY_S', 0.2)
  parent = storage.path(f'{bucket_dir}/cache/blocks')
  dead = parent / f'{block_store.TEMPORARY_PREFIX}dead'
  (dead / 'train.bin').write_bytes(b'\0' * 64)
  messages = []
  with block_store.new_folder(parent, messages.append) as live:
    (live / 'train.bin').write_bytes(b'\0' * 64)  # Then nothing more, but for the heartbeat.
    time.sleep(2.5)  # Past the limit; epath gives bucket times in whole seconds.
    block_store.remove_stale_folders(parent, messages.append)
    assert not dead.exists() and (live / 'train.bin').exists()
  assert len(messages) == 1 and messages[0].startswith(f'Removed {dead}, left by a preparation')


def test_new_words_from_a_bucket_file_and_a_bucket_workdirs_tokenizer_resume_as_local_ones(
    bucket_dir, tmp_path):
  """`add_tokens_file=gs://...` adds the file's words; the extended tokenizer saved in a bucket
  workdir comes back with them on resume, and a resume whose file now holds other words is
  refused in one line, before any data is tokenized."""
  rng = np.random.RandomState(0)
  data = tmp_path / 'data.txt'
  data.write_text('\n'.join(' '.join(rng.choice(WORDS + list(NEW_WORDS), 12)) + ' .'
                            for _ in range(60)), encoding='utf-8')
  terms = f'{bucket_dir}/terms.txt'
  storage.path(terms).write_text('\n'.join(NEW_WORDS) + '\n')
  config = run_config(pretrained(tmp_path / 'model', 'bert'), str(data), add_tokens='',
                      add_tokens_file=terms, cache_dir=str(tmp_path / 'cache'))
  validation.validate_config(config)
  workdir = f'{bucket_dir}/run'
  tokenizer, _ = run.prepare_data(config, workdir)
  assert tokenizer_lib.added_words(tokenizer) == list(NEW_WORDS)
  tokenizer_lib.save_tokenizer(tokenizer, workdir)  # As `run.prepare` does.
  resumed, _ = run.prepare_data(config, workdir)
  assert (preparation.tokenizer_fingerprint(resumed)
          == preparation.tokenizer_fingerprint(tokenizer))
  storage.path(terms).write_text('unhappy\nkinase\n')
  with pytest.raises(UserError, match=r"^the run in gs://.* added the tokens \['unhappy', "
                     r"'quickest'\] to its tokenizer, and this config adds \['unhappy', "
                     r"'kinase'\]"):
    run.prepare_data(config, workdir)
