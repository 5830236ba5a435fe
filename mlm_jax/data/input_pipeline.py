"""Batches of token-id blocks read from disk with Grain, deterministic from the seed.

A training step consumes one global batch laid out [grad_accum_steps, rows, block_size];
its rows are the next `global_batch_size` entries of a seeded permutation of the blocks,
a new one each epoch (`BlockOrderMapDataset`), the last partial batch of an epoch dropped. Each host reads only its own rows: the contiguous slice
`sharding.process_slice` of every micro-batch, the layout `shard_batch` puts on the mesh,
so the global batch does not depend on the number of hosts or devices. Batch `s` is
element `s` of a random-access Grain dataset, a function of (seed, s) alone: resuming
at step `s` starts reading there, and the loader needs no state of its own in a checkpoint.

A mixture of sources (`mixture.py`) mixes each source's own seeded block order with Grain's
`MapDataset.mix`, which gives entry k of the mixed order to a source by a fixed interleaving
of the weights (a function of k alone), so every run of batches follows the weights; an
epoch is the mixture's length, until its first source has been read once. The entries are
numbered across the sources (source i's blocks after those of sources before it), and one
batched read gathers each source's rows from its own blocks.
"""

import dataclasses
import math
from typing import Iterator, Sequence

import grain
import numpy as np

from mlm_jax import sharding
from mlm_jax.errors import UserError

TRAIN_STREAM, EVAL_STREAM = 0, 1  # Independent shuffles of the train and eval orders.
PADDING = -1  # The block index of an eval row that only pads the last batch.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True)
class DataCursor:
  """Where in the data a step's batch comes from: batch `batch` of epoch `epoch`."""
  epoch: int
  batch: int


def steps_per_epoch(num_blocks: int, global_batch_size: int) -> int:
  steps = num_blocks // global_batch_size
  if steps == 0:
    raise UserError(f'{num_blocks} training blocks make no batch of {global_batch_size}; '
                    'lower --config.per_device_batch_size or grad_accum_steps, or use more data')
  return steps


def cursor_at(step: int, num_blocks: int, global_batch_size: int) -> DataCursor:
  epoch, batch = divmod(step, steps_per_epoch(num_blocks, global_batch_size))
  return DataCursor(epoch, batch)


def _shuffle_seed(seed: int, stream: int, *source: int) -> int:
  """A 32-bit seed for (seed, stream), and a mixture's source; the shuffle adds the epoch."""
  return int(np.random.SeedSequence([seed % 2**32, stream, *source]).generate_state(1)[0])


