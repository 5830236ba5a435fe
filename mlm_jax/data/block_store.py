"""Token-id blocks on disk: one raw array file per split, read back memory-mapped.

A prepared folder holds `train.bin` and `test.bin` (row-major [num_blocks, block_size] of
`dtype`, uint16 when the vocabulary fits, else int32) and `meta.json`, written last, which
describes them. Writers append whole blocks as the tokenizer produces them, so memory never
grows with the corpus; the folder is written under a temporary name and renamed when complete
(in a bucket, which cannot rename, copied with `meta.json` last), and a reader checks every file
against `meta.json`, so a half-written folder is never read. A temporary folder that its writer
stopped keeping alive (a killed preparation's) is removed by the next preparation beside it.
"""

import contextlib
import dataclasses
import json
import os
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import numpy as np
from etils import epath

from mlm_jax import errors
from mlm_jax import storage
from mlm_jax.errors import UserError

FORMAT_VERSION = 2
SPLITS = ('train', 'test')
META = 'meta.json'
TEMPORARY_PREFIX = '.tmp-'
HEARTBEAT = '.heartbeat'  # In a temporary folder, rewritten while its writer lives.
HEARTBEAT_EVERY_S = 60.0
# A temporary folder in which nothing changed for this long has no live writer: its heartbeat
# would have been rewritten ten times over (clocks of hosts and the bucket differ by less).
STALE_AFTER_S = 600.0


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


@contextlib.contextmanager
def new_folder(parent: epath.Path,
               log: Callable[[str], None] = print) -> Iterator[epath.Path]:
  """A fresh temporary folder in `parent`, for `commit` after the block; removed if it raises.

  While the block runs, a thread rewrites the folder's heartbeat file, so that another
  preparation sharing the cache tells it from a killed one's (`remove_stale_folders`, run
  first). Its data files alone would not tell: a writer may write nothing for long, while it
  counts the examples, skips to a split's slice, or (in a bucket) until a file is closed.
  """
  folder = _make_folder(parent, log)
  try:
    with _heartbeat(folder / HEARTBEAT):
      yield folder
  except BaseException as e:
    folder.rmtree(missing_ok=True)
    if errors.is_disk_full(e):
      raise UserError(f'the cache folder {parent} is on a full disk; free disk space, or set '
                      '--config.cache_dir (or $MLM_JAX_CACHE) to a folder with room, and rerun '
                      'the same command') from e
    raise


def _make_folder(parent: epath.Path, log: Callable[[str], None]) -> epath.Path:
  try:
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(parent, log)
    folder = parent / f'{TEMPORARY_PREFIX}{uuid.uuid4().hex}'
    folder.mkdir()
  except OSError as e:
    raise UserError(f'the cache folder {parent} cannot be written ({e.strerror or e}); set '
                    '--config.cache_dir (or $MLM_JAX_CACHE) to a writable folder') from None
  return folder


@contextlib.contextmanager
def _heartbeat(file: epath.Path) -> Iterator[None]:
  """Rewrites `file` every HEARTBEAT_EVERY_S while the block runs; removes it after."""
  stop = threading.Event()

  def beat() -> None:
    while not stop.wait(HEARTBEAT_EVERY_S):
      try:
        file.write_text(str(time.time()))
      except Exception:  # pylint: disable=broad-except  (a network hiccup: the next beat retries)
        pass

  file.write_text(str(time.time()))
  thread = threading.Thread(target=beat, name='mlm_jax-cache-heartbeat', daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    file.unlink(missing_ok=True)


def remove_stale_folders(parent: epath.Path, log: Callable[[str], None] = print) -> None:
  """Removes the temporary folders in `parent` in which nothing changed for STALE_AFTER_S."""
  try:
    folders = [f for f in parent.iterdir() if f.name.startswith(TEMPORARY_PREFIX)]
  except FileNotFoundError:  # No folder yet (in a bucket: no file under it yet).
    return
  for folder in folders:
    idle = time.time() - _last_change(folder)
    if idle < STALE_AFTER_S:
      continue
    try:
      folder.rmtree()
    except FileNotFoundError:  # Another preparation removed it first.
      continue
    except OSError as e:  # Another user's, say: it only takes space, so go on without.
      log(f'Could not remove {folder}, left by a stopped preparation ({e}); remove it by hand')
      continue
    log(f'Removed {folder}, left by a preparation that stopped {idle / 60:.0f} minutes ago')


def _last_change(folder: epath.Path) -> float:
  """When anything in `folder` (itself included, where local) last changed; now, if it is gone."""
  try:
    times = [folder.stat().mtime]  # 0 in a bucket, which keeps no times for folders.
    for child in folder.iterdir():
      times.append(_last_change(child) if child.is_dir() else child.stat().mtime)
    return max(times)
  except FileNotFoundError:  # Committed or removed while we looked: not ours to remove.
    return time.time()


def commit(folder: epath.Path, meta: dict, directory: epath.Path) -> None:
  """Publishes the complete `folder` as `directory`, `meta.json` last (one writer wins)."""
  text = json.dumps(meta, indent=1, sort_keys=True)
  if storage.is_remote(directory):
    _commit_remote(folder, text, directory)
    return
  (folder / META).write_text(text)
  try:
    folder.rename(directory)
  except OSError:  # Another process committed the same key first: keep theirs.
    folder.rmtree(missing_ok=True)


def _commit_remote(folder: epath.Path, text: str, directory: epath.Path) -> None:
  """A bucket cannot rename a folder: epath's rename copies and deletes each object, in no set
  order, so a reader could find `meta.json` before the files it describes. The files are copied
  (on the server) and `meta.json` written after them: there, its presence means complete."""
  if not (directory / META).exists():  # Else another writer completed it first: keep theirs.
    for source in folder.iterdir():
      storage.copy(source, directory / source.name)
    (directory / META).write_text(text)
  folder.rmtree(missing_ok=True)


def discard(directory: epath.Path) -> None:
  """Removes an incomplete prepared folder, so that a new one can take its place.

  In a bucket, one without `meta.json` may be another writer's commit under way: it is left,
  and `commit` writes over it.
  """
  if storage.is_remote(directory) and not (directory / META).exists():
    return
  directory.rmtree(missing_ok=True)


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
    # Copied beside it, then renamed: another process of this host may have the file mapped,
    # and rewriting it in place would pull the pages from under it.
    partial = f'{local}.{uuid.uuid4().hex}.partial'
    path.copy(epath.Path(partial), overwrite=True)
    os.replace(partial, local)
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
