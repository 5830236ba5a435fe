"""Tokenize once: a source's texts to token-id blocks on disk, in the cache.

`prepare(config)` returns the run's tokenizer and its prepared blocks (see
`block_store.py`), building whichever is missing from the cache: a tokenizer trained
from scratch on a bounded sample of the train texts, then the blocks of both splits,
tokenized in batches (in `num_proc` worker processes), concatenated and cut into
`block_size` blocks as they stream by. Both are keyed by what they are made of, so
`python -m mlm_jax.prepare` and `run_train.py` with the same config share them.
`prepare_sources` does the same for each source of a mixture (`mixture.py`): one tokenizer
for all, each source's blocks in their own cache folder, keyed by that source alone.
"""

import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import math
import multiprocessing
import os
from typing import Any, Callable, Iterator

import numpy as np
import tokenizers
import tqdm
import transformers
from etils import epath

from mlm_jax.data import block_store
from mlm_jax.data import mixture
from mlm_jax.data import sources
from mlm_jax import storage
from mlm_jax import validation
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError

CACHE_VERSION = 3  # 3: special-token strings in the text are tokenized as text.


def cache_root(config) -> epath.Path:
  """The cache folder: local, or in a bucket (`gs://`)."""
  return storage.path(config.cache_dir or os.environ.get('MLM_JAX_CACHE')
                      or os.path.join('~', '.cache', 'mlm_jax'))


def _file_fingerprint(path: str) -> str:
  """A file by content: the sha256 of its bytes, or for a bucket file the checksum the bucket
  keeps (no download; see `storage.checksum`) where it keeps one."""
  if storage.is_remote(path):
    checksum = storage.checksum(path)
    if checksum:
      return checksum
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def source_fingerprint(config) -> dict:
  """The source by content (file hashes, not names) and how it is split."""
  source = sources.source_of(config)
  if source['kind'] == 'files':
    # Local files keep the key caches had before bucket files were read (all sha256).
    name = 'content' if any(storage.is_remote(f) for f in source['files']) else 'sha256'
    source = {'kind': 'files', name: [_file_fingerprint(f) for f in source['files']]}
  elif os.path.isdir(source['name']):  # A local dataset directory: key on its contents.
    files = sorted(glob.glob(os.path.join(source['name'], '**', '*'), recursive=True))
    source = {**source, 'sha256': [_file_fingerprint(f) for f in files if os.path.isfile(f)]}
  return {'version': CACHE_VERSION, 'source': source, 'split': config.split,
          'test_size': config.test_size, 'seed': config.seed}


def _key(parts: dict) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
  return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def blocks_dir(config, tokenizer, source: dict) -> epath.Path:
  return cache_root(config) / 'blocks' / _key(
      {**source, 'tokenizer': tokenizer_fingerprint(tokenizer), 'block_size': config.block_size})


def _scratch_tokenizer_dir(config, source: dict) -> epath.Path:
  return cache_root(config) / 'tokenizers' / _key(
      {**source, 'vocab_size': config.tokenizer_vocab_size,
       'max_texts': config.tokenizer_train_max_texts,
       'model_max_length': validation.SCRATCH_MAX_LENGTH})


# ----------------------------------------------------------------------------
# Tokenizing.


def _encoder(tokenizer_json: str) -> tokenizers.Tokenizer:
  """The fast tokenizer's backend, as `tokenizer(texts)` runs it: no truncation or padding."""
  encoder = tokenizers.Tokenizer.from_str(tokenizer_json)
  encoder.no_truncation()
  encoder.no_padding()
  # A literal `<mask>`, `<pad>` or `</s>` in the text is text, not the special token
  # (transformers' `split_special_tokens=True`): special ids come from the tokenizer's own
  # wrapping only, since masking never trains on them and a pad id inside a block would
  # shift RoBERTa's position ids.
  encoder.encode_special_tokens = True
  return encoder


_WORKER_ENCODER = None


def _init_worker(tokenizer_json: str) -> None:
  global _WORKER_ENCODER  # pylint: disable=global-statement
  _WORKER_ENCODER = _encoder(tokenizer_json)


