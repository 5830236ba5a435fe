"""What the CPU speed-ups of the train step must not change (BENCHMARKS.md, *CPU against PyTorch*).

Guards the random bits (Threefry written out on CPU, `mlm_jax.threefry`: the Random123
known answers, and that the loop is really gone), and the masked-only head pooled over each
device's rows (`steps.micro_batch_predictions`, `layers.gather_positions` with groups): its
bound covers the pool's exact binomial tail, and a step with it computes the full head's
loss and gradient. The vocabulary bias's gradient is a product with ones
(`layers.add_vocab_bias`, every family's), not XLA:CPU's slow reduction over rows, and the same
sum.
`layers.Dense` is flax's `nn.Dense` (parameters, forward, gradients), with no product over the
leading dimension of both operands on CPU (XLA:CPU's slow path) in its backward, nor in any
family's gradient. Exact GELU is computed with erf (PyTorch's form), not XLA's costlier erfc.
With `predict_at` the last encoder layer of every family computes only those rows past its
attention (`layers.LayerStack`), with the whole layer's logits there, dropout on too (the
same draws).
The optimizer's one-pass update (`optim.ClippedAdamW.update_if_finite`) is optax's chain, clipped
or not, and a non-finite step leaves every parameter, moment and count as it was.
Fill-mask pads to one of 8 lengths per power of two (`infer._bucket`), and its entry point
keeps JAX's compiled programs in the package's cache folder (`cli.use_compilation_cache`).
The train and evaluation steps are compiled with the project's XLA:CPU options
(`compiler_options`), which change the model's loss and gradient only by the order of float32
sums, and no element-wise result beyond a rounding: NaNs, infinities and signed zeros stay as
IEEE arithmetic gives them (no fast math, no NaN-ignoring max and min).
"""

import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import transformers
from jax.extend.random import threefry_2x32

from mlm_jax import cli
from mlm_jax import compiler_options
from mlm_jax import infer
from mlm_jax import masking
from mlm_jax import model as model_lib
from mlm_jax import optim
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax import threefry
from mlm_jax.models import FlaxAutoModelForMaskedLM
from mlm_jax.models import layers

# Random123's known-answer vectors for Threefry-2x32, 20 rounds: (key, counter, output).
KNOWN_ANSWERS = (((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
                 ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
                 ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)))


@pytest.fixture(scope='module', autouse=True)
def written_out_threefry():
  assert threefry.install()


@pytest.mark.parametrize('key, counter, expected', KNOWN_ANSWERS)
def test_written_out_threefry_gives_the_known_answers(key, counter, expected):
  out = jax.jit(threefry_2x32)(jnp.asarray(key, jnp.uint32), jnp.asarray(counter, jnp.uint32))
  assert [int(x) for x in out] == list(expected)


def test_random_bits_lower_without_a_loop_on_cpu():
  lowered = jax.jit(lambda key: jax.random.bits(key, (4, 8))).lower(jax.random.PRNGKey(0))
  assert 'while' not in lowered.as_text()


@pytest.mark.parametrize('rows, length, probability', [(32, 64, 0.15), (8, 128, 0.15),
                                                       (4, 32, 0.3), (16, 16, 0.15)])
def test_pooled_bound_covers_the_pools_exact_tail(rows, length, probability):
  row_bound = model_lib.max_predictions(length, probability)
  pooled = steps_lib.micro_batch_predictions(rows, length, probability, row_bound)
  assert model_lib.max_predictions(rows * length, probability) <= pooled < rows * row_bound


def test_pooled_bound_of_one_row_is_the_rows_own():
  assert steps_lib.micro_batch_predictions(1, 64, 0.15, 30) == 30


