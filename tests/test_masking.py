"""BERT-style dynamic masking, by token and by whole word: its statistics, what it never
touches, and its determinism.

The multi-device tests check that a row's mask depends only on the step's rng and
the row's global index, so 8 devices (jit or pmap) mask exactly as 1 does, for both schemes.
Whole-word masking on real tokenizers, and against transformers' collators, is in
test_whole_word_masking.py.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_jax import masking
from mlm_jax.data import tokenizer as tokenizer_lib
from tests.multidevice import run_with_devices

SPEC = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=300)
# A synthetic vocabulary in which ids divisible by 3 (and the special ids) start a word, so
# words of make_ids' random ids are 3 tokens long on average.
WORD_TABLE = (np.arange(300) % 3 == 0) | (np.arange(300) < 5)
WORD_SPEC = dataclasses.replace(SPEC, scheme='whole_word',
                                word_starts=np.packbits(WORD_TABLE).tobytes())
SCHEMES = pytest.mark.parametrize('spec', [SPEC, WORD_SPEC], ids=['token', 'whole_word'])
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


def assert_action_statistics(ids: np.ndarray, inputs: np.ndarray, weights: np.ndarray,
                             spec=SPEC) -> None:
  """Of the chosen tokens, `mask_replace_prob` are <mask>, `random_replace_prob` random
  (a random draw may equal the original), the rest kept; each token draws its own action."""
  chosen = weights == 1
  masked = chosen & (inputs == spec.mask_token_id)
  kept = chosen & (inputs == ids)
  randomized = chosen & ~masked & ~kept
  # A random replacement equals the original token with probability 1/len(replacements).
  same = 1 / len(spec.replacement_ids)
  assert_binomial(masked.sum(), chosen.sum(), spec.mask_replace_prob, 'masked')
  assert_binomial(randomized.sum(), chosen.sum(), spec.random_replace_prob * (1 - same), 'random')
  assert_binomial(kept.sum(), chosen.sum(),
                  1 - spec.mask_replace_prob - spec.random_replace_prob * (1 - same), 'kept')


def assert_chosen_rate(ids: np.ndarray, weights: np.ndarray, spec=SPEC) -> None:
  """Each eligible token is chosen with probability `probability`: the chosen count is within
  5 sigma of its mean, where a word of n tokens chosen whole adds n^2 p(1-p) to the variance."""
  special = np.isin(ids, spec.special_ids)
  table = spec.word_start_table if spec.scheme == 'whole_word' else np.ones(spec.vocab_size, bool)
  word = np.cumsum(masking.word_starts(ids, special, table, xp=np).ravel())
  lengths = np.bincount(word[~special.ravel()])
  p = spec.probability
  sigma = math.sqrt(p * (1 - p) * (lengths.astype(float) ** 2).sum())
  chosen, eligible = (weights == 1).sum(), (~special).sum()
  assert abs(chosen - eligible * p) <= 5 * sigma, (
      f'chosen {chosen}/{eligible} = {chosen / eligible:.4f}, expected {p} +- '
      f'{5 * sigma / eligible:.4f}')


@pytest.fixture(scope='module', params=[SPEC, WORD_SPEC], ids=['token', 'whole_word'])
def draws(request):
  """Masking of the same ids with several rngs, stacked: spec, ids, inputs, labels, weights."""
  spec, ids = request.param, make_ids()
  results = [mask(seed, ids, spec=spec) for seed in SEEDS]
  return (spec, np.stack([ids] * len(SEEDS))) + tuple(np.stack(r) for r in zip(*results))


# ----------------------------------------------------------------------------
# Statistics


def test_chosen_fraction_matches_mlm_probability(draws):
  spec, ids, _, _, weights = draws
  assert (~np.isin(ids, spec.special_ids)).sum() > 25_000
  assert_chosen_rate(ids, weights, spec)


def test_token_masking_chosen_count_is_binomial():
  """The whole-word variance must not hide a token-masking rate error: the plain binomial."""
  ids = make_ids()
  _, _, weights = mask(0, ids)
  assert_binomial((weights == 1).sum(), (~np.isin(ids, SPEC.special_ids)).sum(),
                  SPEC.probability, 'chosen')


def test_chosen_tokens_are_80_percent_mask_10_percent_random_10_percent_kept(draws):
  spec, ids, inputs, _, weights = draws
  assert_action_statistics(ids, inputs, weights, spec)


@SCHEMES
def test_chosen_fraction_follows_a_different_probability(spec):
  ids = np.concatenate([make_ids(0), make_ids(1)])
  spec = dataclasses.replace(spec, probability=0.4)
  inputs, _, weights = mask(0, ids, spec=spec)
  assert_chosen_rate(ids, weights, spec)
  assert_action_statistics(ids, inputs, weights, spec)


@SCHEMES
def test_replace_probabilities_are_configurable(spec):
  ids = np.concatenate([make_ids(0), make_ids(1)])
  spec = dataclasses.replace(spec, probability=0.4, mask_replace_prob=0.5,
                             random_replace_prob=0.3)
  inputs, _, weights = mask(0, ids, spec=spec)
  assert_action_statistics(ids, inputs, weights, spec)


@SCHEMES
def test_mask_replace_prob_1_masks_every_chosen_token(spec):
  spec = dataclasses.replace(spec, mask_replace_prob=1.0, random_replace_prob=0.0)
  inputs, _, weights = mask(0, make_ids(), spec=spec)
  assert (inputs[weights == 1] == spec.mask_token_id).all()


def test_random_replacements_are_never_special_and_spread_over_the_vocabulary(draws):
  spec, ids, inputs, _, weights = draws
  chosen = weights == 1
  randomized = chosen & (inputs != spec.mask_token_id) & (inputs != ids)
  replacements = inputs[randomized]
  assert not np.isin(replacements, spec.special_ids).any()
  assert replacements.min() >= 5 and replacements.max() < spec.vocab_size
  assert len(np.unique(replacements)) > 150


# ----------------------------------------------------------------------------
# Whole words (the synthetic WORD_TABLE; real tokenizers in test_whole_word_masking.py)


def synthetic_word_starts(ids: np.ndarray) -> np.ndarray:
  """WORD_TABLE's words, written out: a token continues a word when its id is not a multiple
  of 3 and neither it nor the token before it is special, and it is not a row's first."""
  special = np.isin(ids, SPEC.special_ids)
  continues = (ids % 3 != 0) & ~special
  continues[:, 1:] &= ~special[:, :-1]
  continues[:, 0] = False
  return ~continues


