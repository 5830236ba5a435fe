"""From a dataset source to a stream of train and test texts, never held in memory whole.

One code path for every source: the embedded ELI5 sample, files on local disk or
in a `gs://` bucket (jsonl/json/parquet/csv in the ELI5 schema, or .txt with one
document per line) and hub datasets, all read with `datasets` in streaming mode
(bucket files through fsspec's gcsfs, never copied whole to this host). The steps follow
the Hugging Face masked-language-model guide: split train/test with a seed, join
each example's `answers.text` into one string (tokenizing, concatenating and cutting
into blocks is `preparation.py`'s). The split is streamed too: example k of the
selected range is a test example when its seeded pseudo-random position
(`grain.experimental.index_shuffle`, a bijection computed per index) is below the
test count, so the split takes no memory and is a function of (seed, k) alone.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
import re
from typing import TYPE_CHECKING, Callable, Iterator

import grain
from etils import epath

from mlm_jax import errors
from mlm_jax import storage
from mlm_jax.errors import UserError, first_line

if TYPE_CHECKING:  # Imported where used: a run whose blocks are prepared never needs it (1 s).
  import datasets

_BUILDERS = {'.jsonl': 'json', '.json': 'json', '.parquet': 'parquet', '.csv': 'csv',
             '.txt': 'text'}
_SCRIPTS_UNSUPPORTED = 'Dataset scripts are no longer supported'
_PARQUET_REVISION = 'refs/convert/parquet'
_READ_BATCH = 256  # Examples per read from the stream (and per tokenizer call).
# Bytes per read of a text or JSON file: `datasets`' default, 10 MB, holds ~130 MB of Arrow
# and Python copies at once (BENCHMARKS.md); 1 MB reads as fast.
_READ_OPTIONS = {'text': {'chunksize': 1 << 20}, 'json': {'chunksize': 1 << 20}}


def sample_data_path() -> str:
  """The ELI5-format sample that ships with the package (the default dataset)."""
  return str(importlib.resources.files('mlm_jax') / 'sample_data' / 'eli5_sample.jsonl')


# ----------------------------------------------------------------------------
# Loading raw examples.


def resolve_data_files(data_files: str) -> list[str]:
  """Expands a comma-separated list of paths and globs, local or gs://; every entry must match."""
  files = []
  for pattern in (p.strip() for p in data_files.split(',')):
    if not pattern:
      continue
    matches = _matches(pattern)
    if not matches:
      raise UserError(f'data file {pattern!r} does not exist; '
                      'check --config.data_files (comma-separated paths or globs)')
    files.extend(matches)
  if not files:
    raise UserError('--config.data_files is empty; pass at least one file')
  return files


def _matches(pattern: str) -> list[str]:
  if not storage.is_remote(pattern):
    return storage.glob(pattern)
  storage.check_gcs_ready(pattern, write=False)
  try:
    return storage.glob(pattern)
  except NotImplementedError:  # epath refuses `**` in a bucket.
    raise UserError(f'data file {pattern!r}: `**` is not supported in a bucket; use one `*` '
                    'per folder level, or list the folders comma-separated') from None
  except OSError as e:  # No such bucket, no permission: gcsfs' errors are OSErrors.
    raise UserError(f'data file {pattern!r} cannot be listed ({errors.described(e)}); '
                    'check the bucket name and your access to it') from None


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
    with epath.Path(path).open('rb') as f:
      for number, raw in enumerate(f, start=1):
        try:
          raw.decode('utf-8')
        except UnicodeDecodeError:
          return f'{path}, line {number}'
  return None


def _first_bad_json_line(files: list[str]) -> str | None:
  """Names the first place that is not valid JSON (Lines), for a readable error."""
  for path in files:
    text = epath.Path(path).read_text(encoding='utf-8')
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


def _read_error(files: list[str], builder: str) -> Callable[[Exception], UserError]:
  """Turns an error raised while reading `files` into a one-line UserError naming the place."""
  def describe(e: Exception) -> UserError:
    # Text is checked only once reading failed: a check up front would read every file once
    # more, a whole extra download for files in a bucket.
    where = _first_non_utf8_line(files) if builder != 'parquet' else None
    if where:
      return UserError(f'{where} is not UTF-8 text; re-encode the file as UTF-8')
    where = _first_bad_json_line(files) if builder == 'json' else None
    if where:
      return UserError(f'{where}; fix or remove that line')
    return UserError(f'could not read {", ".join(files)} as {builder} '
                     f'({errors.described(e)}); '
                     'check the file format and --config.split')
  return describe


