"""The Hugging Face export: `model.safetensors` under PyTorch's names, `config.json` and the
tokenizer, written without torch. PyTorch transformers loads it as it is."""

from typing import Any

import jax

from mlm_jax import storage


def export(model, params: Any, tokenizer, directory) -> None:
  """Writes the model with `params` and its tokenizer to `directory` (local or gs://)."""
  params = jax.device_get(params)

  def save(local: str) -> None:
    model.save_pretrained(local, params=params)
    tokenizer.save_pretrained(local)
  storage.save_with(save, directory)