def test_vocabulary_bias_gradient_is_the_column_sum_taken_as_a_product():
  gradient = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
  backward = jax.vjp(layers.add_vocab_bias, jnp.zeros((2, 3, 5)), jnp.zeros(5))[1]
  jaxpr = jax.make_jaxpr(backward)(gradient)
  logits_gradient, bias_gradient = backward(gradient)
  np.testing.assert_array_equal(logits_gradient, gradient)
  np.testing.assert_allclose(bias_gradient, gradient.sum(axis=(0, 1)), rtol=1e-6)
  primitives = {equation.primitive.name for equation in jaxpr.jaxpr.eqns}
  assert 'dot_general' in primitives and 'reduce_sum' not in primitives


@pytest.mark.parametrize('features', [8, 32])  # Narrower, then wider than the inputs' 16.
def test_dense_is_flaxs_dense(features):
  inputs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 16)), jnp.float32)
  ours = layers.dense(features, jnp.float32, 0.02, 'dense')
  flax_dense = nn.Dense(features, param_dtype=jnp.float32, kernel_init=layers.normal(0.02))
  params = ours.init(jax.random.PRNGKey(0), inputs)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                         flax_dense.init(jax.random.PRNGKey(0), inputs))
  np.testing.assert_array_equal(ours.apply(params, inputs), flax_dense.apply(params, inputs))
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                         jax.grad(loss(ours), argnums=(0, 1))(params, inputs),
                         jax.grad(loss(flax_dense), argnums=(0, 1))(params, inputs))


@pytest.mark.parametrize('features', [8, 32])
def test_dense_backward_has_no_product_over_leading_dimensions_on_cpu(features):
  inputs = jnp.ones((2, 8, 16))
  dense = layers.dense(features, jnp.float32, 0.02, 'dense')
  params = dense.init(jax.random.PRNGKey(0), inputs)
  backward = jax.jit(jax.grad(lambda p, x: jnp.sum(dense.apply(p, x) ** 2)))
  assert 'lhs_contracting_dims={0}' not in backward.lower(params, inputs).compile().as_text()


def _dimensions(hlo_shape: str) -> list[int]:
  """[16, 24] of '%dot.7 = f32[16,24]{1,0}'."""
  return [int(d) for d in re.search(r'\[([\d,]*)\]', hlo_shape).group(1).split(',') if d]


def _xla_products_over_leading_dimensions(hlo: str) -> list[str]:
  """The matrix products contracting the leading dimension of both operands that XLA:CPU runs
  with its own loops: those outside the computations YNNPACK's fusions call (a tied decoder's
  table gradient is such a product, but one of YNNPACK's), with both operands wider than one
  column (`add_vocab_bias` sums its gradient's rows as a product with ones, on purpose)."""
  ynn_called = {line.split('calls=', 1)[1].split(',', 1)[0]
                for line in hlo.splitlines() if '__ynn_fusion' in line and 'calls=' in line}
  found, computation = [], ''
  for line in hlo.splitlines():
    if line.startswith('%') or line.startswith('ENTRY'):
      computation = line.split()[1] if line.startswith('ENTRY') else line.split()[0]
    elif (' dot(' in line and 'lhs_contracting_dims={0}' in line and computation not in ynn_called
          and 1 not in _dimensions(line.split(' dot(')[0])):
      found.append(line.strip())
  return found


@functools.cache
def _gradient_hlo(family: str) -> tuple[str, int]:
  """The compiled HLO of the gradient of `family`'s golden model (its logits' squares summed),
  and its vocabulary's size."""
  model = FlaxAutoModelForMaskedLM.from_pretrained(str(GOLDENS / family))
  ids = jnp.full((2, 8), 5, jnp.int32)
  gradient = jax.jit(jax.grad(lambda params: jnp.sum(model(ids, params=params).logits ** 2)))
  return gradient.lower(model.params).compile().as_text(), model.config.vocab_size


@pytest.mark.parametrize('family', ['albert', 'bert', 'distilbert', 'modernbert', 'roberta'])
def test_no_familys_gradient_has_a_product_over_leading_dimensions_on_cpu(family):
  """Every linear layer of every family is `layers.Dense` (ModernBERT's were flax's `nn.Dense`,
  whose kernel gradients took XLA:CPU's slow path: 9% of the 6 x 256 step at 2,048 tokens)."""
  assert not _xla_products_over_leading_dimensions(_gradient_hlo(family)[0])