def _encode(encoder: tokenizers.Tokenizer, texts: list[str]) -> np.ndarray:
  """The texts' ids (each wrapped in the tokenizer's special tokens), concatenated."""
  encodings = encoder.encode_batch_fast(texts)  # No character offsets: less memory, faster.
  return np.fromiter((i for e in encodings for i in e.ids), np.int32,
                     count=sum(len(e.ids) for e in encodings))


def _encode_in_worker(split_texts: tuple[list[str], list[str]]) -> tuple[np.ndarray, ...]:
  return tuple(_encode(_WORKER_ENCODER, texts) for texts in split_texts)


def _encoded(corpus: sources.Corpus, tokenizer_json: str,
             num_proc: int) -> Iterator[tuple[np.ndarray, ...]]:
  """(train ids, test ids) of each read of the corpus, in order."""
  if num_proc == 1:
    encoder = _encoder(tokenizer_json)
    for split_texts in corpus.batches():
      yield tuple(_encode(encoder, texts) for texts in split_texts)
    return
  # Spawned, not forked: the parent may already run JAX's and tokenizers' threads.
  context = multiprocessing.get_context('spawn')
  with context.Pool(num_proc, _init_worker, (tokenizer_json,)) as pool:
    yield from pool.imap(_encode_in_worker, corpus.batches(), chunksize=1)


def write_blocks(corpus: sources.Corpus, tokenizer, folder: epath.Path, block_size: int,
                 num_proc: int = 1, progress: bool = True) -> dict:
  """Tokenizes both splits into `folder`/{train,test}.bin; returns their description."""
  dtype = block_store.dtype_for(len(tokenizer))
  writers = {s: block_store.BlockWriter(folder / f'{s}.bin', block_size, dtype)
             for s in block_store.SPLITS}
  tokens = dict.fromkeys(block_store.SPLITS, 0)
  bar = tqdm.tqdm(desc='Tokenizing', unit='tok', unit_scale=True, disable=not progress,
                  dynamic_ncols=True, mininterval=1.0)
  try:
    for split_ids in _encoded(corpus, tokenizer.backend_tokenizer.to_str(), num_proc):
      for split, ids in zip(block_store.SPLITS, split_ids):
        writers[split].add(ids)
        tokens[split] += len(ids)
        bar.update(len(ids))
  finally:
    bar.close()
    for writer in writers.values():
      writer.close()
  return {'block_size': block_size, 'dtype': dtype.name, 'vocab_size': len(tokenizer),
          **{s: {'num_blocks': writers[s].num_blocks, 'num_tokens': tokens[s]}
             for s in block_store.SPLITS}}


# ----------------------------------------------------------------------------
# The cache.


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A run's tokenizer and its blocks; `from_cache` when nothing had to be tokenized."""
  tokenizer: transformers.PreTrainedTokenizerBase
  blocks: block_store.Prepared
  from_cache: bool


def _open_checked(directory: epath.Path, tokenizer, block_size: int) -> block_store.Prepared:
  prepared = block_store.open_prepared(directory)
  block_store.check_meta(directory, prepared.meta, {
      'format': block_store.FORMAT_VERSION, 'tokenizer': tokenizer_fingerprint(tokenizer),
      'block_size': block_size})
  for split in block_store.SPLITS:
    if len(getattr(prepared, split)) == 0:
      raise UserError(f'the {split} split makes zero blocks of block_size={block_size} tokens; '
                      'use more data or a smaller --config.block_size')
  return prepared


def _cached_scratch_tokenizer(config, source: dict, log: Callable[[str], None]):
  """The from-scratch tokenizer of this source from the cache, or None."""
  directory = _scratch_tokenizer_dir(config, source)
  if not (directory / block_store.META).exists():  # Written last (see `block_store.commit`).
    return None
  with storage.local_copy(directory) as local:  # transformers reads local folders only.
    tokenizer = transformers.AutoTokenizer.from_pretrained(local)
  log(f'Loaded the tokenizer from the cache {directory}')
  return tokenizer