def test_every_token_of_a_chosen_word_is_chosen():
  spec, ids = WORD_SPEC, np.stack([make_ids()] * len(SEEDS))
  weights = np.stack([mask(seed, ids[0], spec=spec)[2] for seed in SEEDS])
  starts = synthetic_word_starts(ids.reshape(-1, LENGTH)).reshape(ids.shape)
  chosen = weights == 1
  within_word = ~starts[..., 1:]
  assert within_word.sum() > 10_000
  np.testing.assert_array_equal(chosen[..., 1:][within_word], chosen[..., :-1][within_word])
  # And words are chosen independently: neighbouring words often differ.
  across = starts[..., 1:] & ~np.isin(ids[..., 1:], spec.special_ids) & ~np.isin(
      ids[..., :-1], spec.special_ids)
  differ = (chosen[..., 1:] != chosen[..., :-1])[across].mean()
  assert abs(differ - 2 * spec.probability * (1 - spec.probability)) < 0.02


def test_each_token_of_a_chosen_word_draws_its_own_action():
  """Two chosen tokens of one word differ in being <mask> as often as independent draws do."""
  ids = np.concatenate([make_ids(0), make_ids(1)])
  inputs, _, weights = mask(0, ids, spec=WORD_SPEC)
  same_word = ~synthetic_word_starts(ids)[:, 1:] & (weights[:, 1:] == 1)
  masked = inputs == WORD_SPEC.mask_token_id
  differ = (masked[:, 1:] != masked[:, :-1])[same_word]
  assert len(differ) > 1000
  p = WORD_SPEC.mask_replace_prob
  assert_binomial(differ.sum(), len(differ), 2 * p * (1 - p), 'differing actions')