@pytest.mark.parametrize('family', ['albert', 'bert', 'distilbert', 'modernbert', 'roberta'])
def test_no_familys_gradient_sums_the_logits_rows_as_a_reduction_on_cpu(family):
  """Every family's vocabulary bias is `layers.add_vocab_bias` (ModernBERT's was `logits +
  bias`, whose gradient was YNNPACK's reduction over rows: 0.4 s of ModernBERT-base's 8 s step at
  1,024 tokens)."""
  hlo, vocab_size = _gradient_hlo(family)
  vocabulary_wide = f'= f32[{vocab_size}]'
  assert not [line for line in hlo.splitlines() if vocabulary_wide in line and ' reduce(' in line]


def test_gelu_is_exact_gelu_through_erf():
  x, gelu = jnp.linspace(-8.0, 8.0, 1001), layers.activation('gelu')
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  assert 'erfc' not in str(jax.make_jaxpr(jax.grad(lambda x: gelu(x).sum()))(x))


ROWS, LENGTH, VOCAB = 4, 16, 100


def _tiny_roberta(layers: int):
  config = transformers.RobertaConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=LENGTH + 2, type_vocab_size=1,
      pad_token_id=1, bos_token_id=0, eos_token_id=2)
  return FlaxAutoModelForMaskedLM.from_config(config, seed=0)


@pytest.fixture(scope='module')
def model():
  # One layer: the pool is the head's (the rows path through deeper stacks is
  # test_last_layer_on_the_predicted_rows_...'s and test_steps.py's).
  return _tiny_roberta(layers=1)


def _gradient_and_loss(model, groups: int | None, options: dict | None = None):
  """One SGD step at rate 1 (the update is the gradient) and its loss: the full head
  (`groups=None`) or the masked-only head pooled over `groups` groups of rows; compiled
  with XLA's `options`."""
  spec = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=VOCAB)
  schedule = optax.constant_schedule(1.0)
  tx = optax.sgd(schedule)
  step = functools.partial(
      steps_lib.train_step, apply_fn=model, tx=tx, schedule=schedule, spec=spec,
      head_fn=None if groups is None else model_lib.head_fn(model),
      max_predictions=model_lib.max_predictions(LENGTH, spec.probability),
      prediction_groups=groups or 1)
  state = steps_lib.create_train_state(model.params, tx, seed=0)
  ids = np.random.default_rng(0).integers(5, VOCAB, (1, ROWS, LENGTH), dtype=np.int32)
  new_state, metrics = jax.jit(step, compiler_options=options)(state, ids)
  gradient = jax.tree_util.tree_map(lambda b, a: np.asarray(b) - np.asarray(a), state.params,
                                    new_state.params)
  sums = metrics['sums']
  return gradient, float(sums.loss_sum), float(sums.predicted_tokens)


GOLDENS = pathlib.Path(__file__).resolve().parent / 'goldens'
# One fixture per family, PyTorch's tiny checkpoint, dropout 0.1 (ALBERT's and ModernBERT's,
# 0 by default, set below).
ROW_FAMILIES = ('albert', 'bert', 'roberta', 'distilbert', 'modernbert')


