"""Orbax checkpoints of the whole train state, and the Hugging Face export.

A checkpoint in `WORKDIR/checkpoints/STEP` holds three items: `state` (the train
state pytree), `data` (the position of the next batch) and `config` (the run's
config, to refuse a resume whose config changes what the state means). Orbax
writes each checkpoint into a temporary folder and renames it when complete, so a
reader never sees half a checkpoint.
"""

import importlib.util
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mlm_jax.errors import UserError

# Keys that may change between a run and its resume: they change when or how much is
# logged, evaluated, saved or trained, not what the saved state means.
RESUMABLE_CHANGES = frozenset({
    'num_train_steps', 'num_epochs', 'eval_every_steps', 'eval_batch_size', 'log_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'push_to_hub', 'hub_model_id', 'num_proc',
    'cache_dir', 'per_device_batch_size', 'max_nonfinite_steps', 'fsdp'})


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def model_config_dir(workdir: str) -> str:
  """Where a run keeps its model's config.json, to rebuild the model around a checkpoint."""
  return os.path.join(workdir, 'model')


def make_manager(workdir: str, keep: int | None, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         cleanup_tmp_directories=create)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers={
      'state': ocp.StandardCheckpointHandler(),
      'data': ocp.JsonCheckpointHandler(),
      'config': ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_position: dict,
         config_dict: dict) -> None:
  """Starts an (asynchronous) save; `manager.wait_until_finished()` completes it."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_position),
      config=ocp.args.JsonSave(config_dict)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict, dict]:
  """Restores (state, data position, config) at `step`, laid out like `target`."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore()))
  return restored.state, restored.data, restored.config


def read_metadata(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
  """(data position, config) of the checkpoint at `step`, without reading the state."""
  restored = manager.restore(step, args=ocp.args.Composite(
      data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
  return restored.data, restored.config


def set_aside(workdir: str, step: int) -> str:
  """Moves an unrestorable checkpoint out of the manager's sight, keeping it for inspection."""
  aside = os.path.join(os.path.abspath(workdir), 'unrestorable_checkpoints',
                       f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(os.path.dirname(aside), exist_ok=True)
  shutil.move(os.path.join(checkpoint_dir(workdir), str(step)), aside)
  return aside


def config_differences(saved: dict, current: dict) -> list[str]:
  """The keys whose change would alter what the checkpoint means."""
  keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
  return sorted(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}'
                for k in keys if saved.get(k) != current.get(k))


def check_resumable(saved: dict, current: dict, workdir: str) -> None:
  differences = config_differences(saved, current)
  if differences:
    raise UserError(f'the checkpoint in {workdir} was made with another config '
                    f'({"; ".join(differences)}); resume with the same config or use a new '
                    '--workdir')


def export(model, params: Any, tokenizer, directory: str) -> None:
  """An HF-format export that `from_pretrained` loads in Flax and, with torch, PyTorch.

  Flax weights always; PyTorch weights (model.safetensors) too where torch is
  installed, so PyTorch users load the export without `from_flax=True`.
  """
  params = jax.device_get(params)
  model.save_pretrained(directory, params=params)
  tokenizer.save_pretrained(directory)
  if importlib.util.find_spec('torch') is not None:
    save_pytorch_weights(model.config, params, directory)


def save_pytorch_weights(config, params: Any, directory: str) -> None:
  """Converts Flax parameters into a PyTorch model saved in `directory`.

  transformers' own `from_pretrained(..., from_flax=True)` builds the PyTorch model on
  the meta device and then cannot copy the Flax weights in (transformers 4.57 with
  torch 2.13), so the model is built on the CPU and the weights loaded explicitly.
  """
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers import modeling_flax_pytorch_utils  # pylint: disable=import-outside-toplevel
  torch_model = transformers.AutoModelForMaskedLM.from_config(config)
  writable = jax.tree_util.tree_map(np.array, params)  # torch.from_numpy wants writable arrays.
  torch_model = modeling_flax_pytorch_utils.load_flax_weights_in_pytorch_model(
      torch_model, writable)
  torch_model.tie_weights()
  torch_model.save_pretrained(directory)