def _train_scratch_tokenizer(config, source: dict, texts: Iterator[str],
                             log: Callable[[str], None]):
  """A tokenizer trained from scratch on `texts` (a bounded sample of the train texts), then
  cached."""
  directory = _scratch_tokenizer_dir(config, source)
  log(f'Training a {config.tokenizer_vocab_size}-token BPE tokenizer on the first '
      f'{config.tokenizer_train_max_texts:,} train texts')
  tokenizer = tokenizer_lib.train_bpe_tokenizer(
      texts, config.tokenizer_vocab_size, model_max_length=validation.SCRATCH_MAX_LENGTH)
  with block_store.new_folder(directory.parent, log) as folder:
    storage.save_with(tokenizer.save_pretrained, folder)
  block_store.commit(folder, {'kind': 'tokenizer', 'source': source}, directory)
  log(f'Saved the tokenizer in the cache {directory}')
  return tokenizer


def prepare(config, tokenizer=None, log: Callable[[str], None] = print,
            progress: bool = True,
            check_tokenizer: Callable[[Any], Any] = lambda tokenizer: None) -> Prepared:
  """The run's tokenizer and blocks, prepared into the cache unless already there.

  `tokenizer` (a run's saved one) wins; otherwise `config` names a pretrained one or
  a tokenizer is trained from scratch (and cached). `check_tokenizer` runs before any
  tokenizing, to refuse a tokenizer the run cannot use early.
  """
  root = os.fspath(cache_root(config))
  if storage.is_remote(root):
    storage.check_gcs_ready(root)  # Before the data is read, as for a workdir.
  source = source_fingerprint(config)
  corpus = functools.cache(lambda: sources.load_corpus(config, log))
  if tokenizer is None:
    tokenizer = _known_tokenizer(config, source, log)
  if tokenizer is None:
    tokenizer = _train_scratch_tokenizer(
        config, source, corpus().train_texts(config.tokenizer_train_max_texts), log)
  check_tokenizer(tokenizer)
  directory = blocks_dir(config, tokenizer, source)
  if block_store.is_complete(directory):
    log(f'Loaded tokenized blocks from the cache {directory}')
    return Prepared(tokenizer, _open_checked(directory, tokenizer, config.block_size), True)
  if directory.exists():
    log(f'The prepared blocks in {directory} are incomplete (an interrupted preparation or '
        'copy); preparing them again')
    block_store.discard(directory)
  with block_store.new_folder(directory.parent, log) as folder:
    meta = write_blocks(corpus(), tokenizer, folder, config.block_size, config.num_proc,
                        progress)
  meta.update(format=block_store.FORMAT_VERSION, tokenizer=tokenizer_fingerprint(tokenizer),
              source=source)
  block_store.commit(folder, meta, directory)
  log(f'Prepared {meta["train"]["num_blocks"]:,} train / {meta["test"]["num_blocks"]:,} test '
      f'blocks of {config.block_size} tokens in {directory}')
  return Prepared(tokenizer, _open_checked(directory, tokenizer, config.block_size), False)


def _known_tokenizer(config, source: dict, log: Callable[[str], None]):
  """The tokenizer the config names, or the cached from-scratch one; None: train one."""
  pretrained = tokenizer_lib.pretrained_tokenizer(config)
  if pretrained is None:
    return _cached_scratch_tokenizer(config, source, log)
  return tokenizer_lib.add_words(pretrained, validation.new_tokens(config), log)


def tokenizer_of(config, workdir: str):
  """The tokenizer another process prepared (multi-host: hosts other than 0)."""
  tokenizer = tokenizer_lib.saved_tokenizer(workdir)
  if tokenizer is None:
    tokenizer = _known_tokenizer(config, _tokenizer_key(config), lambda _: None)
  if tokenizer is None:
    raise UserError(f'the tokenizer prepared by process 0 is missing from {cache_root(config)} '
                    'on this host: every host needs the same --config.cache_dir on shared '
                    'storage (NFS, a bucket)')
  return tokenizer


