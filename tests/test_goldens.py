"""Our models against golden fixtures that PyTorch transformers 5 made (tests/goldens/).

CI has no torch, so `tests/goldens/make_goldens.py` wrote, where torch was, each tiny
PyTorch masked LM (every parameter perturbed: no LayerNorm scale at 1, no bias at 0) and
its outputs. Each fixture is loaded with `FlaxAutoModelForMaskedLM.from_pretrained` and
must give PyTorch's logits (with padding too), the masked-positions head's logits, the
masked-LM loss and its gradient wrt every tensor (through the evaluation forward, and through
the training forward with every dropout rate at 0, which writes attention out), and an export
with PyTorch's tensor names and shapes. A fixture whose family `mlm_jax.models.FAMILIES` lacks is an expected failure,
strictly: it shows as xfailed until its family merges, and is then checked like the rest.
"""

import copy
import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from mlm_jax import compiler_options as mlm_compiler_options
from mlm_jax.errors import UserError
from mlm_jax.models import FAMILIES, FlaxAutoModelForMaskedLM
from mlm_jax.models import hf_checkpoint

GOLDENS = pathlib.Path(__file__).resolve().parent / 'goldens'
LOGITS_ATOL = 1e-5
GRAD_RTOL = 1e-5  # Of the largest gradient entry of the same tensor.


def compiler_options() -> dict:
  """Each fixture compiles its own program, which XLA's CPU fusion emitters take 2-4 times
  longer to compile than its older emitters (same numbers), where the installed jaxlib still
has them; these programs are tiny."""
  if jax.default_backend() != 'cpu':
    return {}
  return mlm_compiler_options.accepted({'xla_cpu_use_fusion_emitters': False})


def config_dict(directory: pathlib.Path) -> dict:
  return json.loads((directory / 'config.json').read_text(encoding='utf-8'))


def golden_params() -> list:
  """One pytest.param per fixture folder, xfail (strict) where the family is not merged."""
  params = []
  for directory in sorted(p.parent for p in GOLDENS.glob('*/outputs.npz')):
    merged = config_dict(directory)['model_type'] in FAMILIES
    marks = () if merged else pytest.mark.xfail(strict=True, raises=UserError,
                                                 reason='family not merged yet')
    params.append(pytest.param(directory, id=directory.name, marks=marks))
  return params


def mlm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over the labelled tokens ([batch, k] logits at [batch, k] labels)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def batch_of(expected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: expected[k] for k in ('input_ids', 'padded_input_ids', 'attention_mask',
                                   'masked_positions', 'labels')}


def masked_loss(model: FlaxAutoModelForMaskedLM, params, batch: dict,
                **call) -> tuple[jax.Array, jax.Array]:
  """(masked-LM loss, the head's logits) of the padded batch at its masked positions; `call`
  goes to the model (train=True, dropout_rng=...)."""
  masked_logits = model(batch['padded_input_ids'], attention_mask=batch['attention_mask'],
                        params=params, predict_at=batch['masked_positions'], **call).logits
  labels = jnp.take_along_axis(batch['labels'], batch['masked_positions'], 1)
  return mlm_loss(masked_logits, labels), masked_logits