def test_word_starts_at_the_block_start_after_special_tokens_and_at_table_starts():
  ids = np.array([[7, 8, 9, 10, 2, 0, 11, 13, 1, 1]])  # Continuation, word 9, </s><s>, pad.
  special = np.isin(ids, SPEC.special_ids)
  starts = masking.word_starts(ids, special, WORD_TABLE, xp=np)
  assert starts.tolist() == [[True, False, True, False, True, True, True, False, True, True]]
  np.testing.assert_array_equal(
      np.asarray(masking.word_starts(jnp.asarray(ids), jnp.asarray(special), WORD_TABLE)), starts)


def test_a_word_cut_by_the_block_boundary_is_a_word_in_the_block():
  """Rows that begin mid-word: the leading continuation tokens are chosen, together, at rate p."""
  ids = make_ids()
  ids[:, 0] = np.where(np.arange(ROWS) % 2 == 0, 7, 8)  # Continuations where <s> was.
  ids[:, 1] = 10
  spec = WORD_SPEC
  weights = np.stack([mask(seed, ids, spec=spec)[2] for seed in range(8)])
  np.testing.assert_array_equal(weights[..., 0], weights[..., 1])
  assert_binomial((weights[..., 0] == 1).sum(), weights[..., 0].size, spec.probability,
                  'first words')


def test_a_whole_word_spec_needs_the_word_start_table():
  with pytest.raises(ValueError, match='word-start table'):
    dataclasses.replace(SPEC, scheme='whole_word')


def test_the_word_start_table_round_trips_through_the_spec():
  np.testing.assert_array_equal(WORD_SPEC.word_start_table, WORD_TABLE)
  assert hash(WORD_SPEC) == hash(dataclasses.replace(WORD_SPEC))


# ----------------------------------------------------------------------------
# What masking never touches, and what it returns


def test_special_and_padding_positions_are_never_chosen(draws):
  spec, ids, inputs, _, weights = draws
  special = np.isin(ids, spec.special_ids)
  assert special.sum() > 4 * ROWS * 4  # <s>, </s><s> in every row, padding, <unk>.
  assert (weights[special] == 0).all()
  np.testing.assert_array_equal(inputs[special], ids[special])


def test_positions_not_chosen_keep_their_ids(draws):
  _, ids, inputs, _, weights = draws
  not_chosen = weights == 0
  np.testing.assert_array_equal(inputs[not_chosen], ids[not_chosen])


def test_labels_are_the_original_ids(draws):
  _, ids, _, labels, _ = draws
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


@SCHEMES
def test_same_rng_gives_identical_masks(spec):
  ids = make_ids()
  for first, again in zip(mask(5, ids, spec=spec), mask(5, ids, spec=spec)):
    np.testing.assert_array_equal(first, again)


@SCHEMES
def test_different_rngs_give_different_masks(spec):
  ids = make_ids()
  inputs_a, _, weights_a = mask(5, ids, spec=spec)
  inputs_b, _, weights_b = mask(6, ids, spec=spec)
  assert (weights_a != weights_b).any()
  assert (inputs_a != inputs_b).any()


@SCHEMES
@pytest.mark.parametrize('k', [16, 48])  # Shapes shared with other tests: fewer compiles.
def test_a_rows_mask_depends_only_on_its_global_row_index(k, spec):
  ids = make_ids()
  whole = mask(3, ids, spec=spec)
  tail = mask(3, ids[k:], first_row=k, spec=spec)
  for part, full in zip(tail, whole):
    np.testing.assert_array_equal(part, full[k:])


@SCHEMES
def test_micro_batches_with_their_first_row_mask_like_the_whole_batch(spec):
  """Gradient accumulation splits a batch into micro-batches; the masks must not change."""
  ids = make_ids()
  whole = mask(9, ids, spec=spec)
  micro = ROWS // 4
  parts = [mask(9, ids[i:i + micro], first_row=i, spec=spec) for i in range(0, ROWS, micro)]
  for name, full, pieces in zip(('inputs', 'labels', 'weights'), whole, zip(*parts)):
    np.testing.assert_array_equal(np.concatenate(pieces), full, err_msg=name)


@SCHEMES
def test_without_first_row_a_sub_batch_masks_differently(spec):
  """The offset matters: rows [k:] masked as if they started at row 0 get other masks."""
  ids = make_ids()
  _, _, whole = mask(3, ids, spec=spec)
  _, _, tail = mask(3, ids[48:], spec=spec)
  assert (tail != whole[48:]).any()


