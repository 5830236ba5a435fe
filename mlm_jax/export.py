"""The Hugging Face export: Flax weights, PyTorch weights where torch is installed, tokenizer."""

from typing import Any

import jax
import numpy as np
import transformers

from mlm_jax import storage


def export(model, params: Any, tokenizer, directory) -> None:
  """An HF-format export that `from_pretrained` loads in Flax and, with torch, PyTorch.

  Flax weights always; PyTorch weights (model.safetensors) too where torch is
  installed, so PyTorch users load the export without `from_flax=True`.
  """
  params = jax.device_get(params)

  def save(local: str) -> None:
    model.save_pretrained(local, params=params)
    tokenizer.save_pretrained(local)
    if transformers.utils.is_torch_available():  # Installed, and not disabled by USE_TORCH=0.
      save_pytorch_weights(model.config, params, local)
  storage.save_with(save, directory)


def save_pytorch_weights(config, params: Any, directory: str) -> None:
  """Converts Flax parameters into a PyTorch model saved in `directory`.

  transformers' own `from_pretrained(..., from_flax=True)` builds the PyTorch model on
  the meta device and then cannot copy the Flax weights in (transformers 4.57 with
  torch 2.13), so the model is built on the CPU and the weights loaded explicitly.
  """
  from transformers import modeling_flax_pytorch_utils  # pylint: disable=import-outside-toplevel
  torch_model = transformers.AutoModelForMaskedLM.from_config(config)
  writable = jax.tree_util.tree_map(np.array, params)  # torch.from_numpy wants writable arrays.
  torch_model = modeling_flax_pytorch_utils.load_flax_weights_in_pytorch_model(
      torch_model, writable)
  torch_model.tie_weights()
  torch_model.save_pretrained(directory)
