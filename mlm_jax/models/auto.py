"""`FlaxAutoModelForMaskedLM`: a family's Flax module, its config and its parameters.

Code written against transformers' former Flax class moves here by changing its import:

    from mlm_jax.models import FlaxAutoModelForMaskedLM
    model = FlaxAutoModelForMaskedLM.from_pretrained('distilroberta-base', dtype=jnp.bfloat16)
    logits = model(input_ids, attention_mask=mask, params=model.params).logits

Parameters are float32 whatever `dtype` (the computation dtype).
"""

import contextlib
import copy
import logging
from typing import Any, Callable

import flax.struct
import huggingface_hub.errors
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import traverse_util

from mlm_jax import storage
from mlm_jax.errors import UserError
from mlm_jax.models import hf_checkpoint
from mlm_jax.models import registry

_logger = logging.getLogger(__name__)


@flax.struct.dataclass
class MaskedLMOutput:
  logits: jax.Array


def _dtype(dtype) -> Any:
  return jnp.dtype(dtype) if isinstance(dtype, str) else dtype


def config_from_dict(config_dict: dict, where: str) -> transformers.PretrainedConfig:
  """A transformers config (configs only: no model class), for a supported model_type."""
  registry.family(config_dict.get('model_type', ''))  # One line naming the supported ones.
  try:
    return transformers.AutoConfig.for_model(**config_dict)
  # transformers 5 validates configs as strict dataclasses (huggingface_hub's errors).
  except (ValueError, TypeError, huggingface_hub.errors.StrictDataclassError) as e:
    reason = ' '.join(str(e).split())  # The validators' own words, on one line.
    raise UserError(f'{where}: config.json is not a valid {config_dict["model_type"]} config '
                    f'({reason}); fix or re-save it') from None