# ----------------------------------------------------------------------------
# 8 devices: jit with a sharded batch, and pmap


_MULTIDEVICE_CODE = """
import json
import jax
import numpy as np
from mlm_jax import masking, sharding
from tests.test_masking import LENGTH, ROWS, SEEDS, SPEC, WORD_SPEC, make_ids

assert jax.device_count() == 8, jax.devices()
mesh = sharding.make_mesh()
rows = ROWS // 8
batch = sharding.batch_sharding(mesh)
ids = make_ids()
special = np.isin(ids, SPEC.special_ids)
out = {}
for name, spec in (('token', SPEC), ('whole_word', WORD_SPEC)):
  jit_mask = jax.jit(lambda key, ids, special: masking.mask_tokens(key, ids, special, spec),
                     in_shardings=(sharding.replicated(mesh), batch, batch),
                     out_shardings=batch)
  pmap_mask = jax.pmap(
      lambda key, ids, special: masking.mask_tokens(
          key, ids, special, spec, first_row=jax.lax.axis_index('d') * rows),
      axis_name='d', in_axes=(None, 0, 0))
  result = out[name] = {'jit': [], 'pmap': [], 'jit_shard_shapes': [], 'jit_devices': []}
  for seed in SEEDS:
    key = jax.random.PRNGKey(seed)
    inputs, labels, weights = jit_mask(key, ids, special)
    result['jit_devices'].append(len(inputs.sharding.device_set))
    result['jit_shard_shapes'].append(sorted({s.data.shape for s in inputs.addressable_shards}))
    result['jit'].append([np.asarray(inputs).tolist(), np.asarray(labels).tolist(),
                          np.asarray(weights).tolist()])
    inputs, labels, weights = pmap_mask(key, ids.reshape(8, rows, LENGTH),
                                        special.reshape(8, rows, LENGTH))
    result['pmap'].append([np.asarray(x).reshape(ROWS, LENGTH).tolist()
                           for x in (inputs, labels, weights)])
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def eight_devices():
  """Masks computed in a subprocess with 8 CPU devices, per scheme and seed in SEEDS."""
  out = json.loads(run_with_devices(_MULTIDEVICE_CODE, devices=8).strip().splitlines()[-1])
  return {scheme: {layout: [tuple(np.asarray(x) for x in result) for result in runs[layout]]
                   for layout in ('jit', 'pmap')} | {k: runs[k] for k in ('jit_shard_shapes',
                                                                        'jit_devices')}
          for scheme, runs in out.items()}


def test_jit_on_8_devices_really_shards_the_batch(eight_devices):
  for runs in eight_devices.values():
    assert runs['jit_devices'] == [8] * len(SEEDS)
    assert runs['jit_shard_shapes'] == [[[ROWS // 8, LENGTH]]] * len(SEEDS)


@SCHEMES
@pytest.mark.parametrize('layout', ['jit', 'pmap'])
def test_8_devices_mask_exactly_as_one_device(eight_devices, layout, spec):
  ids = make_ids()
  for seed, (inputs, labels, weights) in zip(SEEDS, eight_devices[spec.scheme][layout]):
    ref_inputs, ref_labels, ref_weights = mask(seed, ids, spec=spec)
    np.testing.assert_array_equal(inputs, ref_inputs, err_msg=f'{layout} seed {seed}')
    np.testing.assert_array_equal(labels, ref_labels, err_msg=f'{layout} seed {seed}')
    np.testing.assert_array_equal(weights, ref_weights, err_msg=f'{layout} seed {seed}')


@SCHEMES
@pytest.mark.parametrize('layout', ['jit', 'pmap'])
def test_8_devices_keep_the_masking_statistics(eight_devices, layout, spec):
  ids = np.stack([make_ids()] * len(SEEDS))
  inputs = np.stack([r[0] for r in eight_devices[spec.scheme][layout]])
  weights = np.stack([r[2] for r in eight_devices[spec.scheme][layout]])
  assert_chosen_rate(ids, weights, spec)
  assert_action_statistics(ids, inputs, weights, spec)
  assert (weights[np.isin(ids, spec.special_ids)] == 0).all()