@pytest.mark.parametrize('family', ROW_FAMILIES)
def test_last_layer_on_the_predicted_rows_gives_the_whole_layers_logits_dropout_on(family):
  """Breaks if a family's row path drops other units than the whole layer does (a dropout mask
  drawn over the rows alone), or skips a part of the last layer."""
  model = FlaxAutoModelForMaskedLM.from_pretrained(str(GOLDENS / family))
  if family == 'modernbert':
    model.config.attention_dropout = model.config.mlp_dropout = 0.1
  if family == 'albert':
    model.config.attention_probs_dropout_prob = model.config.hidden_dropout_prob = 0.1
  length = 12  # Within every fixture's positions (RoBERTa's start after the padding id).
  ids = np.random.default_rng(1).integers(5, model.config.vocab_size, (ROWS, length), np.int32)
  attention_mask = np.ones_like(ids)
  attention_mask[1, 10:] = 0
  predict_at = np.array([[1, 5], [0, 9], [3, 3], [11, 2]], np.int32)

  def logits(predict_at):
    return model(ids, attention_mask=attention_mask, train=True, predict_at=predict_at,
                 dropout_rng=jax.random.key(3)).logits
  at, full = jax.jit(logits)(predict_at), jax.jit(logits)(None)
  assert np.isfinite(full).all()
  np.testing.assert_allclose(at, np.take_along_axis(np.asarray(full), predict_at[..., None], 1),
                             rtol=1e-5, atol=1e-5)
  shapes = {v.aval.shape for eqn in jax.make_jaxpr(logits)(predict_at).jaxpr.eqns
            for v in eqn.outvars}
  width = getattr(model.config, 'intermediate_size', None) or model.config.hidden_dim
  assert (ROWS, 2, width) in shapes  # The last feed-forward runs on the 2 rows of each row.


@pytest.fixture(scope='module')
def full_head(model):
  return _gradient_and_loss(model, None)


def test_pooled_masked_head_gives_the_full_heads_loss_and_gradient(model, full_head):
  """Pooled over 2 groups of rows, as on 2 devices. One group (a 1-device run) is
  test_steps.py's masked-only head test, through `compile_steps`."""
  full_gradient, full_loss, full_count = full_head
  gradient, loss, count = _gradient_and_loss(model, groups=2)
  assert count == full_count > 0
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7), gradient,
      full_gradient)


# LLVM optimises as outside the tests (conftest.py lowers it for speed): the vector width
# only matters where the loops are vectorised.
OPTIMIZED = {'xla_backend_optimization_level': 3}


def test_cpu_compiler_options_keep_the_models_loss_and_gradient():
  """The model as a run compiles it (LLVM's full optimisation, the CPU options) computes the
  masked-LM loss and gradient, dropout on, of the tests' unoptimised build. Breaks if an
  option is not one XLA:CPU takes (renamed in a new jaxlib), or if the build changes the
  arithmetic by more than the order of float32 sums: vector width does change that order (the
  key kernels' gradients, sums that nearly cancel, move by 1e-4 of their largest entry), so
  the tolerance is relative to each leaf's largest entry. The key biases' gradient is rounding
  noise of any size (softmax ignores a shift shared by all keys): left out. The model, not the
  whole train step, since LLVM's full optimisation compiles slowly: the step's other
  arithmetic is integers (the masks' random bits) and the element-wise functions held closer
  by the next test."""
  model = _tiny_roberta(layers=1)
  ids = np.random.default_rng(0).integers(5, VOCAB, (ROWS, LENGTH), dtype=np.int32)
  masked = np.random.default_rng(1).random((ROWS, LENGTH)) < 0.3

  def loss(params):
    logits = model(np.where(masked, 4, ids), params=params, train=True,
                   dropout_rng=jax.random.key(0)).logits
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(masked, picked, 0.0)) / masked.sum()

  expected_loss, expected_gradient = jax.jit(jax.value_and_grad(loss))(model.params)
  options = {**OPTIMIZED, **compiler_options.for_platform('cpu')}
  got_loss, gradient = jax.jit(jax.value_and_grad(loss), compiler_options=options)(model.params)
  np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(gradient),
                               jax.tree_util.tree_leaves(expected_gradient)):
    if not jax.tree_util.keystr(path).endswith("['key']['bias']"):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max(),
                                 err_msg=jax.tree_util.keystr(path))