def open_prepared(config, tokenizer) -> block_store.Prepared:
  """The blocks another process prepared for `tokenizer` (multi-host: hosts other than 0)."""
  directory = blocks_dir(config, tokenizer, source_fingerprint(config))
  if not block_store.is_complete(directory):
    raise UserError(f'the prepared blocks {directory} are missing on this host: every host '
                    'needs the same --config.cache_dir on shared storage (NFS, a bucket)')
  return _open_checked(directory, tokenizer, config.block_size)


# ----------------------------------------------------------------------------
# A mixture: one tokenizer, each source prepared as a run of that source alone.


@dataclasses.dataclass(frozen=True)
class PreparedSources:
  """A run's tokenizer and the prepared blocks of each of its sources, in the mixture's order
  (one source named '' for a run without a mixture)."""
  tokenizer: transformers.PreTrainedTokenizerBase
  sources: tuple[mixture.SourceBlocks, ...]


def source_config(config, source: mixture.Source):
  """The config of a run on `source` alone: what its blocks are prepared and keyed with."""
  single = config.copy_and_resolve_references()
  with single.unlocked():
    single.data_files, single.dataset, single.mixture = source.files, '', ''
  return single




def _tokenizer_key(config) -> dict:
  return _mixture_fingerprint(config) if config.mixture else source_fingerprint(config)


@contextlib.contextmanager
def _naming(source: mixture.Source) -> Iterator[None]:
  """A source's errors name it, and the key that sets its files."""
  try:
    yield
  except UserError as e:
    raise UserError(f'mixture source {source.name!r} ({source.files}): '
                    f'{str(e).replace("--config.data_files", "--config.mixture")}') from None


def _mixture_fingerprint(config) -> dict:
  """A mixture by its sources' contents and weights: the key of its from-scratch tokenizer."""
  parts = []
  for source in mixture.parse(config.mixture):
    with _naming(source):
      parts.append({'name': source.name, 'weight': source.weight,
                    **source_fingerprint(source_config(config, source))})
  return {'version': CACHE_VERSION, 'mixture': parts}


def _mixture_texts(config, log: Callable[[str], None]) -> Iterator[str]:
  """The first train texts of each source, `tokenizer_train_max_texts` in all, shared out by
  the weights: what a from-scratch tokenizer of a mixture is trained on."""
  chosen = mixture.parse(config.mixture)
  for source, share in zip(chosen, mixture.proportions(chosen)):
    with _naming(source):
      corpus = sources.load_corpus(source_config(config, source), log)
      yield from corpus.train_texts(math.ceil(share * config.tokenizer_train_max_texts))


def prepare_sources(config, tokenizer=None, log: Callable[[str], None] = print,
                    progress: bool = True,
                    check_tokenizer: Callable[[Any], Any] = lambda tokenizer: None
                    ) -> PreparedSources:
  """`prepare` for every source of the config's mixture, or for its one source."""
  if not config.mixture:
    prepared = prepare(config, tokenizer, log, progress, check_tokenizer)
    return PreparedSources(prepared.tokenizer,
                           (mixture.SourceBlocks('', 1.0, prepared.blocks),))
  if tokenizer is None:
    tokenizer = _known_tokenizer(config, _mixture_fingerprint(config), log)
  if tokenizer is None:
    tokenizer = _train_scratch_tokenizer(config, _mixture_fingerprint(config),
                                         _mixture_texts(config, log), log)
  check_tokenizer(tokenizer)
  prepared = []
  for source in mixture.parse(config.mixture):
    with _naming(source):
      blocks = prepare(source_config(config, source), tokenizer, log, progress).blocks
    prepared.append(mixture.SourceBlocks(source.name, source.weight, blocks))
  return PreparedSources(tokenizer, tuple(prepared))


def open_sources(config, tokenizer) -> tuple[mixture.SourceBlocks, ...]:
  """The blocks of every source that another process prepared (`open_prepared` of each)."""
  if not config.mixture:
    return (mixture.SourceBlocks('', 1.0, open_prepared(config, tokenizer)),)
  opened = []
  for source in mixture.parse(config.mixture):
    with _naming(source):
      opened.append(mixture.SourceBlocks(
          source.name, source.weight, open_prepared(source_config(config, source), tokenizer)))
  return tuple(opened)