class FlaxAutoModelForMaskedLM:
  """A masked LM of any supported family (see `registry.FAMILIES`).

  Built from a transformers config (here a tiny BERT: no hub, no download), called on token
  ids, saved in HF format and loaded back (`from_pretrained` takes hub ids too):

  >>> import tempfile
  >>> import numpy as np
  >>> import transformers
  >>> from mlm_jax.models import FlaxAutoModelForMaskedLM
  >>> config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
  ...                                  num_attention_heads=2, intermediate_size=32)
  >>> model = FlaxAutoModelForMaskedLM.from_config(config, seed=0)
  >>> ids = np.array([[2, 15, 4, 3]])
  >>> logits = model(ids, attention_mask=np.ones_like(ids), params=model.params).logits
  >>> logits.shape
  (1, 4, 100)
  >>> directory = tempfile.mkdtemp()
  >>> model.save_pretrained(directory)  # model.safetensors under PyTorch's names, config.json
  >>> again = FlaxAutoModelForMaskedLM.from_pretrained(directory)
  >>> reloaded = again(ids, params=again.params).logits
  >>> bool(np.allclose(reloaded, model(ids, params=model.params).logits))
  True
  """

  def __init__(self, config: transformers.PretrainedConfig, params: Any = None,
               dtype: Any = jnp.float32, seed: int = 0, attention_impl: str = 'auto',
               remat_policy: str = 'none'):
    self.config = config
    self.family = registry.family(config.model_type)
    self.dtype = _dtype(dtype)
    self.attention_impl, self.remat_policy = attention_impl, remat_policy
    # `remat_policy` (see `layers.REMAT_POLICIES`) changes what a gradient's backward pass
    # recomputes, never the numbers.
    self.module = self.family.module(config, self.dtype, attention_impl, remat_policy)
    self.key = jax.random.PRNGKey(seed)
    self._params = params

  # --- construction ------------------------------------------------------------------

  @classmethod
  def from_config(cls, config, dtype: Any = jnp.float32, seed: int = 0, _do_init: bool = True,
                  attention_impl: str = 'auto',
                  remat_policy: str = 'none') -> 'FlaxAutoModelForMaskedLM':
    """A fresh model. `_do_init=False` leaves the parameters to `init_weights` (so that they
    can be created sharded, inside a jit), as transformers' argument of that name did."""
    if isinstance(config, dict):
      config = config_from_dict(config, 'the config')
    model = cls(config, None, dtype, seed, attention_impl, remat_policy)
    if _do_init:
      model._params = model.init_weights(model.key)
    return model

  @classmethod
  def from_pretrained(cls, name_or_path: str, dtype: Any = jnp.float32, seed: int = 0,
                      attention_impl: str = 'auto', remat_policy: str = 'none',
                      log: Callable[[str], None] = _logger.warning) -> 'FlaxAutoModelForMaskedLM':
    """A hub id, or a local or `gs://` directory saved by `save_pretrained` (PyTorch's or ours)."""
    with contextlib.ExitStack() as stack:
      if storage.is_remote(name_or_path):
        name_or_path = stack.enter_context(storage.local_copy(name_or_path))
      directory = hf_checkpoint.local_directory(name_or_path)
      config = config_from_dict(hf_checkpoint.read_config_dict(directory), directory)
      model = cls(config, None, dtype, seed, attention_impl, remat_policy)
      model._params = model.load_params(directory, log)
    return model

  def load_params(self, directory: str, log: Callable[[str], None]) -> dict:
    """The parameters of the checkpoint in `directory`, checked against this model's shapes."""
    flax_params = hf_checkpoint.read_flax_msgpack(directory)
    if flax_params is not None:  # An export of this project's earlier releases.
      return self.check_params(flax_params, directory)
    flat_shapes = {k: v.shape for k, v in
                   traverse_util.flatten_dict(self.params_shape_tree, sep='/').items()}
    params = hf_checkpoint.to_params(
        hf_checkpoint.read_tensors(directory), self.family.checkpoint_names(self.config),
        flat_shapes, directory, lambda: jax.device_get(self.init_weights(self.key)), log)
    return params

  def with_vocab_size(self, vocab_size: int, params: Any) -> 'FlaxAutoModelForMaskedLM':
    """The same model with a table of `vocab_size` rows and `params` (resized to match)."""
    config = copy.deepcopy(self.config)
    config.vocab_size = vocab_size
    model = type(self)(config, params, self.dtype, 0, self.attention_impl, self.remat_policy)
    model.key = self.key
    return model

  # --- parameters ---------------------------------------------------------------------

  def init_weights(self, rng: jax.Array, input_shape: tuple[int, int] = (1, 1)) -> dict:
    """Fresh float32 parameters at the reference's scales (normal(initializer_range)
    weights and embeddings, zero biases, unit LayerNorm scales)."""
    return self.module.init({'params': rng}, jnp.zeros(input_shape, jnp.int32))['params']

  def check_params(self, params: dict, where: str) -> dict:
    """`params` (an orbax checkpoint's, or an earlier release's export) as float32 numpy,
    after checking that its tree and shapes are this model's; else one line naming the
    parameter that differs."""
    return _check_tree(params, self.params_shape_tree, where)

  @property
  def params(self) -> dict:
    if self._params is None:
      raise ValueError('this model was built with _do_init=False; call init_weights')
    return self._params

  @params.setter
  def params(self, params: dict) -> None:
    self._params = params

  @property
  def params_shape_tree(self) -> dict:
    """The parameters' shapes and dtypes, computed without creating them."""
    return jax.eval_shape(self.init_weights, self.key)

  @property
  def _is_initialized(self) -> bool:
    return self._params is not None

  @property
  def max_positions(self) -> int:
    """Tokens a row may hold."""
    return self.family.max_positions(self.config)

  # --- calls ---------------------------------------------------------------------------

  def __call__(self, input_ids, attention_mask=None, params=None, train: bool = False,
               dropout_rng: jax.Array | None = None, predict_at=None,
               segment_ids=None) -> MaskedLMOutput:
    """Logits [batch, seq, vocab], or [batch, k, vocab] at the token indices `predict_at`.

    `attention_mask=None` promises no padding. `segment_ids` [batch, seq] keeps attention
    inside each segment (document-aware attention). Dropout draws from `dropout_rng` when
    `train`.
    """
    rngs = {'dropout': dropout_rng} if train and dropout_rng is not None else {}
    logits = self.module.apply(
        {'params': self.params if params is None else params},
        jnp.asarray(input_ids, jnp.int32), attention_mask, segment_ids, predict_at,
        deterministic=not train, rngs=rngs)
    return MaskedLMOutput(logits=logits)

  # --- saving --------------------------------------------------------------------------

  def config_dict(self) -> dict:
    """config.json as PyTorch transformers reads it: this family's architecture, float32."""
    config = self.config.to_dict()
    config.pop('torch_dtype', None)
    config.update(architectures=[self.family.architecture], dtype='float32')
    return config

  def save_pretrained(self, directory: str, params: Any = None) -> None:
    """`model.safetensors` under PyTorch's names and `config.json`, to a local or `gs://`
    directory. PyTorch transformers loads it as it is."""
    tensors = hf_checkpoint.from_params(jax.device_get(self.params if params is None else params),
                                        self.family.checkpoint_names(self.config))
    storage.save_with(lambda local: hf_checkpoint.write(local, tensors, self.config_dict()),
                      directory)


def _check_tree(params: dict, shapes: dict, where: str) -> dict:
  """An earlier release's parameter tree, checked against this model's."""
  flat = traverse_util.flatten_dict(params, sep='/')
  expected = traverse_util.flatten_dict(shapes, sep='/')
  for path in sorted(set(flat) ^ set(expected)):
    state = 'lacks' if path in expected else 'holds the unexpected'
    raise UserError(f'{where}: the Flax checkpoint {state} parameter {path!r}; it was made for '
                    'another model, or by a release whose parameter names differ')
  for path, value in flat.items():
    if tuple(np.shape(value)) != tuple(expected[path].shape):
      raise UserError(f'{where}: the Flax parameter {path!r} has shape {np.shape(value)}, but '
                      f'config.json asks for {tuple(expected[path].shape)}')
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