# NaN, infinities, signed zeros and ordinary values, against each other: IEEE semantics that
# fast-math options give up (`x - x` of an infinity, a NaN through `minimum`).
_SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5, -3.25, 80.0, -100.0, 1e-7, 3e38],
                    np.float32)


def _elementwise(x, y):
  """The element-wise functions of the step: the GELU's erf, the softmax's exp, AdamW's
  division and square root, LayerNorm's rsqrt, the loss's log, and max/min."""
  return dict(max=jnp.maximum(x, y), min=jnp.minimum(x, y), sub=x - y, div=x / y,
              exp=jnp.exp(x), log=jnp.log(x), erf=jax.lax.erf(x), tanh=jnp.tanh(x),
              sqrt=jnp.sqrt(y), rsqrt=jax.lax.rsqrt(y), isnan=jnp.isnan(x * y),
              gelu=jax.nn.gelu(x, approximate=False))


@pytest.mark.parametrize('family', [None, 'modernbert'])
def test_cpu_compiler_options_keep_ieee_arithmetic_element_by_element(family):
  """The options change no element-wise result by more than a rounding: every pair of the
  special values gives the same NaNs, infinities and signed zeros as without them, and the
  finite rest within 2 units in the last place (vector width changes no element's
  arithmetic; the margin is for a CPU whose wider vectors LLVM lowers otherwise).
  Breaks if fast math (`xla_cpu_enable_fast_math`) or NaN-ignoring max/min
  (`xla_cpu_enable_fast_min_max`) joins the options: the step-level test above cannot tell
  those from the order of a sum."""
  x, y = (a.ravel() for a in np.meshgrid(_SPECIAL, _SPECIAL))
  want = jax.jit(_elementwise, compiler_options=OPTIMIZED)(x, y)
  got = jax.jit(_elementwise, compiler_options={
      **OPTIMIZED, **compiler_options.for_platform('cpu', family=family)})(x, y)
  for name in want:
    w, g = np.asarray(want[name]), np.asarray(got[name])
    if w.dtype == np.bool_:
      np.testing.assert_array_equal(g, w, err_msg=name)
      continue
    special = ~np.isfinite(w) | (w == 0)
    np.testing.assert_array_equal(g[special], w[special], err_msg=name)  # NaN equals NaN here.
    signed = np.isinf(w) | (w == 0)  # Not NaN's sign: which NaN an op passes on is not IEEE's.
    np.testing.assert_array_equal(np.signbit(g[signed]), np.signbit(w[signed]), err_msg=name)
    np.testing.assert_array_max_ulp(g[~special], w[~special], maxulp=2)


def test_train_and_evaluation_steps_are_compiled_with_the_cpu_options(model, monkeypatch):
  """An option XLA does not know makes compiling fail: seen, it reached the compiler (past
  the probe that would drop it)."""
  monkeypatch.setattr(compiler_options, '_CPU', {'not_an_xla_option': 1})
  monkeypatch.setattr(compiler_options, 'accepted', dict)
  spec = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=VOCAB)
  schedule = optax.constant_schedule(0.1)
  tx = optax.sgd(schedule)
  steps = steps_lib.compile_steps(model, tx, schedule, spec, 0, sharding.make_mesh())
  state = steps_lib.create_train_state(model.params, tx, seed=0)
  ids = np.random.default_rng(0).integers(5, VOCAB, (1, ROWS, LENGTH), dtype=np.int32)
  with pytest.raises(jax.errors.JaxRuntimeError, match='not_an_xla_option'):
    steps.train.lower(state, ids).compile()
  with pytest.raises(jax.errors.JaxRuntimeError, match='not_an_xla_option'):
    steps_lib.evaluate(steps, model.params, ids[0], ROWS)


