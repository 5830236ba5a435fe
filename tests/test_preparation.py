"""Tokenize once: blocks on disk in the cache, shared by `mlm_jax.prepare`, run_train.py and hosts."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mlm_jax.data import block_store
from mlm_jax.data import sources
from mlm_jax.data import preparation
from mlm_jax import storage
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax import train
from mlm_jax.errors import UserError
from tests.conftest import ROOT, load_config
from tests.multidevice import free_port, run_hosts
from tests.test_data import ELI5_RECORDS, read_sample, split_texts, write_jsonl

_QUIET = {'log': lambda _: None, 'progress': False}


@pytest.fixture(scope='module')
def tokenizer():
  """A 300-token byte-level BPE trained on the shipped sample's first answers."""
  texts = [t for r in read_sample()[:150] for t in r['answers']['text']]
  return tokenizer_lib.train_bpe_tokenizer(texts, vocab_size=300, model_max_length=512)


@pytest.fixture
def config(tiny_config, tmp_path):
  """The tiny config on the sample's first 20 examples, blocks of 16 tokens."""
  tiny_config.data_files = write_jsonl(tmp_path / 'eli5.jsonl', read_sample()[:20])
  tiny_config.split = 'train'
  tiny_config.block_size = 16
  return tiny_config


def _expected_blocks(config, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Each split's texts tokenized one by one, concatenated, cut into blocks, rest dropped."""
  expected = []
  for texts in split_texts(sources.load_corpus(config, log=lambda _: None)):
    ids = [i for text in texts for i in tokenizer(text)['input_ids']]
    whole = len(ids) // config.block_size * config.block_size
    expected.append(np.asarray(ids[:whole]).reshape(-1, config.block_size))
  return tuple(expected)


def _assert_blocks(prepared, expected) -> None:
  np.testing.assert_array_equal(prepared.blocks.train, expected[0])
  np.testing.assert_array_equal(prepared.blocks.test, expected[1])


# ----------------------------------------------------------------------------
# What is written


def test_blocks_are_each_splits_token_ids_concatenated_and_cut(config, tokenizer, monkeypatch):
  monkeypatch.setattr(sources, '_READ_BATCH', 3)  # Blocks that span several reads.
  prepared = preparation.prepare(config, tokenizer, **_QUIET)
  assert not prepared.from_cache
  assert prepared.blocks.train.dtype == np.uint16  # 300 tokens fit.
  _assert_blocks(prepared, _expected_blocks(config, tokenizer))


def test_special_token_strings_in_the_text_are_tokenized_as_text(config, tokenizer, tmp_path):
  """A literal <mask>, <pad> or </s> in the data would be an id masking never trains on (and
  a pad id shifts RoBERTa's position ids): only the tokenizer's own wrapping is special."""
  text = 'Write <mask> or <pad> or </s> or <s> here.'
  config.data_files = write_jsonl(tmp_path / 'special.jsonl', [
      {'answers': {'text': [text]}}] * 40)
  config.test_size, config.block_size = 0.5, 1
  ids = preparation.prepare(config, tokenizer, **_QUIET).blocks.train[:, 0].tolist()
  document = ids[:ids.index(tokenizer.eos_token_id) + 1]
  special = set(tokenizer.all_special_ids)
  assert [i for i, token in enumerate(document) if token in special] == [0, len(document) - 1]
  assert tokenizer.decode(document[1:-1]) == text


def test_the_block_writer_carries_ids_across_additions_and_drops_the_remainder(tmp_path):
  writer = block_store.BlockWriter(tmp_path / 'ids.bin', block_size=4, dtype=np.dtype(np.int32))
  for ids in ([0, 1, 2], [3, 4], [5, 6, 7, 8, 9, 10]):
    writer.add(np.asarray(ids, np.int32))
  writer.close()
  assert writer.num_blocks == 2
  assert np.fromfile(tmp_path / 'ids.bin', np.int32).tolist() == list(range(8))


def test_worker_processes_write_the_same_blocks(config, tokenizer):
  config.num_proc = 2
  _assert_blocks(preparation.prepare(config, tokenizer, **_QUIET),
                 _expected_blocks(config, tokenizer))


def test_a_tokenizer_from_scratch_sees_only_the_first_max_texts_train_texts(config):
  config.tokenizer_vocab_size, config.tokenizer_train_max_texts = 300, 5
  prepared = preparation.prepare(config, **_QUIET)
  first = split_texts(sources.load_corpus(config, log=lambda _: None))[0][:5]
  expected = tokenizer_lib.train_bpe_tokenizer(first, 300, model_max_length=512)
  assert len(first) == 5
  assert prepared.tokenizer.get_vocab() == expected.get_vocab()


# ----------------------------------------------------------------------------
# The cache


def test_a_second_preparation_reads_the_cache(config, tokenizer):
  first = preparation.prepare(config, tokenizer, **_QUIET)
  messages = []
  second = preparation.prepare(config, tokenizer, log=messages.append, progress=False)
  assert second.from_cache and messages == [
      f'Loaded tokenized blocks from the cache {first.blocks.directory}']
  _assert_blocks(second, (first.blocks.train, first.blocks.test))


def test_another_block_size_is_prepared_anew(config, tokenizer):
  preparation.prepare(config, tokenizer, **_QUIET)
  config.block_size = 8
  prepared = preparation.prepare(config, tokenizer, **_QUIET)
  assert not prepared.from_cache and prepared.blocks.train.shape[1] == 8


def test_the_cache_is_keyed_by_file_contents(config, tokenizer):
  preparation.prepare(config, tokenizer, **_QUIET)
  write_jsonl(config.data_files, read_sample()[20:40])
  prepared = preparation.prepare(config, tokenizer, **_QUIET)
  assert not prepared.from_cache
  _assert_blocks(prepared, _expected_blocks(config, tokenizer))


def test_the_cache_notices_changed_files_in_a_dataset_directory(config, tokenizer, tmp_path):
  directory = tmp_path / 'eli5_dir'
  directory.mkdir()
  config.data_files, config.dataset = '', str(directory)
  write_jsonl(directory / 'train.jsonl', read_sample()[:20])
  preparation.prepare(config, tokenizer, **_QUIET)
  write_jsonl(directory / 'train.jsonl', read_sample()[20:40])
  _assert_blocks(preparation.prepare(config, tokenizer, **_QUIET),
                 _expected_blocks(config, tokenizer))


def _truncate_train(directory) -> None:
  path = directory / 'train.bin'
  os.truncate(path, path.stat().length // 2)


def _remove_meta(directory) -> None:
  (directory / block_store.META).unlink()


@pytest.mark.parametrize('damage', [_truncate_train, _remove_meta])
def test_a_half_written_cache_is_noticed_and_prepared_again(config, tokenizer, damage):
  directory = preparation.prepare(config, tokenizer, **_QUIET).blocks.directory
  damage(directory)
  messages = []
  prepared = preparation.prepare(config, tokenizer, log=messages.append, progress=False)
  assert not prepared.from_cache and 'are incomplete' in messages[0]
  _assert_blocks(prepared, _expected_blocks(config, tokenizer))


def _temporary_folder(parent, name: str, age_s: float):
  """A temporary folder with a data file, both last changed `age_s` seconds ago."""
  folder = parent / f'{block_store.TEMPORARY_PREFIX}{name}'
  folder.mkdir(parents=True)
  (folder / 'train.bin').write_bytes(b'\0' * 64)
  for path in (folder / 'train.bin', folder):
    os.utime(path, (time.time() - age_s,) * 2)
  return folder


def test_a_killed_preparations_temporary_folder_is_removed_and_a_recent_one_kept(
    config, tokenizer):
  parent = preparation.cache_root(config) / 'blocks'
  dead = _temporary_folder(parent, 'dead', block_store.STALE_AFTER_S + 60)
  recent = _temporary_folder(parent, 'recent', block_store.STALE_AFTER_S - 60)
  messages = []
  preparation.prepare(config, tokenizer, log=messages.append, progress=False)
  assert not dead.exists() and recent.exists()
  assert [m for m in messages if m.startswith('Removed')] == [
      f'Removed {dead}, left by a preparation that stopped 11 minutes ago']


def test_a_live_writers_folder_is_kept_while_its_data_files_stay_unchanged(tmp_path,
                                                                           monkeypatch):
  """Counting the examples, or skipping to a split's slice, writes nothing for long."""
  # Beats 60 times per stale period, as in production 10: a loaded machine (the suite beside
  # other work) may leave the heartbeat's thread unscheduled for a good part of a second.
  monkeypatch.setattr(block_store, 'STALE_AFTER_S', 3.0)
  monkeypatch.setattr(block_store, 'HEARTBEAT_EVERY_S', 0.05)
  parent = storage.path(tmp_path / 'blocks')
  with block_store.new_folder(parent, log=print) as live:
    (live / 'train.bin').write_bytes(b'\0' * 64)
    os.utime(live / 'train.bin', (0, 0))
    os.utime(live, (0, 0))
    time.sleep(3.3)
    block_store.remove_stale_folders(parent, log=print)
    assert (live / 'train.bin').exists()
  assert [p.name for p in live.iterdir()] == ['train.bin']  # The heartbeat file is gone.


def test_a_prepared_cache_of_another_block_size_is_refused(config, tokenizer):
  other = preparation.prepare(config, tokenizer, **_QUIET).blocks.directory
  config.block_size = 8
  directory = preparation.blocks_dir(config, tokenizer, preparation.source_fingerprint(config))
  shutil.copytree(other, directory)  # A cache copied under the wrong key.
  with pytest.raises(UserError, match=r'written with other settings \(block_size: 16 \(expected 8'):
    preparation.prepare(config, tokenizer, **_QUIET)


def test_a_prepared_cache_of_another_tokenizer_is_refused(config, tokenizer):
  other = preparation.prepare(config, tokenizer, **_QUIET).blocks.directory
  retrained = tokenizer_lib.train_bpe_tokenizer(['other words entirely'] * 50, 280, 512)
  directory = preparation.blocks_dir(config, retrained, preparation.source_fingerprint(config))
  shutil.copytree(other, directory)
  with pytest.raises(UserError, match=r'written with other settings \(tokenizer: '):
    preparation.prepare(config, retrained, **_QUIET)


def test_an_unwritable_cache_folder_is_a_user_error(config, tokenizer, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  config.cache_dir = str(blocker / 'cache')
  with pytest.raises(UserError, match=r'cache folder .*a_file/cache/blocks cannot be written'):
    preparation.prepare(config, tokenizer, **_QUIET)


def test_data_too_small_for_one_block_is_a_user_error(config, tokenizer, tmp_path):
  config.data_files = write_jsonl(tmp_path / 'small.jsonl', ELI5_RECORDS)
  config.block_size = 512
  with pytest.raises(UserError, match=r'zero blocks of block_size=512'):
    preparation.prepare(config, tokenizer, **_QUIET)


# ----------------------------------------------------------------------------
# The prepare command and run_train.py share one cache


def test_the_prepare_command_writes_what_training_reads(tmp_path, capsys):
  cache = tmp_path / 'cache'
  result = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.prepare', '--config=configs/tiny_test.py',
       f'--config.cache_dir={cache}'], cwd=ROOT, capture_output=True, text=True, timeout=300,
      check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert result.returncode == 0, result.stderr[-3000:]
  blocks_line = result.stdout.strip().splitlines()[-1]
  assert blocks_line.startswith('Prepared ') and str(cache / 'blocks') in blocks_line

  config = load_config('tiny_test')
  config.cache_dir = str(cache)
  train.prepare(config, str(tmp_path / 'run'))
  out = capsys.readouterr().out
  assert 'Loaded the tokenizer from the cache' in out
  assert f'Loaded tokenized blocks from the cache {blocks_line.split(" in ")[-1]}' in out
  assert 'Training a' not in out and 'Prepared' not in out


def test_the_prepare_command_without_a_config_is_a_one_line_error():
  result = subprocess.run([sys.executable, '-m', 'mlm_jax.prepare'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert result.returncode == 2
  assert result.stderr.strip() == 'error: pass --config=configs/NAME.py (the config ' \
                                  'run_train.py will use)'


# ----------------------------------------------------------------------------
# Several hosts


_HOST = '''
import hashlib, json, sys
import numpy as np
from mlm_jax import cli
cli.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
from tests.conftest import load_config
from mlm_jax import run
config = load_config('tiny_test')
config.split, config.cache_dir = 'train[:40]', sys.argv[3]
tokenizer, (source,) = run.prepare_data(config, sys.argv[4])
blocks = source.blocks
digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
print(json.dumps({'train': digest(blocks.train), 'test': digest(blocks.test),
                  'vocab': sorted(tokenizer.get_vocab().items())}))
'''


def test_two_hosts_sharing_a_cache_tokenize_once_and_read_what_one_host_prepares(tmp_path):
  """Process 0 prepares while process 1 waits, then both read the same blocks, equal to a
  single process's; only process 0 tokenizes."""
  address = f'127.0.0.1:{free_port()}'
  outputs = run_hosts([[sys.executable, '-c', _HOST, address, str(index),
                        str(tmp_path / 'shared_cache'), str(tmp_path / 'run')]
                       for index in range(2)], devices=1)
  results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
  assert 'Tokenizing' in outputs[0][1] and 'Tokenizing' not in outputs[1][1]
  assert 'Prepared' in outputs[0][0] and 'Prepared' not in outputs[1][0]

  config = load_config('tiny_test')
  config.split, config.cache_dir = 'train[:40]', str(tmp_path / 'own_cache')
  alone = preparation.prepare(config, **_QUIET)
  digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
  assert results[0] == results[1] == {
      'train': digest(alone.blocks.train), 'test': digest(alone.blocks.test),
      'vocab': [list(item) for item in sorted(alone.tokenizer.get_vocab().items())]}