def our_outputs(model: FlaxAutoModelForMaskedLM, expected: dict[str, np.ndarray]) -> dict:
  """Our logits of both batches, the masked-positions head's logits of the padded one, the
  masked-LM loss and its gradients (a parameter tree): one compiled program per fixture."""
  batch = batch_of(expected)

  def outputs(params, batch):
    loss = functools.partial(masked_loss, model, batch=batch)
    (loss, masked_logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return dict(logits=model(batch['input_ids'], params=params).logits,
                padded_logits=model(batch['padded_input_ids'], params=params,
                                    attention_mask=batch['attention_mask']).logits,
                masked_logits=masked_logits, loss=loss, grads=grads)

  compiled = jax.jit(outputs, compiler_options=compiler_options())
  return jax.device_get(compiled(model.params, batch))


@dataclasses.dataclass
class Golden:
  """A fixture: PyTorch's outputs (`expected`), our model of its checkpoint, and our outputs
  (`ours`, gradients under PyTorch's names)."""
  directory: pathlib.Path
  expected: dict[str, np.ndarray]
  model: FlaxAutoModelForMaskedLM
  ours: dict

  @classmethod
  def load(cls, directory: pathlib.Path) -> 'Golden':
    with np.load(directory / 'outputs.npz') as f:
      expected = dict(f)
    model = FlaxAutoModelForMaskedLM.from_pretrained(str(directory))
    ours = our_outputs(model, expected)
    ours['grads'] = hf_checkpoint.from_params(ours['grads'], table(model))
    return cls(directory, expected, model, ours)

  @property
  def real(self) -> np.ndarray:
    """[batch, seq] True at the padded batch's real tokens."""
    return self.expected['attention_mask'] > 0

  @property
  def table(self):
    return table(self.model)


def table(model: FlaxAutoModelForMaskedLM):
  return model.family.checkpoint_names(model.config)


@pytest.fixture(scope='module', params=golden_params())
def golden(request) -> Golden:
  return Golden.load(request.param)


def test_logits_match_pytorch(golden):
  np.testing.assert_allclose(golden.ours['logits'], golden.expected['logits'], rtol=0,
                             atol=LOGITS_ATOL)


def test_padded_batch_logits_match_pytorch_at_real_tokens(golden):
  np.testing.assert_allclose(golden.ours['padded_logits'][golden.real],
                             golden.expected['padded_logits'][golden.real],
                             rtol=0, atol=LOGITS_ATOL)


def test_masked_positions_head_gives_pytorch_logits_there(golden):
  positions = golden.expected['masked_positions']
  expected = np.take_along_axis(golden.expected['padded_logits'], positions[..., None], 1)
  np.testing.assert_allclose(golden.ours['masked_logits'], expected,
                             rtol=0, atol=LOGITS_ATOL)


def test_masked_lm_loss_matches_pytorch(golden):
  np.testing.assert_allclose(golden.ours['loss'], golden.expected['loss'], rtol=1e-6)


def assert_pytorchs_gradients(golden: Golden, grads: dict[str, np.ndarray]) -> None:
  """Every tensor the forward reads (`table.all`: for an untied decoder, its bias, not the
  unused copy), each within GRAD_RTOL of its own largest entry, or of a thousandth of the
  largest of all: a tensor whose true gradient is 0 (the attention keys' bias, to which
  softmax is blind) holds only rounding noise."""
  expected = {name: golden.expected[f'grad:{name}'] for name in golden.table.all}
  floor = 1e-3 * max(np.abs(g).max() for g in expected.values())
  for name, grad in expected.items():
    np.testing.assert_allclose(grads[name], grad, rtol=0,
                               atol=GRAD_RTOL * max(np.abs(grad).max(), floor), err_msg=name)


def test_gradients_match_pytorch_for_every_tensor(golden):
  assert_pytorchs_gradients(golden, golden.ours['grads'])


def without_dropout(model: FlaxAutoModelForMaskedLM) -> FlaxAutoModelForMaskedLM:
  """`model`, its parameters shared, with every dropout rate of its config at 0."""
  config = copy.deepcopy(model.config)
  for name, value in config.to_dict().items():
    if 'dropout' in name and isinstance(value, float):
      setattr(config, name, 0.0)
  twin = FlaxAutoModelForMaskedLM.from_config(config, _do_init=False)
  twin.params = model.params
  return twin


def test_training_without_dropout_gives_pytorchs_loss_and_gradients(golden):
  """A training forward writes attention out (`layers.attend`: the window as a mask, and
  `layers.attention_scores`' own backward) where evaluation calls
  `jax.nn.dot_product_attention`; with every dropout rate at 0 it must give PyTorch's
  eval-mode loss and gradients as well."""
  model = without_dropout(golden.model)
  train_loss = functools.partial(masked_loss, model, batch=batch_of(golden.expected),
                                 train=True, dropout_rng=jax.random.PRNGKey(0))
  (loss, _), grads = jax.jit(jax.value_and_grad(train_loss, has_aux=True),
                             compiler_options=compiler_options())(model.params)
  np.testing.assert_allclose(loss, golden.expected['loss'], rtol=1e-6)
  assert_pytorchs_gradients(golden, hf_checkpoint.from_params(jax.device_get(grads),
                                                              golden.table))


def test_export_has_pytorch_tensor_names_shapes_and_architecture(golden, tmp_path):
  golden.model.save_pretrained(str(tmp_path))
  shapes = lambda d: {k: v.shape for k, v in load_file(d / 'model.safetensors').items()}
  assert shapes(tmp_path) == shapes(golden.directory)
  ours, theirs = config_dict(tmp_path), config_dict(golden.directory)
  assert (ours['architectures'], ours['model_type']) == (theirs['architectures'],
                                                         theirs['model_type'])


def test_export_writes_the_checkpoint_values_back(golden, tmp_path):
  """Every tensor the forward reads goes back out unchanged (untied decoders also write
  their bias under the unused name, with the bias the forward reads)."""
  golden.model.save_pretrained(str(tmp_path))
  ours, theirs = load_file(tmp_path / 'model.safetensors'), load_file(
      golden.directory / 'model.safetensors')
  for name in golden.table.all:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
