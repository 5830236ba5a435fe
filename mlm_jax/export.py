"""The Hugging Face export: `model.safetensors` under PyTorch's names, `config.json` and the
tokenizer, written without torch. PyTorch transformers loads it as it is."""

import os
import shutil
from typing import Any

import jax

from mlm_jax import storage


def export(model, params: Any, tokenizer, directory) -> None:
  """Writes the model with `params` and its tokenizer to `directory` (local or gs://).

  A local export is written beside `directory` and renamed into its place once complete, so
  that a failed export (a full disk) leaves no partial one that a rerun would take for a
  finished run's, nor the space it took. (A gs:// export is written locally, then uploaded.)
  """
  params = jax.device_get(params)

  def save(local: str) -> None:
    model.save_pretrained(local, params=params)
    tokenizer.save_pretrained(local)

  directory = storage.path(directory)
  if storage.is_remote(directory):
    storage.save_with(save, directory)
    return
  staging = directory.parent / f'{directory.name}.partial'
  shutil.rmtree(staging, ignore_errors=True)
  try:
    save(os.fspath(staging))
    if directory.exists():
      shutil.rmtree(directory)
    staging.rename(directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