def _mix(values: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer: a fast, well-mixing hash of uint64 values (wrapping arithmetic)."""
  values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return values ^ (values >> np.uint64(31))


def permute(indices: np.ndarray, size: int, seed: int, rounds: int = 4) -> np.ndarray:
  """Position of each of `indices` in a seeded permutation of [0, size), in O(1) memory.

  A `rounds`-round Feistel network on the smallest even-bit domain holding `size`, walked
  until the value falls below `size` (a bijection of [0, size)), as Grain's
  `index_shuffle` does, but over a whole array at once: Grain's is one Python call per
  index, too slow for 128-row batches at the rate a GPU consumes them (BENCHMARKS.md).
  """
  half = max(1, ((size - 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  keys = np.random.SeedSequence([seed]).generate_state(rounds, np.uint64)
  values = np.asarray(indices, np.uint64)
  pending = np.ones(values.shape, bool)
  while pending.any():
    left, right = values[pending] >> np.uint64(half), values[pending] & mask
    for key in keys:
      left, right = right, left ^ (_mix(right ^ key) & mask)
    values[pending] = (left << np.uint64(half)) | right
    pending = values >= size
  return values.astype(np.int64)


class BlockOrderMapDataset(grain.MapDataset):
  """Block indices, epoch after epoch: each epoch a fresh seeded permutation of [0, size).

  The permutation of epoch e is `permute` with seed + e (the construction of Grain's
  `index_shuffle`, vectorized), read a batch of indices at a time (`_getitems`);
  `seed=None` keeps every epoch in order. Every index is valid: one past an epoch reads the
  next. `offset` is added to every block index (a mixture's numbering across its sources).
  """

  def __init__(self, size: int, seed: int | None, offset: int = 0):
    super().__init__()
    self._size, self._seed, self._offset = size, seed, offset

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return int(self._getitems([index])[0])

  def _getitems(self, indices: Sequence[int]) -> np.ndarray:
    epochs, positions = np.divmod(np.asarray(indices, np.int64), self._size)
    if self._seed is None:
      return positions + self._offset
    shuffled = np.empty_like(positions)
    for epoch in np.unique(epochs):
      chosen = epochs == epoch
      shuffled[chosen] = permute(positions[chosen], self._size, self._seed + int(epoch))
    return shuffled + self._offset


class BlockSource:
  """Grain's random-access source protocol over a [num_blocks, block_size] (memory-mapped) array."""

  def __init__(self, blocks: np.ndarray):
    self._blocks = blocks

  def __len__(self) -> int:
    return len(self._blocks)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.asarray(self._blocks[index], np.int32)

  def read(self, indices: Sequence[int]) -> np.ndarray:
    """Many blocks in one gather."""
    return np.asarray(self._blocks[np.asarray(indices)], np.int32)

  _getitems = read  # The batched read of Grain's protocol.


class MixedBlockSource(BlockSource):
  """`BlockSource` over several sources' blocks, numbered one after another."""

  def __init__(self, blocks: Sequence[np.ndarray]):  # pylint: disable=super-init-not-called
    self._parts = list(blocks)
    self._starts = np.cumsum([0] + [len(b) for b in self._parts])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    return self.read([index])[0]

  def read(self, indices: Sequence[int]) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    part = np.searchsorted(self._starts, indices, side='right') - 1
    rows = np.empty((len(indices), self._parts[0].shape[1]), np.int32)
    for p in np.unique(part):
      chosen = part == p
      rows[chosen] = self._parts[p][indices[chosen] - self._starts[p]]
    return rows

  _getitems = read


def source_of_rows(blocks: Sequence[np.ndarray], indices: np.ndarray) -> np.ndarray:
  """Which source each of a mixed order's block indices is of (see `MixedBlockSource`)."""
  return np.searchsorted(np.cumsum([len(b) for b in blocks]), indices, side='right')


def block_order(sizes: Sequence[int], weights: Sequence[float] | None,
                seed: int) -> grain.MapDataset:
  """Train block indices in reading order: one source's seeded epochs, or the mixture of
  each source's (numbered across the sources), whose length is the mixture's epoch."""
  if len(sizes) == 1:
    return BlockOrderMapDataset(sizes[0], _shuffle_seed(seed, TRAIN_STREAM))
  starts = np.cumsum([0, *sizes[:-1]])
  orders = [BlockOrderMapDataset(size, _shuffle_seed(seed, TRAIN_STREAM, i), int(start))
            for i, (size, start) in enumerate(zip(sizes, starts))]
  return grain.MapDataset.mix(orders, weights)


def blocks_per_epoch(sizes: Sequence[int], weights: Sequence[float] | None = None) -> int:
  """Train blocks an epoch reads: all of one source's; of a mixture, as many as are read
  until its first source has been read once."""
  return len(block_order(sizes, weights, 0))


class HostBatchesMapDataset(grain.MapDataset):
  """Element b: the parent entries of this host's rows of global batch b, as one array.

  Global batch b is parent entries [b * global_batch_size, (b + 1) * global_batch_size),
  laid out [grad_accum_steps, micro]; this host's rows are `process_slice(micro)` of each
  micro-batch, read with one batched `_getitems`. Entries from `size` on (the eval's last
  batch) are `PADDING`. An index past one epoch (`len(self)`) reads the parent's next epoch.
  """

  def __init__(self, parent: grain.MapDataset, global_batch_size: int, grad_accum_steps: int,
               num_batches: int, size: int | None = None):
    super().__init__(parent)
    self._size = len(parent) if size is None else size
    micro = global_batch_size // grad_accum_steps
    rows = sharding.process_slice(micro)
    self._offsets = (np.arange(grad_accum_steps)[:, None] * micro
                     + np.arange(rows.start, rows.stop)[None, :]).ravel()
    self._global_batch_size, self._num_batches = global_batch_size, num_batches

  def __len__(self) -> int:
    return self._num_batches

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, batch = divmod(index, len(self))
    entries = batch * self._global_batch_size + self._offsets
    inside = entries < self._size
    result = np.full(len(entries), PADDING, np.int64)
    result[inside] = self._parent._getitems(  # pylint: disable=protected-access
        (epoch * len(self._parent) + entries[inside]).tolist())
    return result


def train_indices(blocks: np.ndarray | Sequence[np.ndarray], global_batch_size: int,
                  grad_accum_steps: int, seed: int,
                  weights: Sequence[float] | None = None) -> grain.MapDataset:
  """Element s: the block indices of this host's rows of step s's batch (numbered across a
  mixture's sources), flat. Infinite: epoch e is elements [e * steps_per_epoch, (e + 1) *
  steps_per_epoch)."""
  parts = [blocks] if isinstance(blocks, np.ndarray) else list(blocks)
  order = block_order([len(b) for b in parts], weights, seed)
  per_epoch = steps_per_epoch(len(order), global_batch_size)
  return HostBatchesMapDataset(order, global_batch_size, grad_accum_steps, per_epoch).repeat()


def train_dataset(blocks: np.ndarray | Sequence[np.ndarray], global_batch_size: int,
                  grad_accum_steps: int, seed: int,
                  weights: Sequence[float] | None = None) -> grain.MapDataset:
  """Element s: this host's [grad_accum_steps, rows, block_size] int32 slice of step s's batch.

  `blocks` is one source's [num_blocks, block_size] array, or a mixture's list of them with
  their `weights`. Infinite: epoch e is elements [e * steps_per_epoch, (e + 1) *
  steps_per_epoch).
  """
  single = isinstance(blocks, np.ndarray) or len(blocks) == 1
  parts = [blocks] if isinstance(blocks, np.ndarray) else list(blocks)
  source = BlockSource(parts[0]) if single else MixedBlockSource(parts)
  shape = (grad_accum_steps, -1, parts[0].shape[1])
  return train_indices(parts, global_batch_size, grad_accum_steps, seed, weights).map(
      lambda indices: source.read(indices).reshape(shape))


def train_batches(blocks: np.ndarray | Sequence[np.ndarray], global_batch_size: int,
                  grad_accum_steps: int, seed: int, start_step: int = 0,
                  weights: Sequence[float] | None = None) -> Iterator[np.ndarray]:
  """The batches of `train_dataset` from `start_step` on, read ahead by background threads."""
  dataset = train_dataset(blocks, global_batch_size, grad_accum_steps, seed, weights)
  return iter(dataset[start_step:].to_iter_dataset(_READ_OPTIONS))


def evaluated_blocks(blocks: int, max_blocks: int) -> int:
  """How many of `blocks` test blocks an evaluation covers (see `eval_batches`)."""
  return min(max_blocks, blocks) if max_blocks else blocks


def eval_batches(blocks: np.ndarray, global_batch_size: int, max_blocks: int = 0,
                 seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (this host's ids, row weights) covering the evaluated blocks once.

  The evaluated blocks are all of them, in order, or with `max_blocks` a fixed seeded draw
  of that many, the same at every evaluation. The last batch is padded with copies of the
  first block at weight 0, so shapes stay static and padding never counts: real text, so that
  only its weight keeps it out.
  """
  subset = 0 < max_blocks < len(blocks)
  size = max_blocks if subset else len(blocks)
  order = BlockOrderMapDataset(len(blocks), _shuffle_seed(seed, EVAL_STREAM) if subset else None)
  batches = HostBatchesMapDataset(order, global_batch_size, 1,
                                  math.ceil(size / global_batch_size), size)
  source = BlockSource(blocks)

  def read(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    weights = (indices != PADDING).astype(np.float32)
    return source.read(np.where(weights > 0, indices, 0)), weights

  return iter(batches.map(read).to_iter_dataset(_READ_OPTIONS))
