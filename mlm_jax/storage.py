"""Where a run's files live: a local folder or a cloud bucket (`gs://`), through one path type.

Every path of a run (workdir, checkpoints, tokenizer, metrics, export, cache, data
files) is an etils `epath.Path`, the path type orbax itself uses: local paths stay
plain files, `gs://` goes through gcsfs (and tensorstore, for orbax's arrays).
transformers' `save_pretrained`/`from_pretrained` only know local folders, so
those go through a local temporary folder that is copied to or from the bucket.
"""

import contextlib
import glob as glob_lib
import os
import tempfile
import uuid
from typing import Callable, Iterator

from etils import epath

from mlm_jax.errors import UserError, first_line

EMULATOR_ENV = 'STORAGE_EMULATOR_HOST'  # gcsfs and google-cloud-storage read it.


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def path(location) -> epath.Path:
  """`location` as an `epath.Path`: URLs as they are, local paths made absolute.

  Never `os.path.abspath` of a URL, which would turn `gs://b/x` into `CWD/gs:/b/x`.
  """
  location = os.fspath(location)
  if is_remote(location):
    return epath.Path(location)
  return epath.Path(os.path.abspath(os.path.expanduser(location)))


def bucket(location) -> str:
  """The bucket of a `gs://bucket/...` URL."""
  return os.fspath(location).split('://', 1)[1].split('/', 1)[0]


def check_gcs_ready(location: str, write: bool = True) -> None:
  """Fails fast, naming the bucket, where no client library (or, to write, no credentials) exist.

  Reading needs no credentials: gcsfs reads a public bucket anonymously.
  """
  try:
    import gcsfs  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise UserError(f'{location} is on Google Cloud Storage, which needs gcsfs: '
                    'pip install "mlm_jax[gcs]" (or pip install gcsfs)') from None
  if not write or os.environ.get(EMULATOR_ENV):  # A local emulator takes no credentials.
    return
  import google.auth  # pylint: disable=import-outside-toplevel
  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError:
    raise UserError(f'no Google Cloud credentials to write bucket {bucket(location)!r} '
                    f'({location}); run `gcloud auth application-default login`, or run on '
                    'a VM whose service account can write the bucket') from None


def check_writable(workdir, host: int) -> None:
  """Creates `workdir` and writes, reads back and removes a probe file in it.

  The probe is named after the host and a random id, never the PID: containers
  on different hosts often share PIDs, and one host would delete another's probe.
  """
  location = os.fspath(workdir)
  if location.startswith('gs://'):
    check_gcs_ready(location)
  directory = path(location)
  probe = directory / f'.write-probe-host{host}-{uuid.uuid4().hex}'
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    if probe.read_text() != 'ok':
      raise OSError(f'{probe} read back wrong')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError, gcsfs and HTTP errors alike)
    where = f'bucket {bucket(location)!r}' if is_remote(location) else 'it'
    reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
    raise UserError(f'workdir {location!r} cannot be written ({type(e).__name__}: {reason}); '
                    f'check that {where} exists and is writable, or pass another --workdir'
                    ) from None


def glob(pattern: str) -> list[str]:
  """The paths matching a local or `gs://` glob, sorted.

  In a bucket `**` raises NotImplementedError: epath refuses it, since a bucket has no folders
  and it would take one listing per level it crosses.
  """
  if not is_remote(pattern):
    return sorted(glob_lib.glob(os.path.expanduser(pattern)))
  scheme, rest = pattern.split('://', 1)
  name, _, inside = rest.partition('/')
  return sorted(os.fspath(p) for p in epath.Path(f'{scheme}://{name}').glob(inside))


def _filesystem(location):
  """epath's own fsspec filesystem (gcsfs) for `location`.

  The same instance, so that its cached folder listings see what epath wrote, and the
  reverse: another instance would miss a folder written through this one. (Where TensorFlow
  is installed epath reads gs:// through tf.io.gfile instead, which caches no listings.)
  """
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  return backend.fsspec_backend.fs(os.fspath(location))


def checksum(location) -> str | None:
  """A bucket file's content key without reading it: the checksum GCS keeps, and the size.

  md5 where the object has one; composite objects (parallel uploads) only have crc32c,
  32 bits, which the size backs up. None where the store keeps neither.
  """
  info = _filesystem(location).info(os.fspath(location))
  for name in ('md5Hash', 'crc32c'):
    if info.get(name):
      return f'{name}={info[name]},size={info["size"]}'
  return None


def copy(source, target) -> None:
  """Copies one file; from bucket to bucket on the server, no bytes through this host."""
  source, target = path(source), path(target)
  if is_remote(source) and is_remote(target):
    _filesystem(source).copy(os.fspath(source), os.fspath(target))
  else:
    source.copy(target, overwrite=True)


def save_with(save: Callable[[str], None], directory) -> None:
  """Runs `save(local_folder)` (a `save_pretrained`) so that the files land in `directory`."""
  directory = path(directory)
  if not is_remote(directory):
    save(os.fspath(directory))
    return
  with tempfile.TemporaryDirectory() as local:
    save(local)
    upload(local, directory)


def upload(local: str, directory: epath.Path) -> None:
  for root, _, files in os.walk(local):
    for name in files:
      source = os.path.join(root, name)
      target = directory / os.path.relpath(source, local)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(epath.Path(source).read_bytes())


@contextlib.contextmanager
def local_copy(directory) -> Iterator[str]:
  """A local folder with the files of `directory` (itself, where it is local)."""
  directory = path(directory)
  if not is_remote(directory):
    yield os.fspath(directory)
    return
  with tempfile.TemporaryDirectory() as local:
    download(directory, local)
    yield local


def download(directory: epath.Path, local: str) -> None:
  # Level by level: epath refuses `**` globs on GCS (one listing per folder is what it costs).
  for source in directory.iterdir():
    target = os.path.join(local, source.name)
    if source.is_dir():
      os.makedirs(target, exist_ok=True)
      download(source, target)
    else:
      epath.Path(target).write_bytes(source.read_bytes())


@contextlib.contextmanager
def local_files(files: list[str]) -> Iterator[list[str]]:
  """`files` as local paths: bucket files are copied into a temporary folder.

  For readers that only open local files, or refuse URLs (`datasets` offline).
  """
  if not any(is_remote(f) for f in files):
    yield list(files)
    return
  with tempfile.TemporaryDirectory() as local:
    copies = []
    for index, name in enumerate(files):
      if is_remote(name):
        copy = os.path.join(local, f'{index}-{os.path.basename(name)}')
        epath.Path(copy).write_bytes(epath.Path(name).read_bytes())
        name = copy
      copies.append(name)
    yield copies
