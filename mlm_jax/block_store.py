"""Token-id blocks on disk: one raw array file per split, read back memory-mapped.

A prepared folder holds `train.bin` and `test.bin` (row-major [num_blocks, block_size] of
`dtype`, uint16 when the vocabulary fits, else int32) and `meta.json`, written last, which
describes them. Writers append whole blocks as the tokenizer produces them, so memory never
grows with the corpus; the folder is written under a temporary name and renamed when complete,
and a reader checks every file against `meta.json`, so a half-written folder is never read.
"""

import dataclasses
import json
import os
import tempfile
import uuid
from typing import Any

import numpy as np
from etils import epath

from mlm_jax.errors import UserError

FORMAT_VERSION = 2
SPLITS = ('train', 'test')
META = 'meta.json'


def dtype_for(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


class BlockWriter:
  """Concatenates token ids and appends them to `path` as whole blocks, dropping the rest."""

  def __init__(self, path: epath.Path, block_size: int, dtype: np.dtype):
    self._file = epath.Path(path).open('wb')
    self._block_size, self._dtype = block_size, dtype
    self._carry = np.zeros(0, dtype)
    self.num_blocks = 0

  def add(self, ids: np.ndarray) -> None:
    ids = np.concatenate([self._carry, ids.astype(self._dtype, copy=False)])
    whole = len(ids) // self._block_size * self._block_size
    self._file.write(ids[:whole].tobytes())
    self.num_blocks += whole // self._block_size
    self._carry = ids[whole:]

  def close(self) -> None:
    self._file.close()


@dataclasses.dataclass(frozen=True)
class Prepared:
  """An opened prepared folder: memory-mapped [num_blocks, block_size] arrays per split."""
  directory: epath.Path
  meta: dict
  train: np.ndarray
  test: np.ndarray


def new_folder(parent: epath.Path) -> epath.Path:
  """A fresh temporary folder in `parent`, to be renamed by `commit` when complete."""
  try:
    parent.mkdir(parents=True, exist_ok=True)
    folder = parent / f'.tmp-{uuid.uuid4().hex}'
    folder.mkdir()
  except OSError as e:
    raise UserError(f'the cache folder {parent} cannot be written ({e.strerror or e}); set '
                    '--config.cache_dir (or $MLM_JAX_CACHE) to a writable folder') from None
  return folder


def commit(folder: epath.Path, meta: dict, directory: epath.Path) -> None:
  """Writes `meta.json` last, then renames `folder` to `directory` (one writer wins)."""
  (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
  try:
    folder.rename(directory)
  except OSError:  # Another process committed the same key first: keep theirs.
    folder.rmtree(missing_ok=True)


def is_complete(directory: epath.Path) -> bool:
  """True when `meta.json` exists and every split file has the size it announces."""
  try:
    meta = json.loads((directory / META).read_text())
    itemsize = np.dtype(meta['dtype']).itemsize
    return all((directory / f'{s}.bin').stat().length ==
               meta[s]['num_blocks'] * meta['block_size'] * itemsize for s in SPLITS)
  except (OSError, ValueError, KeyError):
    return False


def check_meta(directory: epath.Path, meta: dict, expected: dict[str, Any]) -> None:
  """Refuses a folder written for another tokenizer or block size (a copied cache, say)."""
  different = [f'{k}: {meta.get(k)!r} (expected {v!r})' for k, v in expected.items()
               if meta.get(k) != v]
  if different:
    raise UserError(f'the prepared blocks in {directory} were written with other settings '
                    f'({"; ".join(different)}); delete that folder to prepare them again')


def _local(path: epath.Path) -> str:
  """A local file for `np.memmap`: the path itself, or a copy of a remote (gs://) file."""
  if '://' not in str(path):
    return os.fspath(path)
  local = os.path.join(tempfile.gettempdir(), 'mlm_jax_blocks', str(path).split('://', 1)[1])
  if not os.path.exists(local) or os.path.getsize(local) != path.stat().length:
    os.makedirs(os.path.dirname(local), exist_ok=True)
    path.copy(epath.Path(local), overwrite=True)
  return local


def open_prepared(directory: epath.Path) -> Prepared:
  meta = json.loads((directory / META).read_text())
  def load(split: str) -> np.ndarray:
    shape = (meta[split]['num_blocks'], meta['block_size'])
    if shape[0] == 0:
      return np.zeros(shape, meta['dtype'])
    return np.memmap(_local(directory / f'{split}.bin'), dtype=meta['dtype'], mode='r',
                     shape=shape)
  return Prepared(directory, meta, load('train'), load('test'))