def load_files(files: list[str], split: str) -> datasets.IterableDataset:
  """Streams the files' examples of split `split` (a split name, no slice).

  Bucket files stream too: `datasets` opens them with fsspec (gcsfs) as it reads. Its offline
  mode (which the tests set) refuses only downloads into its cache, which streaming never makes.
  """
  builder = _builder_for(files)
  import datasets  # pylint: disable=import-outside-toplevel,redefined-outer-name
  try:
    return datasets.load_dataset(builder, data_files=files, split=split, streaming=True,
                                 **_READ_OPTIONS.get(builder, {}))
  except Exception as e:  # pylint: disable=broad-except
    raise _read_error(files, builder)(e) from None


def load_hub_dataset(name: str, config_name: str, split: str,
                     log: Callable[[str], None] = print) -> datasets.IterableDataset:
  """Streams a hub dataset (or a local dataset directory) by id.

  Script-based hub datasets (the guide's `eli5_category` was one) are refused by
  `datasets` 4 and later; for those, the hub's parquet conversion is loaded.
  """
  import datasets  # pylint: disable=import-outside-toplevel,redefined-outer-name
  how_to_fix = ('pass local files instead with --config.data_files=PATH '
                '(jsonl/json/parquet/csv in the ELI5 schema, or .txt)')
  try:
    return datasets.load_dataset(name, config_name or None, split=split, streaming=True)
  except Exception as e:  # pylint: disable=broad-except
    if _SCRIPTS_UNSUPPORTED not in str(e):
      raise UserError(f'could not load dataset {name!r} split {split!r} '
                      f'({first_line(e)}); '
                      f'{how_to_fix}') from None
  log(f'{name} is a script-based dataset, which this version of `datasets` refuses: '
      f'loading the hub\'s parquet conversion (revision {_PARQUET_REVISION}) instead.')
  try:
    return datasets.load_dataset(name, config_name or None, split=split,
                                 revision=_PARQUET_REVISION, streaming=True)
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


# ----------------------------------------------------------------------------
# Examples to texts.


def _join(value) -> str:
  if isinstance(value, (list, tuple)):
    return ' '.join(v for v in value if v)
  return value or ''


def texts_of(batch: dict[str, list]) -> list[str]:
  """One string per example: ELI5's `answers.text` joined, or a plain `text` column."""
  if 'answers' in batch and all(isinstance(a, dict) and 'text' in a for a in batch['answers']):
    return [_join(a['text']) for a in batch['answers']]
  for column in ('answers.text', 'text'):
    if column in batch:
      return [_join(v) for v in batch[column]]
  raise UserError(
      f'the dataset has no text: columns are {", ".join(sorted(batch))}, expected '
      'the ELI5 schema (answers.text) or a `text` column; check the data source')


# ----------------------------------------------------------------------------
# The split: a streamed, seeded train/test assignment.


def _split_name(spec: str) -> str:
  match = re.fullmatch(r'\s*([\w.-]+)\s*(\[.*\])?\s*', spec)
  if not match:
    raise UserError(f'split={spec!r} is not a split name or slice like train[:1000] or '
                    'train[10%:]; set --config.split')
  return match.group(1)


def selected_ranges(spec: str, num_examples: int) -> list[tuple[int, int]]:
  """The [start, stop) example ranges that a split spec like `train[:100]` selects."""
  import datasets  # pylint: disable=import-outside-toplevel,redefined-outer-name
  name = _split_name(spec)
  try:
    instructions = datasets.ReadInstruction.from_spec(spec).to_absolute({name: num_examples})
  except (ValueError, AssertionError) as e:
    raise UserError(f'split={spec!r}: {first_line(e)}; set --config.split') from None
  return [(i.from_, i.to) for i in instructions]


