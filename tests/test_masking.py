"""BERT-style dynamic masking: its statistics, what it never touches, and its determinism.

The multi-device tests check that a row's mask depends only on the step's rng and
the row's global index, so 8 devices (jit or pmap) mask exactly as 1 does.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_jax import masking
from mlm_jax import tokenizer as tokenizer_lib
from tests.multidevice import run_with_devices

SPEC = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=300)
ROWS, LENGTH = 64, 128
SEEDS = (0, 1, 2, 3)

_mask = jax.jit(masking.mask_tokens, static_argnames='spec')


def make_ids(seed: int = 0) -> np.ndarray:
  """[ROWS, LENGTH] ids as training sees them: <s> at row starts, a document boundary
  </s><s> mid-row, a few <unk>, and half of the rows ending in </s> plus padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, SPEC.vocab_size, size=(ROWS, LENGTH), dtype=np.int32)
  ids[rng.random(ids.shape) < 0.01] = 3
  ids[:, 0] = 0
  ids[:, 60], ids[:, 61] = 2, 0
  for row in range(0, ROWS, 2):
    padding = int(rng.integers(1, 40))
    ids[row, -padding:] = 1
    ids[row, -padding - 1] = 2
  return ids


def mask(seed: int, ids: np.ndarray, first_row: int = 0, spec=SPEC):
  """(inputs, labels, weights) as numpy arrays, masked with PRNGKey(seed)."""
  ids = jnp.asarray(ids)
  special = masking.special_tokens_mask(ids, spec.special_ids)
  outputs = _mask(jax.random.PRNGKey(seed), ids, special, spec=spec, first_row=first_row)
  return tuple(np.asarray(x) for x in outputs)


def assert_binomial(count: int, trials: int, p: float, what: str) -> None:
  """`count` successes of `trials` are within 5 sigma of a Binomial(trials, p)."""
  sigma = math.sqrt(trials * p * (1 - p))
  assert abs(count - trials * p) <= 5 * sigma, (
      f'{what}: {count}/{trials} = {count / trials:.4f}, '
      f'expected {p:.4f} +- {5 * sigma / trials:.4f}')


def assert_masking_statistics(ids: np.ndarray, inputs: np.ndarray, weights: np.ndarray,
                              spec=SPEC) -> None:
  """The chosen rate is `probability`; of the chosen, 80% <mask>, 10% random, 10% kept."""
  eligible = ~np.isin(ids, spec.special_ids)
  chosen = weights == 1
  masked = chosen & (inputs == spec.mask_token_id)
  kept = chosen & (inputs == ids)
  randomized = chosen & ~masked & ~kept
  # A random replacement equals the original token with probability 1/len(replacements).
  same = 1 / len(spec.replacement_ids)
  assert_binomial(chosen.sum(), eligible.sum(), spec.probability, 'chosen')
  assert_binomial(masked.sum(), chosen.sum(), spec.mask_fraction, 'masked')
  assert_binomial(randomized.sum(), chosen.sum(), spec.random_fraction * (1 - same), 'random')
  assert_binomial(kept.sum(), chosen.sum(),
                  1 - spec.mask_fraction - spec.random_fraction * (1 - same), 'kept')


@pytest.fixture(scope='module')
def draws():
  """Masking of the same ids with several rngs, stacked: ids, inputs, labels, weights."""
  ids = make_ids()
  results = [mask(seed, ids) for seed in SEEDS]
  return (np.stack([ids] * len(SEEDS)),) + tuple(np.stack(r) for r in zip(*results))


# ----------------------------------------------------------------------------
# Statistics


def test_chosen_fraction_matches_mlm_probability(draws):
  ids, _, _, weights = draws
  eligible = ~np.isin(ids, SPEC.special_ids)
  assert eligible.sum() > 25_000
  assert_binomial((weights == 1).sum(), eligible.sum(), SPEC.probability, 'chosen')


def test_chosen_tokens_are_80_percent_mask_10_percent_random_10_percent_kept(draws):
  ids, inputs, _, weights = draws
  assert_masking_statistics(ids, inputs, weights)


