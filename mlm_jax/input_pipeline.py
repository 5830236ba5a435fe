"""Batches of token-id blocks as numpy arrays, deterministic from the seed.

A training step consumes one global batch laid out [grad_accum_steps, rows, block_size];
its rows are a seeded per-epoch permutation of the blocks, so the batch at step `s`
is a function of (seed, s) alone, which is what makes exact resume possible. Each
host takes its own slice of the rows (see `sharding.process_slice`).
"""

import dataclasses
from typing import Iterator

import jax

import numpy as np

from mlm_jax import sharding
from mlm_jax.errors import UserError


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


def epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def train_batches(blocks: np.ndarray, global_batch_size: int, grad_accum_steps: int,
                  seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
  """Yields this host's slice of each step's batch, from `start_step` on, forever.

  Each batch is [grad_accum_steps, global_batch_size // grad_accum_steps // hosts,
  block_size]; the last partial batch of an epoch is dropped to keep shapes static.
  """
  per_step = steps_per_epoch(len(blocks), global_batch_size)
  micro = global_batch_size // grad_accum_steps
  rows = sharding.process_slice(micro)
  cursor = cursor_at(start_step, len(blocks), global_batch_size)
  epoch, first = cursor.epoch, cursor.batch
  while True:
    order = epoch_permutation(len(blocks), seed, epoch)
    for batch in range(first, per_step):
      chosen = order[batch * global_batch_size:(batch + 1) * global_batch_size]
      yield blocks[chosen.reshape(grad_accum_steps, micro)[:, rows]]
    epoch, first = epoch + 1, 0


def eval_batches(blocks: np.ndarray,
                 global_batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (this host's ids, row weights) covering every block exactly once, in order.

  The last batch is padded with copies of the first blocks at weight 0, so shapes stay
  static and padding never counts: real text, so that only its weight keeps it out.
  """
  rows = sharding.process_slice(global_batch_size)
  for start in range(0, len(blocks), global_batch_size):
    chunk = np.arange(start, start + global_batch_size)
    weights = (chunk < len(blocks)).astype(np.float32)
    yield blocks[chunk % len(blocks)][rows], weights[rows]


def prefetch(batches: Iterator[np.ndarray], mesh: jax.sharding.Mesh,
             size: int = 2) -> Iterator[jax.Array]:
  """Keeps `size` train batches in flight to the devices while the current step runs."""
  queue = []
  for batch in batches:
    queue.append(sharding.shard_batch(batch, mesh, batch_axis=1))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue
