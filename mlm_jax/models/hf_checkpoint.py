"""Hugging Face checkpoints in and out: safetensors under PyTorch's names, without torch.

In: a local directory, or a hub id fetched with `huggingface_hub` (config, tokenizer and
weight files only). Weights come from `model.safetensors`, a sharded
`model.safetensors.index.json`, `pytorch_model.bin` (through torch, where installed), or
`flax_model.msgpack` (exports of earlier releases of this project). Every tensor is named
by the family's explicit table (`checkpoint_names.Table`); a missing, unexpected or
misshapen tensor is a one-line error naming it.

Out: `model.safetensors` under PyTorch's names (what `save_pretrained` writes, tied
tensors left out), and `config.json` with the architecture and float32 weights.
"""

import json
import os
from typing import Any, Callable

import numpy as np
from flax import serialization
from flax import traverse_util

from mlm_jax.errors import UserError, first_line
from mlm_jax.models import checkpoint_names as names

SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
PYTORCH_BIN = 'pytorch_model.bin'
FLAX_MSGPACK = 'flax_model.msgpack'  # Exports of this project's releases on transformers 4.
CONFIG = 'config.json'
# What a hub download fetches: the config, tokenizer files and weights, nothing else.
HUB_PATTERNS = ('config.json', '*.safetensors', SAFETENSORS_INDEX, 'tokenizer*', 'vocab*',
                'merges.txt', 'special_tokens_map.json', 'added_tokens.json', '*.model',
                'sentencepiece*')

Tensors = dict[str, np.ndarray]


# ----------------------------------------------------------------------------
# Finding the files.

def local_directory(name_or_path: str) -> str:
  """A local directory holding the checkpoint: the path itself, or the hub snapshot of an
  id (only config, tokenizer and weight files; `pytorch_model.bin` only when the repository
  has no safetensors)."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path) or name_or_path.startswith(('.', '/')):
    raise UserError(f'{name_or_path!r} is not a model directory; pass a directory with '
                    'config.json or a hub id')
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  try:
    directory = huggingface_hub.snapshot_download(name_or_path, allow_patterns=list(HUB_PATTERNS))
    if not _has_weights(directory):
      huggingface_hub.hf_hub_download(name_or_path, PYTORCH_BIN)
      directory = huggingface_hub.snapshot_download(
          name_or_path, allow_patterns=list(HUB_PATTERNS) + [PYTORCH_BIN])
  except Exception as e:  # pylint: disable=broad-except  (offline, unknown id, no access, ...)
    raise UserError(f'could not fetch {name_or_path!r} from the hub ({first_line(e)}); pass '
                    'a hub id you can reach or a local model directory') from None
  return directory


def _has_weights(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, f))
             for f in (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, FLAX_MSGPACK))


def read_config_dict(directory: str) -> dict:
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise UserError(f'{directory!r} has no {CONFIG}; pass an HF-format model directory or hub id')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{path} is not valid JSON ({first_line(e)}); restore or re-save it') from None


# ----------------------------------------------------------------------------
# Reading tensors.

def _read_safetensors(path: str) -> Tensors:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError: truncated, garbled)
    raise UserError(f'{path} is not a readable safetensors file ({first_line(e)}); '
                    'download or save it again') from None


def _read_sharded(directory: str) -> Tensors:
  index_path = os.path.join(directory, SAFETENSORS_INDEX)
  try:
    with open(index_path, encoding='utf-8') as f:
      weight_map = json.load(f)['weight_map']
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f'{index_path} is not a safetensors index ({first_line(e)}); '
                    'download or save the checkpoint again') from None
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    path = os.path.join(directory, shard)
    if not os.path.isfile(path):
      raise UserError(f'{index_path} names the shard {shard}, which {directory} lacks; '
                      'download the whole checkpoint again')
    tensors.update(_read_safetensors(path))
  return tensors


def _read_pytorch_bin(directory: str) -> Tensors:
  path = os.path.join(directory, PYTORCH_BIN)
  import transformers  # pylint: disable=import-outside-toplevel
  if not transformers.utils.is_torch_available():
    raise UserError(f'{directory} has only PyTorch weights ({PYTORCH_BIN}); install torch '
                    '(pip install torch) to read them, or convert them to model.safetensors')
  import torch  # pylint: disable=import-outside-toplevel
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_tensors(directory: str) -> Tensors:
  """Every tensor of the checkpoint's PyTorch weights, as numpy arrays."""
  if os.path.isfile(os.path.join(directory, SAFETENSORS)):
    return _read_safetensors(os.path.join(directory, SAFETENSORS))
  if os.path.isfile(os.path.join(directory, SAFETENSORS_INDEX)):
    return _read_sharded(directory)
  if os.path.isfile(os.path.join(directory, PYTORCH_BIN)):
    return _read_pytorch_bin(directory)
  raise UserError(f'{directory} has no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or '
                  f'{PYTORCH_BIN}); pass a directory saved with save_pretrained')


def read_flax_msgpack(directory: str) -> dict | None:
  """The parameters of an export written by this project's earlier releases, if that is
  all the directory holds."""
  path = os.path.join(directory, FLAX_MSGPACK)
  if not os.path.isfile(path) or any(
      os.path.isfile(os.path.join(directory, f)) for f in (SAFETENSORS, SAFETENSORS_INDEX)):
    return None
  with open(path, 'rb') as f:
    try:
      return serialization.msgpack_restore(f.read())
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'{path} is not a readable Flax checkpoint ({first_line(e)}); '
                      'export the model again') from None


# ----------------------------------------------------------------------------
# PyTorch names <-> parameters.

def _legacy_name(name: str) -> str:
  """Old BERT checkpoints name LayerNorm's weight and bias gamma and beta."""
  if name.endswith('.gamma'):
    return name[:-len('gamma')] + 'weight'
  if name.endswith('.beta'):
    return name[:-len('beta')] + 'bias'
  return name


def _canonical(name: str, table: names.Table) -> str:
  """The table's name for a file's tensor: legacy suffixes renamed, and the base prefix
  restored for checkpoints of the bare encoder (`embeddings...` -> `roberta.embeddings...`)."""
  name = _legacy_name(name)
  if name in table.all or name in table.duplicates:
    return name
  prefixed = f'{table.base_prefix}.{name}'
  return prefixed if prefixed in table.all else name


def _is_unused(name: str, table: names.Table) -> bool:
  return any(pattern in f'.{name}' for pattern in table.unused)


def to_params(tensors: Tensors, table: names.Table, shapes: dict[str, tuple],
              where: str, fresh_head: Callable[[], dict], log: Callable[[str], None]) -> dict:
  """The parameter tree from PyTorch-named tensors.

  `shapes`: the module's parameter shapes by '/'-joined path. A checkpoint without any of
  the masked-LM head's tensors (a bare encoder) gets `fresh_head()`'s, and says so.
  """
  by_name = {}
  for name, value in tensors.items():
    canonical = _canonical(name, table)
    if canonical in table.duplicates and canonical not in table.all:
      continue
    if canonical not in table.all:
      if _is_unused(canonical, table):
        continue
      raise UserError(f'{where} holds the tensor {name!r}, which this {table.base_prefix} '
                      'model does not have; check that config.json matches the weights')
    by_name[canonical] = value
  missing = [n for n in table.all if n not in by_name]
  head_missing = [n for n in table.head if n not in by_name]
  if head_missing and len(head_missing) == len(table.head):
    log(f'{where} has no masked-LM head; a fresh one is initialised')
    missing = [n for n in missing if n not in table.head]
    flat_fresh = traverse_util.flatten_dict(fresh_head(), sep='/')
    by_name.update({n: _to_torch(table.head[n], np.asarray(flat_fresh[table.head[n]]))
                    for n in table.head})
  if missing:
    raise UserError(f'{where} lacks the tensor {missing[0]!r}' +
                    (f' and {len(missing) - 1} more' if len(missing) > 1 else '') +
                    '; check that config.json matches the weights')
  flat = {}
  for name, path in table.all.items():
    value = _from_torch(path, by_name[name])
    if tuple(value.shape) != tuple(shapes[path]):
      raise UserError(f'{where}: the tensor {name!r} has shape {_torch_shape(path, value)}, '
                      f'but config.json asks for {_torch_shape(path, np.empty(shapes[path]))}; '
                      'check that config.json matches the weights')
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


def _from_torch(path: str, value: np.ndarray) -> np.ndarray:
  return value.T if names.is_kernel(path) else value


def _to_torch(path: str, value: np.ndarray) -> np.ndarray:
  return value.T if names.is_kernel(path) else value


def _torch_shape(path: str, value: np.ndarray) -> tuple:
  return tuple(_to_torch(path, value).shape)


def from_params(params: Any, table: names.Table) -> Tensors:
  """PyTorch-named float32 tensors of the parameter tree (tied tensors left out, as
  `save_pretrained` leaves them out)."""
  flat = traverse_util.flatten_dict(params, sep='/')
  unmapped = set(flat) - set(table.all.values())
  if unmapped:
    raise ValueError(f'parameters without a PyTorch name: {sorted(unmapped)[:3]}')
  tensors = {name: np.ascontiguousarray(_to_torch(path, np.asarray(flat[path], np.float32)))
             for name, path in table.all.items()}
  return tensors | {copy: tensors[source] for copy, source in table.copies.items()}


def write(directory: str, tensors: Tensors, config_dict: dict) -> None:
  """`model.safetensors` (with the metadata PyTorch transformers reads) and `config.json`."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, SAFETENSORS), metadata={'format': 'pt'})
  with open(os.path.join(directory, CONFIG), 'w', encoding='utf-8') as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)
    f.write('\n')