def test_count(test_size: float, num_examples: int) -> int:
  """`test_size` below 1 is a fraction of the examples (rounded up, as `datasets`' own
  `train_test_split` does), from 1 on a count."""
  if test_size <= 0 or (test_size >= 1 and test_size != int(test_size)):
    raise UserError(f'test_size={test_size:g} must be a fraction in (0, 1) or a whole count '
                    'of examples; set --config.test_size')
  count = math.ceil(test_size * num_examples) if test_size < 1 else int(test_size)
  if not 1 <= count < num_examples:
    raise UserError(f'test_size={test_size:g} makes {count} test example(s) of the '
                    f'{num_examples} selected; train and test each need at least one: '
                    'set --config.test_size (a fraction, or a count below the number of '
                    'examples) or use more data')
  return count


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The selected examples of a source, split into train and test as they stream by."""
  raw: datasets.IterableDataset  # Every example of the named split.
  ranges: tuple[tuple[int, int], ...]  # Which of them are selected.
  num_test: int
  seed: int
  on_error: Callable[[Exception], UserError]

  @property
  def num_examples(self) -> int:
    return sum(stop - start for start, stop in self.ranges)

  def is_test(self, k: int) -> bool:
    """Whether selected example k is a test example: exactly `num_test` of them are."""
    position = grain.experimental.index_shuffle(k, max_index=self.num_examples - 1,
                                                seed=self.seed, rounds=4)
    return position < self.num_test

  def batches(self) -> Iterator[tuple[list[str], list[str]]]:
    """(train texts, test texts) of each read, in source order."""
    k = 0
    for batch in _read(self.raw, self.on_error, self.ranges):
      texts = texts_of(batch)
      test = [self.is_test(k + i) for i in range(len(texts))]
      k += len(texts)
      yield ([t for t, is_test in zip(texts, test) if not is_test],
             [t for t, is_test in zip(texts, test) if is_test])

  def train_texts(self, limit: int) -> Iterator[str]:
    """The first `limit` train texts, in source order."""
    count = 0
    for train, _ in self.batches():
      for text in train[:limit - count]:
        yield text
      count += min(len(train), limit - count)
      if count >= limit:
        return


def _read(raw: datasets.IterableDataset, on_error: Callable[[Exception], UserError],
          ranges=None) -> Iterator[dict[str, list]]:
  """Batches of the stream (restricted to `ranges`), read errors as one-line UserErrors."""
  position = 0
  try:
    for batch in raw.iter(batch_size=_READ_BATCH):
      size = len(next(iter(batch.values())))
      if ranges is None:
        yield batch
      else:
        keep = [i for i in range(size)
                if any(start <= position + i < stop for start, stop in ranges)]
        if keep:
          yield {column: [values[i] for i in keep] for column, values in batch.items()}
        if position + size >= max(stop for _, stop in ranges):
          return
      position += size
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise on_error(e) from None


def count_examples(raw: datasets.IterableDataset,
                   on_error: Callable[[Exception], UserError]) -> int:
  """The number of examples; checks that the first ones have text, to fail before preparing."""
  count = 0
  for batch in _read(raw, on_error):
    count += len(texts_of(batch) if count == 0 else next(iter(batch.values())))
  return count


def load_corpus(config, log: Callable[[str], None] = print) -> Corpus:
  """The source's selected examples (`config.split`) with their seeded train/test split.

  Counts the examples first (one streamed pass) when the split is a fraction or a slice
  needs the split's length.
  """
  source = source_of(config)
  name = _split_name(config.split)
  if source['kind'] == 'files':
    raw = load_files(source['files'], name)
    on_error = _read_error(source['files'], _builder_for(source['files']))
  else:
    raw = load_hub_dataset(source['name'], source['config'], name, log)
    on_error = lambda e: UserError(f'could not read dataset {source["name"]!r} '
                                   f'({errors.described(e)})')
  ranges = selected_ranges(config.split, count_examples(raw, on_error))
  num_examples = sum(stop - start for start, stop in ranges)
  if num_examples < 2:
    raise UserError(f'the dataset has {num_examples} example(s) in split {config.split!r}; '
                    'a train/test split needs at least 2')
  return Corpus(raw, tuple(ranges), test_count(config.test_size, num_examples),
                config.seed % 2**32, on_error)
