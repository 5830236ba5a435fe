"""The project's optimizer (`optim.make_optimizer`) against PyTorch's, as the Trainer sets it up.

tests/goldens/optimizer.npz (written by tests/goldens/make_goldens.py) holds a few steps of
`torch.optim.AdamW` with the Trainer's defaults (betas 0.9/0.999, eps 1e-8, weight decay on
`get_decay_parameter_names`' set only), `clip_grad_norm_` to 1.0 and the linear schedule
with warmup, on the `roberta` fixture: the batches, each step's learning rate and gradient
norm, and the parameters after each step. The same steps through our model and our
optimizer must land on the same parameters: this guards clipping, the Adam moments, the
decoupled weight decay and its mask, and where the schedule starts. Each fixture's
weight-decay set is checked against the Trainer's too.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mlm_jax import optim
from mlm_jax.models import FlaxAutoModelForMaskedLM
from mlm_jax.models import hf_checkpoint
from tests.test_goldens import GOLDENS, compiler_options, golden_params

# Parameters are about 0.1 to 1 and each step moves them by up to the rate, 0.05. Adam gives
# every entry a step of about the rate whatever its gradient's size, so the float32 rounding
# of small gradient entries shows: at most 1.5e-6 after step 1 (the first that moves them),
# 7e-6 after step 2. Measured deliberate bugs: b2 0.99 instead of 0.999 moves them by 9e-5
# after step 1 and 9e-4 after step 2; no clipping by 4e-3 and 2.4e-2.
PARAMS_ATOL = 2e-5
# The attention keys' bias: its true gradient is 0 (softmax is blind to it), so its gradient
# is rounding noise near Adam's eps, which Adam turns into steps of about 1e-2 of the rate
# that differ between any two implementations. Not compared.
NOISE_ONLY = '.attention.self.key.bias'


@pytest.fixture(scope='module')
def golden() -> dict[str, np.ndarray]:
  with np.load(GOLDENS / 'optimizer.npz') as f:
    return dict(f)


def optimizer_config(golden) -> ml_collections.ConfigDict:
  """The project's optimizer settings that mirror the golden's (see configs/default.py)."""
  return ml_collections.ConfigDict(dict(
      learning_rate=float(golden['learning_rate']), weight_decay=float(golden['weight_decay']),
      warmup_steps=int(golden['warmup_steps']), lr_schedule='linear',
      max_grad_norm=float(golden['max_grad_norm'])))


def masked_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over the labelled tokens (-100 elsewhere), as PyTorch's."""
  labelled = labels != -100
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(labelled, labels, 0))
  return jnp.sum(jnp.where(labelled, losses, 0.0)) / jnp.sum(labelled)


@pytest.fixture(scope='module')
def trajectory(golden) -> list[dict]:
  """Our steps on the golden's batches: each step's parameters (under PyTorch's names) and
  gradient norm before clipping."""
  model = FlaxAutoModelForMaskedLM.from_pretrained(str(GOLDENS / str(golden['fixture'])))
  tx, _ = optim.make_optimizer(optimizer_config(golden), int(golden['total_steps']))

  @functools.partial(jax.jit, compiler_options=compiler_options())
  def step(params, opt_state, input_ids, labels):
    loss = lambda p: masked_lm_loss(model(input_ids, params=p).logits, labels)
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

  table = model.family.checkpoint_names(model.config)
  params, opt_state, steps = model.params, tx.init(model.params), []
  for input_ids, labels in zip(golden['input_ids'], golden['labels']):
    params, opt_state, norm = step(params, opt_state, input_ids, labels)
    steps.append(dict(params=hf_checkpoint.from_params(jax.device_get(params), table),
                      grad_norm=float(norm),
                      names=[n for n in table.all if not n.endswith(NOISE_ONLY)]))
  return steps


def test_learning_rates_follow_the_trainers_linear_schedule_with_warmup(golden):
  """The rate each update applies: the Trainer's first update, in warmup, applies 0."""
  _, schedule = optim.make_optimizer(optimizer_config(golden), int(golden['total_steps']))
  ours = [float(schedule(step)) for step in range(len(golden['learning_rates']))]
  np.testing.assert_allclose(ours, golden['learning_rates'], rtol=1e-6, atol=1e-9)


def test_gradient_norms_before_clipping_match_pytorch_and_exceed_the_clip(golden, trajectory):
  norms = [s['grad_norm'] for s in trajectory]
  np.testing.assert_allclose(norms, golden['grad_norms'], rtol=1e-5)
  assert min(norms) > 1.1 * float(golden['max_grad_norm'])  # Clipping acts at every step.


@pytest.mark.parametrize('step', range(int(np.load(GOLDENS / 'optimizer.npz')['steps'])))
def test_parameters_after_each_step_match_pytorch(golden, trajectory, step):
  ours = trajectory[step]
  for name in ours['names']:
    np.testing.assert_allclose(ours['params'][name], golden[f'step{step}:{name}'], rtol=0,
                               atol=PARAMS_ATOL, err_msg=name)


@pytest.mark.parametrize('directory', golden_params())
def test_weight_decay_set_is_the_trainers(directory: pathlib.Path):
  """`optim.decay_mask` on our parameters, under PyTorch's names, against the Trainer's
  `get_decay_parameter_names` (which also lists tied copies, such as a tied decoder's
  weight: those must be names the checkpoint table knows as duplicates)."""
  model = FlaxAutoModelForMaskedLM.from_config(
      hf_checkpoint.read_config_dict(str(directory)), _do_init=False)
  table = model.family.checkpoint_names(model.config)
  mask = optim.decay_mask(jax.eval_shape(model.init_weights, model.key))
  ours = {name for name, decayed in hf_checkpoint.from_params(mask, table).items()
          if name in table.all and decayed}
  with np.load(directory / 'outputs.npz') as f:
    trainers = set(f['decay_parameters'].tolist())
  assert trainers <= set(table.all) | table.duplicates
  assert ours == trainers & set(table.all)
