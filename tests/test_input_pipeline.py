"""Batches of blocks read with Grain: seeded epochs, exact resume, padded evaluation subsets.

Guards that the batch at step s depends on (seed, s) alone (what exact resume rests on),
that evaluation covers every evaluated block once with weight-0 padding made of real text,
that an evaluation subset is the same seeded draw every time, and how batches are split over
hosts and devices.
"""

import itertools
import json

import jax
import numpy as np
import pytest

from mlm_jax import sharding
from mlm_jax.data import input_pipeline
from mlm_jax.errors import UserError
from tests.multidevice import run_with_devices

NUM_BLOCKS, BLOCK_SIZE = 50, 4
GLOBAL_BATCH, GRAD_ACCUM = 8, 2
STEPS_PER_EPOCH = NUM_BLOCKS // GLOBAL_BATCH  # 6: 48 blocks used, 2 dropped per epoch.


def make_blocks(num_blocks: int = NUM_BLOCKS) -> np.ndarray:
  """Block i holds ids [i*BLOCK_SIZE, (i+1)*BLOCK_SIZE), so a row names its block."""
  return np.arange(num_blocks * BLOCK_SIZE, dtype=np.int32).reshape(num_blocks, BLOCK_SIZE)


def block_indices(batch: np.ndarray) -> list[int]:
  return (batch[..., 0] // BLOCK_SIZE).ravel().tolist()


def take(num_steps: int, seed: int = 0, start_step: int = 0) -> list[np.ndarray]:
  batches = input_pipeline.train_batches(make_blocks(), GLOBAL_BATCH, GRAD_ACCUM, seed,
                                         start_step=start_step)
  return list(itertools.islice(batches, num_steps))


# ----------------------------------------------------------------------------
# train_batches


def test_train_batches_are_grad_accum_by_rows_by_block_size():
  batch = take(1)[0]
  assert batch.shape == (GRAD_ACCUM, GLOBAL_BATCH // GRAD_ACCUM, BLOCK_SIZE)
  assert batch.dtype == np.int32


def test_train_batch_rows_are_whole_blocks():
  blocks = make_blocks()
  for batch in take(3):
    for row, index in zip(batch.reshape(-1, BLOCK_SIZE), block_indices(batch)):
      np.testing.assert_array_equal(row, blocks[index])


def test_an_epoch_uses_each_block_at_most_once():
  used = [i for batch in take(STEPS_PER_EPOCH) for i in block_indices(batch)]
  assert len(used) == len(set(used)) == STEPS_PER_EPOCH * GLOBAL_BATCH
  assert set(used) <= set(range(NUM_BLOCKS))


def test_epoch_order_is_deterministic_for_a_seed():
  for first, again in zip(take(2 * STEPS_PER_EPOCH, seed=7), take(2 * STEPS_PER_EPOCH, seed=7)):
    np.testing.assert_array_equal(first, again)


def test_epoch_order_differs_between_epochs():
  batches = take(2 * STEPS_PER_EPOCH)
  epoch_0 = [i for b in batches[:STEPS_PER_EPOCH] for i in block_indices(b)]
  epoch_1 = [i for b in batches[STEPS_PER_EPOCH:] for i in block_indices(b)]
  assert len(set(epoch_1)) == len(epoch_1)
  assert epoch_0 != epoch_1


def test_epoch_order_differs_between_seeds():
  order = lambda seed: [i for b in take(STEPS_PER_EPOCH, seed=seed) for i in block_indices(b)]
  assert order(0) != order(1)


@pytest.mark.parametrize('start_step', [1, 5, 6, 7, 13])
def test_starting_at_a_step_yields_what_an_uninterrupted_run_yields_from_there(start_step):
  """Exact resume, also across epoch boundaries (an epoch here is 6 steps)."""
  uninterrupted = take(start_step + 8)
  resumed = take(8, start_step=start_step)
  for step, (expected, actual) in enumerate(zip(uninterrupted[start_step:], resumed),
                                            start=start_step):
    np.testing.assert_array_equal(actual, expected, err_msg=f'step {step}')


def test_grad_accum_splits_the_global_batch_into_micro_batches():
  """With grad_accum=1 the same step draws the same blocks, in one micro-batch."""
  blocks = make_blocks()
  one = next(input_pipeline.train_batches(blocks, GLOBAL_BATCH, 1, seed=0))
  two = next(input_pipeline.train_batches(blocks, GLOBAL_BATCH, 2, seed=0))
  assert one.shape == (1, GLOBAL_BATCH, BLOCK_SIZE)
  np.testing.assert_array_equal(two.reshape(one.shape), one)


# ----------------------------------------------------------------------------
# cursor_at and steps_per_epoch


@pytest.mark.parametrize('step, epoch, batch', [(0, 0, 0), (5, 0, 5), (6, 1, 0), (13, 2, 1)])
def test_cursor_at_a_step_is_its_epoch_and_batch(step, epoch, batch):
  assert input_pipeline.cursor_at(step, NUM_BLOCKS, GLOBAL_BATCH) == (
      input_pipeline.DataCursor(epoch=epoch, batch=batch))


def test_steps_per_epoch_drops_the_last_partial_batch():
  assert input_pipeline.steps_per_epoch(NUM_BLOCKS, GLOBAL_BATCH) == 6
  assert input_pipeline.steps_per_epoch(48, GLOBAL_BATCH) == 6


def test_fewer_blocks_than_one_global_batch_is_a_user_error():
  with pytest.raises(UserError, match=r'7 training blocks make no batch of 8'):
    input_pipeline.steps_per_epoch(7, 8)


def test_train_batches_with_too_few_blocks_is_a_user_error():
  with pytest.raises(UserError, match=r'per_device_batch_size'):
    next(input_pipeline.train_batches(make_blocks(5), GLOBAL_BATCH, GRAD_ACCUM, seed=0))


# ----------------------------------------------------------------------------
# eval_batches


def test_eval_batches_cover_every_block_once_in_order():
  blocks = make_blocks(21)
  batches = list(input_pipeline.eval_batches(blocks, GLOBAL_BATCH))
  assert len(batches) == 3
  ids = np.concatenate([b for b, _ in batches])
  weights = np.concatenate([w for _, w in batches])
  np.testing.assert_array_equal(ids[weights == 1], blocks)


def test_eval_last_batch_is_padded_with_weight_zero_copies_of_a_real_block():
  blocks = make_blocks(21)
  batches = list(input_pipeline.eval_batches(blocks, GLOBAL_BATCH))
  last_ids, last_weights = batches[-1]
  assert all(b.shape == (GLOBAL_BATCH, BLOCK_SIZE) for b, _ in batches)
  assert last_weights.dtype == np.float32
  assert last_weights.tolist() == [1.0] * 5 + [0.0] * 3
  # Real text that masking would choose from: only the weight keeps it out of the metrics.
  np.testing.assert_array_equal(last_ids[5:], blocks[[0, 0, 0]])


def test_eval_weights_sum_to_the_number_of_blocks():
  for num_blocks in (8, 16, 21):
    batches = input_pipeline.eval_batches(make_blocks(num_blocks), GLOBAL_BATCH)
    assert sum(w.sum() for _, w in batches) == num_blocks


def _evaluated_blocks(num_blocks: int, max_blocks: int, seed: int = 0) -> list[int]:
  batches = input_pipeline.eval_batches(make_blocks(num_blocks), GLOBAL_BATCH, max_blocks, seed)
  return [i for ids, weights in batches for i in block_indices(ids[weights == 1])]


def test_max_eval_blocks_evaluates_a_fixed_seeded_subset_of_that_size():
  subset = _evaluated_blocks(21, max_blocks=5)
  assert len(subset) == len(set(subset)) == 5 and set(subset) <= set(range(21))
  assert _evaluated_blocks(21, max_blocks=5) == subset
  assert _evaluated_blocks(21, max_blocks=5, seed=1) != subset


@pytest.mark.parametrize('max_blocks', [0, 21, 100])
def test_max_eval_blocks_0_or_at_least_the_split_evaluates_every_block_in_order(max_blocks):
  assert _evaluated_blocks(21, max_blocks) == list(range(21))


# ----------------------------------------------------------------------------
# permute


@pytest.mark.parametrize('size', [1, 2, 3, 17, 1000, 4099])
def test_permute_is_a_permutation_of_the_range(size):
  positions = input_pipeline.permute(np.arange(size), size, seed=5)
  assert sorted(positions.tolist()) == list(range(size))


def test_permute_depends_on_the_seed_and_reads_any_subset_alike():
  whole = input_pipeline.permute(np.arange(1000), 1000, seed=5)
  assert (whole != np.arange(1000)).mean() > 0.9
  assert (input_pipeline.permute(np.arange(1000), 1000, seed=6) != whole).mean() > 0.9
  np.testing.assert_array_equal(input_pipeline.permute(np.array([7, 3, 999]), 1000, seed=5),
                                whole[[7, 3, 999]])


# ----------------------------------------------------------------------------
# shard_batch


def test_shard_batch_pmap_adds_a_leading_local_device_axis():
  batch = {'ids': make_blocks(16).reshape(2, 8, BLOCK_SIZE), 'weights': np.ones(8, np.float32)}
  placed = sharding.shard_batch(batch, batch_axis=0, layout='pmap')
  n = jax.local_device_count()
  assert placed['weights'].shape == (n, 8 // n)
  moved = sharding.shard_batch(batch['ids'], batch_axis=1, layout='pmap')
  assert moved.shape == (n, 2, 8 // n, BLOCK_SIZE)
  np.testing.assert_array_equal(moved[0], batch['ids'][:, :8 // n])


def test_shard_batch_jit_gives_a_global_array_sharded_on_the_batch_axis():
  mesh = sharding.make_mesh()
  batch = make_blocks(16).reshape(2, 8, BLOCK_SIZE)
  placed = sharding.shard_batch(batch, mesh, batch_axis=1)
  assert isinstance(placed, jax.Array)
  assert placed.shape == batch.shape
  assert placed.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 1), batch.ndim)
  np.testing.assert_array_equal(np.asarray(placed), batch)


def test_shard_batch_rejects_an_unknown_layout():
  with pytest.raises(ValueError, match=r"unknown layout 'tpu'"):
    sharding.shard_batch(make_blocks(8), sharding.make_mesh(), layout='tpu')


_EIGHT_DEVICE_CODE = """
import json
import jax
import numpy as np
from mlm_jax import sharding

mesh = sharding.make_mesh()
batch = np.arange(2 * 16 * 4, dtype=np.int32).reshape(2, 16, 4)
placed = sharding.shard_batch(batch, mesh, batch_axis=1)
shards = [{'device': mesh.devices.ravel().tolist().index(s.device), 'index': s.index[1].start,
           'shape': list(s.data.shape), 'equal': bool((np.asarray(s.data) == batch[s.index]).all())}
          for s in placed.addressable_shards]
pmap = sharding.shard_batch(batch, batch_axis=1, layout='pmap')
print(json.dumps({
    'devices': jax.device_count(),
    'global_shape': list(placed.shape),
    'equal': bool((np.asarray(placed) == batch).all()),
    'shards': sorted(shards, key=lambda s: s['device']),
    'pmap_shape': list(pmap.shape),
    'pmap_equal': bool(all((pmap[d] == batch[:, 2 * d:2 * d + 2]).all() for d in range(8))),
}))
"""


def test_shard_batch_on_8_devices_gives_each_device_its_rows():
  out = json.loads(run_with_devices(_EIGHT_DEVICE_CODE, devices=8).strip().splitlines()[-1])
  assert out['devices'] == 8
  assert out['global_shape'] == [2, 16, 4] and out['equal']
  assert [s['device'] for s in out['shards']] == list(range(8))
  assert all(s['shape'] == [2, 2, 4] and s['equal'] for s in out['shards'])
  assert [s['index'] for s in out['shards']] == list(range(0, 16, 2))
  assert out['pmap_shape'] == [8, 2, 2, 4] and out['pmap_equal']