def test_chosen_fraction_follows_a_different_probability():
  ids = make_ids()
  spec = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=300,
                             probability=0.4)
  inputs, _, weights = mask(0, ids, spec=spec)
  assert_masking_statistics(ids, inputs, weights, spec=spec)


def test_random_replacements_are_never_special_and_spread_over_the_vocabulary(draws):
  ids, inputs, _, weights = draws
  chosen = weights == 1
  randomized = chosen & (inputs != SPEC.mask_token_id) & (inputs != ids)
  replacements = inputs[randomized]
  assert not np.isin(replacements, SPEC.special_ids).any()
  assert replacements.min() >= 5 and replacements.max() < SPEC.vocab_size
  assert len(np.unique(replacements)) > 150


# ----------------------------------------------------------------------------
# What masking never touches, and what it returns


def test_special_and_padding_positions_are_never_chosen(draws):
  ids, inputs, _, weights = draws
  special = np.isin(ids, SPEC.special_ids)
  assert special.sum() > 4 * ROWS * 4  # <s>, </s><s> in every row, padding, <unk>.
  assert (weights[special] == 0).all()
  np.testing.assert_array_equal(inputs[special], ids[special])


def test_positions_not_chosen_keep_their_ids(draws):
  ids, inputs, _, weights = draws
  not_chosen = weights == 0
  np.testing.assert_array_equal(inputs[not_chosen], ids[not_chosen])


def test_labels_are_the_original_ids(draws):
  ids, _, labels, _ = draws
  np.testing.assert_array_equal(labels, ids)


def test_weights_are_float32_zeros_and_ones(draws):
  *_, weights = draws
  assert weights.dtype == np.float32
  assert set(np.unique(weights)) == {0.0, 1.0}


def test_special_tokens_mask_marks_exactly_the_special_ids():
  ids = jnp.asarray([[0, 7, 2, 1, 1], [3, 4, 5, 299, 2]])
  expected = [[True, False, True, True, True], [True, True, False, False, True]]
  assert np.asarray(masking.special_tokens_mask(ids, SPEC.special_ids)).tolist() == expected


def test_masking_spec_from_a_tokenizer():
  tokenizer = tokenizer_lib.train_bpe_tokenizer(
      ['the sky is blue', 'cats purr when calm', 'prices rise'] * 30, vocab_size=270,
      model_max_length=128)
  spec = masking.masking_spec(tokenizer, 0.2)
  assert spec.mask_token_id == tokenizer.mask_token_id == 4
  assert spec.special_ids == (0, 1, 2, 3, 4)
  assert spec.vocab_size == len(tokenizer)
  assert spec.probability == 0.2
  np.testing.assert_array_equal(spec.replacement_ids, np.arange(5, len(tokenizer)))


# ----------------------------------------------------------------------------
# Determinism


def test_same_rng_gives_identical_masks():
  ids = make_ids()
  for first, again in zip(mask(5, ids), mask(5, ids)):
    np.testing.assert_array_equal(first, again)


def test_different_rngs_give_different_masks():
  ids = make_ids()
  inputs_a, _, weights_a = mask(5, ids)
  inputs_b, _, weights_b = mask(6, ids)
  assert (weights_a != weights_b).any()
  assert (inputs_a != inputs_b).any()


@pytest.mark.parametrize('k', [16, 48])  # Shapes shared with other tests: fewer compiles.
def test_a_rows_mask_depends_only_on_its_global_row_index(k):
  ids = make_ids()
  whole = mask(3, ids)
  tail = mask(3, ids[k:], first_row=k)
  for part, full in zip(tail, whole):
    np.testing.assert_array_equal(part, full[k:])


def test_micro_batches_with_their_first_row_mask_like_the_whole_batch():
  """Gradient accumulation splits a batch into micro-batches; the masks must not change."""
  ids = make_ids()
  whole = mask(9, ids)
  micro = ROWS // 4
  parts = [mask(9, ids[i:i + micro], first_row=i) for i in range(0, ROWS, micro)]
  for name, full, pieces in zip(('inputs', 'labels', 'weights'), whole, zip(*parts)):
    np.testing.assert_array_equal(np.concatenate(pieces), full, err_msg=name)