def test_a_familys_cpu_options_reach_its_train_step(monkeypatch):
  """`compiler_options._CPU_BY_FAMILY`'s options are compiled into the train step of that
  family's model (its `config.model_type`): an option XLA does not know fails ModernBERT's
  compile. (That other families get none is `test_compiler_options.py`'s.)"""
  monkeypatch.setattr(compiler_options, '_CPU_BY_FAMILY', {'modernbert': {'not_an_xla_option': 1}})
  monkeypatch.setattr(compiler_options, 'accepted', dict)
  modernbert = FlaxAutoModelForMaskedLM.from_pretrained(str(GOLDENS / 'modernbert'))
  spec = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4),
                             vocab_size=modernbert.config.vocab_size)
  schedule = optax.constant_schedule(0.1)
  tx = optax.sgd(schedule)
  steps = steps_lib.compile_steps(modernbert, tx, schedule, spec, 0, sharding.make_mesh())
  state = steps_lib.create_train_state(modernbert.params, tx, seed=0)
  ids = np.random.default_rng(0).integers(5, 40, (1, ROWS, LENGTH), dtype=np.int32)
  with pytest.raises(jax.errors.JaxRuntimeError, match='not_an_xla_option'):
    steps.train.lower(state, ids).compile()


def _optimizer_and_params():
  config = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, lr_schedule='linear',
                                          max_grad_norm=0.5, weight_decay=0.1))
  tx, _ = optim.make_optimizer(config, total_steps=10)
  rng = np.random.default_rng(0)
  params = {'dense': {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=4)},
            'LayerNorm': {'scale': rng.normal(size=4)}}
  return tx, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def _gradients(params, seed: int, scale: float):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), params)


@pytest.mark.parametrize('scale', [1e-2, 10.0])  # Global norm below, then above max_grad_norm.
def test_one_pass_update_is_optaxs_chain(scale):
  tx, params = _optimizer_and_params()
  opt_state = tx.init(params)
  fused = jax.jit(tx.update_if_finite)
  for step in range(3):
    grads = _gradients(params, step, scale)
    updates, expected_state = tx.update(grads, opt_state, params)
    expected_params = optax.apply_updates(params, updates)
    params, opt_state = fused(grads, opt_state, params, jnp.bool_(True))
    for got, want in ((params, expected_params), (opt_state, expected_state)):
      jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                             got, want)


def test_one_pass_update_leaves_a_nonfinite_step_as_it_was():
  tx, params = _optimizer_and_params()
  grads = _gradients(params, 0, 1.0)
  opt_state = tx.update_if_finite(grads, tx.init(params), params, jnp.bool_(True))[1]
  grads['dense']['kernel'] = grads['dense']['kernel'].at[0, 0].set(jnp.nan)
  new_params, new_state = jax.jit(tx.update_if_finite)(grads, opt_state, params, jnp.bool_(False))
  jax.tree_util.tree_map(np.testing.assert_array_equal, (new_params, new_state),
                         (params, opt_state))


def test_fill_mask_pads_by_at_most_an_eighth_of_the_next_power_of_two():
  assert infer._bucket(42) == 48 and infer._bucket(5) == 8 and infer._bucket(1, minimum=1) == 1
  for n in range(1, 513):
    next_power = 1 << (n - 1).bit_length()
    assert n <= infer._bucket(n) < n + max(8, next_power // 8)
  assert len({infer._bucket(n) for n in range(1, 513)}) <= 48  # Few compiled shapes.


@pytest.fixture
def no_compilation_cache():
  saved = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', None)
  yield
  jax.config.update('jax_compilation_cache_dir', saved)


def test_compilation_cache_is_in_the_package_cache_folder(no_compilation_cache, monkeypatch,
                                                          tmp_path):
  monkeypatch.setenv('MLM_JAX_CACHE', str(tmp_path))
  cli.use_compilation_cache()
  assert jax.config.jax_compilation_cache_dir == f'{tmp_path}/jax'


def test_a_named_compilation_cache_wins(no_compilation_cache, monkeypatch, tmp_path):
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'named'))
  monkeypatch.setenv('MLM_JAX_CACHE', str(tmp_path))
  cli.use_compilation_cache()
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'named')
