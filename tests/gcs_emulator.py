"""A local Google Cloud Storage emulator (`gcp-storage-emulator`) for the gs:// tests.

Run as `python -m tests.gcs_emulator PORT BUCKET`. It serves on 127.0.0.1 only, in memory.

One fidelity fix: real GCS sends each object's generation in the `x-goog-generation`
header of a media download, and tensorstore (orbax's array storage) reads it to make
the conditional writes of an OCDBT manifest; the emulator omits it, which tensorstore
reports as "Malformed StorageGeneration". The wrapper below adds the header, nothing else.
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj['metageneration'])
  except Exception:  # pylint: disable=broad-except  (not found: the handler answers 404)
    pass
  return _download(request, response, storage, *args, **kwargs)


_download = objects.download


def _patch_routes() -> None:
  objects.download = _download_with_generation
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is _download:
        handlers[method] = _download_with_generation


def main(port: int, bucket: str) -> None:
  _patch_routes()
  emulator = server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  emulator.run()


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2])