def test_without_first_row_a_sub_batch_masks_differently():
  """The offset matters: rows [k:] masked as if they started at row 0 get other masks."""
  ids = make_ids()
  _, _, whole = mask(3, ids)
  _, _, tail = mask(3, ids[48:])
  assert (tail != whole[48:]).any()


# ----------------------------------------------------------------------------
# 8 devices: jit with a sharded batch, and pmap


_MULTIDEVICE_CODE = """
import json
import jax
import numpy as np
from mlm_jax import masking, sharding
from tests.test_masking import LENGTH, ROWS, SEEDS, SPEC, make_ids

assert jax.device_count() == 8, jax.devices()
mesh = sharding.make_mesh()
rows = ROWS // 8
batch = sharding.batch_sharding(mesh)
jit_mask = jax.jit(lambda key, ids, special: masking.mask_tokens(key, ids, special, SPEC),
                   in_shardings=(sharding.replicated(mesh), batch, batch),
                   out_shardings=batch)
pmap_mask = jax.pmap(
    lambda key, ids, special: masking.mask_tokens(
        key, ids, special, SPEC, first_row=jax.lax.axis_index('d') * rows),
    axis_name='d', in_axes=(None, 0, 0))

ids = make_ids()
special = np.isin(ids, SPEC.special_ids)
out = {'jit': [], 'pmap': [], 'jit_shard_shapes': [], 'jit_devices': []}
for seed in SEEDS:
  key = jax.random.PRNGKey(seed)
  inputs, labels, weights = jit_mask(key, ids, special)
  out['jit_devices'].append(len(inputs.sharding.device_set))
  out['jit_shard_shapes'].append(sorted({s.data.shape for s in inputs.addressable_shards}))
  out['jit'].append([np.asarray(inputs).tolist(), np.asarray(labels).tolist(),
                     np.asarray(weights).tolist()])
  inputs, labels, weights = pmap_mask(key, ids.reshape(8, rows, LENGTH),
                                      special.reshape(8, rows, LENGTH))
  out['pmap'].append([np.asarray(x).reshape(ROWS, LENGTH).tolist()
                      for x in (inputs, labels, weights)])
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def eight_devices():
  """Masks computed in a subprocess with 8 CPU devices, for every seed in SEEDS."""
  out = json.loads(run_with_devices(_MULTIDEVICE_CODE, devices=8).strip().splitlines()[-1])
  return {layout: [tuple(np.asarray(x) for x in result) for result in out[layout]]
          for layout in ('jit', 'pmap')} | {k: out[k] for k in ('jit_shard_shapes',
                                                                'jit_devices')}


def test_jit_on_8_devices_really_shards_the_batch(eight_devices):
  assert eight_devices['jit_devices'] == [8] * len(SEEDS)
  assert eight_devices['jit_shard_shapes'] == [[[ROWS // 8, LENGTH]]] * len(SEEDS)


@pytest.mark.parametrize('layout', ['jit', 'pmap'])
def test_8_devices_mask_exactly_as_one_device(eight_devices, layout):
  ids = make_ids()
  for seed, (inputs, labels, weights) in zip(SEEDS, eight_devices[layout]):
    ref_inputs, ref_labels, ref_weights = mask(seed, ids)
    np.testing.assert_array_equal(inputs, ref_inputs, err_msg=f'{layout} seed {seed}')
    np.testing.assert_array_equal(labels, ref_labels, err_msg=f'{layout} seed {seed}')
    np.testing.assert_array_equal(weights, ref_weights, err_msg=f'{layout} seed {seed}')


@pytest.mark.parametrize('layout', ['jit', 'pmap'])
def test_8_devices_keep_the_masking_statistics(eight_devices, layout):
  ids = np.stack([make_ids()] * len(SEEDS))
  inputs = np.stack([r[0] for r in eight_devices[layout]])
  weights = np.stack([r[2] for r in eight_devices[layout]])
  assert_masking_statistics(ids, inputs, weights)
  assert (weights[np.isin(ids, SPEC.special_ids)] == 0).all()
