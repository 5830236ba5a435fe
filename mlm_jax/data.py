"""From a dataset source to cached numpy blocks of token ids.

One code path for every source: the embedded ELI5 sample, local files
(jsonl/json/parquet/csv in the ELI5 schema, or .txt with one document per
line) and hub datasets. The steps follow the Hugging Face masked-language-model
guide: split train/test with a seed, flatten `answers`, join each example's
`answers.text` into one string, tokenize, concatenate and cut into
`block_size` blocks, dropping the remainder.
"""

import dataclasses
import glob
import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from typing import Callable

import datasets
import numpy as np

from mlm_jax.errors import UserError, first_line

CACHE_VERSION = 2  # 2: special-token strings in the text are tokenized as text.
_BUILDERS = {'.jsonl': 'json', '.json': 'json', '.parquet': 'parquet', '.csv': 'csv',
             '.txt': 'text'}
_SCRIPTS_UNSUPPORTED = 'Dataset scripts are no longer supported'
_PARQUET_REVISION = 'refs/convert/parquet'


def sample_data_path() -> str:
  """The ELI5-format sample that ships with the package (the default dataset)."""
  return str(importlib.resources.files('mlm_jax') / 'sample_data' / 'eli5_sample.jsonl')


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Token-id blocks of the train and test splits, each [num_blocks, block_size] int32."""
  train: np.ndarray
  test: np.ndarray


# ----------------------------------------------------------------------------
# Loading raw examples.


def resolve_data_files(data_files: str) -> list[str]:
  """Expands a comma-separated list of paths and globs; every entry must match."""
  files = []
  for pattern in (p.strip() for p in data_files.split(',')):
    if not pattern:
      continue
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
      raise UserError(f'data file {pattern!r} does not exist; '
                      'check --config.data_files (comma-separated paths or globs)')
    files.extend(matches)
  if not files:
    raise UserError('--config.data_files is empty; pass at least one file')
  return files


def _builder_for(files: list[str]) -> str:
  extensions = {os.path.splitext(f)[1].lower() for f in files}
  unknown = extensions - set(_BUILDERS)
  if unknown:
    raise UserError(f'data files with extension {sorted(unknown)[0]!r} are not supported; '
                    f'use one of {", ".join(sorted(_BUILDERS))}')
  builders = {_BUILDERS[e] for e in extensions}
  if len(builders) > 1:
    raise UserError(f'data files mix formats ({", ".join(sorted(extensions))}); '
                    'pass files of one format')
  return builders.pop()


def _first_non_utf8_line(files: list[str]) -> str | None:
  for path in files:
    with open(path, 'rb') as f:
      for number, raw in enumerate(f, start=1):
        try:
          raw.decode('utf-8')
        except UnicodeDecodeError:
          return f'{path}, line {number}'
  return None


def _first_bad_json_line(files: list[str]) -> str | None:
  """Names the first place that is not valid JSON (Lines), for a readable error."""
  for path in files:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    if text.lstrip().startswith('['):  # One JSON document: an array of records.
      try:
        json.loads(text)
      except json.JSONDecodeError as e:
        return f'{path}, line {e.lineno}: {e.msg}'
      continue
    for number, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        if not isinstance(json.loads(line), dict):
          return f'{path}, line {number}: not a JSON object'
      except json.JSONDecodeError as e:
        return f'{path}, line {number}: {e.msg}'
  return None


def load_local_files(files: list[str], split: str) -> datasets.Dataset:
  builder = _builder_for(files)
  if builder != 'parquet':
    where = _first_non_utf8_line(files)
    if where:
      raise UserError(f'{where} is not UTF-8 text; re-encode the file as UTF-8')
  try:
    return datasets.load_dataset(builder, data_files=files, split=split)
  except Exception as e:  # pylint: disable=broad-except
    where = _first_bad_json_line(files) if builder == 'json' else None
    if where:
      raise UserError(f'{where}; fix or remove that line') from None
    raise UserError(f'could not read {", ".join(files)} as {builder} '
                    f'({type(e).__name__}: {first_line(e)}); '
                    'check the file format and --config.split') from None


def load_hub_dataset(name: str, config_name: str, split: str,
                     log: Callable[[str], None] = print) -> datasets.Dataset:
  """Loads a hub dataset (or a local dataset directory) by id.

  Script-based hub datasets (the guide's `eli5_category` was one) are refused by
  `datasets` 4 and later; for those, the hub's parquet conversion is loaded.
  """
  how_to_fix = ('pass local files instead with --config.data_files=PATH '
                '(jsonl/json/parquet/csv in the ELI5 schema, or .txt)')
  try:
    return datasets.load_dataset(name, config_name or None, split=split)
  except Exception as e:  # pylint: disable=broad-except
    if _SCRIPTS_UNSUPPORTED not in str(e):
      raise UserError(f'could not load dataset {name!r} split {split!r} '
                      f'({first_line(e)}); '
                      f'{how_to_fix}') from None
  log(f'{name} is a script-based dataset, which this version of `datasets` refuses: '
      f'loading the hub\'s parquet conversion (revision {_PARQUET_REVISION}) instead.')
  try:
    return datasets.load_dataset(name, config_name or None, split=split,
                                 revision=_PARQUET_REVISION)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'could not load the parquet conversion of dataset {name!r} '
                    f'({first_line(e)}); '
                    f'{how_to_fix}') from None


def source_of(config) -> dict:
  """What the raw examples come from, as a JSON-able description."""
  if config.data_files:
    return {'kind': 'files', 'files': resolve_data_files(config.data_files)}
  if config.dataset:
    return {'kind': 'hub', 'name': config.dataset, 'config': config.dataset_config}
  return {'kind': 'files', 'files': [sample_data_path()]}


def load_raw(config, log: Callable[[str], None] = print) -> datasets.Dataset:
  source = source_of(config)
  if source['kind'] == 'files':
    return load_local_files(source['files'], config.split)
  return load_hub_dataset(source['name'], source['config'], config.split, log)


# ----------------------------------------------------------------------------
# Examples to texts to blocks.


def split_train_test(dataset: datasets.Dataset, test_size: float,
                     seed: int) -> datasets.DatasetDict:
  if len(dataset) < 2:
    raise UserError(f'the dataset has {len(dataset)} example(s); '
                    'a train/test split needs at least 2')
  return dataset.train_test_split(test_size=test_size, seed=seed)


def _join(value) -> str:
  if isinstance(value, (list, tuple)):
    return ' '.join(v for v in value if v)
  return value or ''


def to_texts(dataset: datasets.Dataset) -> datasets.Dataset:
  """One `text` column: ELI5's `answers.text` lists joined, or a plain `text` column."""
  flat = dataset.flatten()
  if 'answers.text' in flat.column_names:
    column = 'answers.text'
  elif 'text' in flat.column_names:
    column = 'text'
  else:
    raise UserError(
        f'the dataset has no text: columns are {", ".join(flat.column_names)}, expected '
        'the ELI5 schema (answers.text) or a `text` column; check the data source')
  texts = flat.map(lambda batch: {'text': [_join(v) for v in batch[column]]},
                   batched=True, remove_columns=flat.column_names)
  return texts


def texts_to_blocks(texts: datasets.Dataset, tokenizer, block_size: int,
                    num_proc: int = 1) -> np.ndarray:
  """Tokenizes in batches, concatenates and cuts into [n, block_size], dropping the rest.

  A literal `<mask>`, `<pad>` or `</s>` in the text is text, not the special token: those
  ids come from the tokenizer's own wrapping only (masking never trains on special ids, and
  a pad id inside a block would shift RoBERTa's position ids).
  """
  tokenized = texts.map(
      lambda batch: {'input_ids': tokenizer(batch['text'], return_attention_mask=False,
                                            split_special_tokens=True,
                                            verbose=False)['input_ids']},
      batched=True, num_proc=num_proc if num_proc > 1 else None,
      remove_columns=texts.column_names)
  column = tokenized.data.column('input_ids')
  ids = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
  num_blocks = len(ids) // block_size
  return np.asarray(ids[:num_blocks * block_size], np.int32).reshape(num_blocks, block_size)


# ----------------------------------------------------------------------------
# The cache.


def _file_fingerprint(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
  return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def cache_key(config, tokenizer) -> str:
  """Keyed by source (file contents, not names), split, tokenizer and block size."""
  source = source_of(config)
  if source['kind'] == 'files':
    source = {'kind': 'files', 'sha256': [_file_fingerprint(f) for f in source['files']]}
  elif os.path.isdir(source['name']):  # A local dataset directory: key on its contents.
    files = sorted(glob.glob(os.path.join(source['name'], '**', '*'), recursive=True))
    source = {**source, 'sha256': [_file_fingerprint(f) for f in files if os.path.isfile(f)]}
  key = {'version': CACHE_VERSION, 'source': source, 'split': config.split,
         'test_size': config.test_size, 'seed': config.seed,
         'tokenizer': tokenizer_fingerprint(tokenizer), 'block_size': config.block_size}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def cache_root(config) -> str:
  return os.path.expanduser(config.cache_dir or os.environ.get('MLM_JAX_CACHE')
                            or os.path.join('~', '.cache', 'mlm_jax'))


def _save_blocks(directory: str, blocks: Blocks) -> None:
  """Writes to a temporary folder and renames, so a reader never sees half a cache."""
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix='.tmp-')
  np.save(os.path.join(tmp, 'train.npy'), blocks.train)
  np.save(os.path.join(tmp, 'test.npy'), blocks.test)
  try:
    os.rename(tmp, directory)
  except OSError:  # Another process wrote the same key first.
    shutil.rmtree(tmp, ignore_errors=True)


def _check_blocks(blocks: Blocks, block_size: int) -> None:
  for name, split in (('train', blocks.train), ('test', blocks.test)):
    if len(split) == 0:
      raise UserError(f'the {name} split makes zero blocks of block_size={block_size} tokens; '
                      'use more data or a smaller --config.block_size')


def make_blocks(config, tokenizer, splits: datasets.DatasetDict,
                log: Callable[[str], None] = print) -> Blocks:
  """Blocks for both splits, from the cache when this source was seen before."""
  directory = os.path.join(cache_root(config), 'blocks', cache_key(config, tokenizer))
  if os.path.exists(os.path.join(directory, 'test.npy')):
    blocks = Blocks(np.load(os.path.join(directory, 'train.npy')),
                    np.load(os.path.join(directory, 'test.npy')))
    log(f'Loaded tokenized blocks from the cache {directory}')
  else:
    blocks = Blocks(*(texts_to_blocks(splits[s], tokenizer, config.block_size,
                                      config.num_proc) for s in ('train', 'test')))
    _save_blocks(directory, blocks)
  _check_blocks(blocks, config.block_size)
  return blocks


def load_texts(config, log: Callable[[str], None] = print) -> datasets.DatasetDict:
  """The raw source, split into train/test, as one `text` column each."""
  raw = load_raw(config, log)
  splits = split_train_test(raw, config.test_size, config.seed)
  return datasets.DatasetDict({name: to_texts(split) for name, split in splits.items()})
