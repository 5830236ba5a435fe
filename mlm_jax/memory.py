"""Memory: what a compiled program needs against what its device has free, and running out of
it as one line.

XLA states a compiled program's memory before it runs (`Compiled.memory_analysis()`): its
temporaries and outputs, per device. Evaluation and fill-mask choose their batch's rows by
it, so that a long `block_size` (8,192 tokens through dense attention: 3 GB a row of a small
ModernBERT) evaluates fewer rows at a time rather than failing. A program that fails anyway
raises XLA's RESOURCE_EXHAUSTED, which `is_out_of_memory` recognises for the entry points.
"""

from typing import Callable

import jax

from mlm_jax import errors

# The share of the free memory a batch may plan to use: XLA's figures leave out the
# allocator's slack and whatever else the process allocates meanwhile.
USABLE_FRACTION = 0.8
# What to lower, by the entry point that ran out of memory (`out_of_memory_message`).
TRAIN_ADVICE = ('lower --config.per_device_batch_size (raising --config.grad_accum_steps keeps '
                'the batch), --config.eval_batch_size or --config.block_size, or set '
                '--config.remat_policy=full (or minimal) so that the backward pass recomputes '
                'activations; checkpoints already saved are kept, and the same command with '
                'the change resumes from them')
EVAL_ADVICE = 'lower --config.eval_batch_size or --config.block_size'
INFER_ADVICE = 'lower --batch_size, or shorten the texts'


def free_bytes(device: jax.Device) -> int | None:
  """Memory free for a new program on `device`: an accelerator's limit less what it holds;
  the host's available memory (MemAvailable) for the CPU. None where it cannot be told."""
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  return host_available_bytes()


def host_available_bytes() -> int | None:
  """The kernel's estimate of memory available without swapping (Linux); None elsewhere."""
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def needed_bytes(compiled: jax.stages.Compiled) -> int:
  """What running `compiled` allocates per device beyond its arguments: temporaries and
  outputs (less the outputs that reuse a donated argument's buffer)."""
  stats = compiled.memory_analysis()
  if stats is None:  # A backend that does not say.
    return 0
  return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes


def rows_that_fit(need: Callable[[int], int], rows: int, multiple: int,
                  available: int | None) -> tuple[int, int]:
  """(rows, their need): `rows`, or the most rows below it, a multiple of `multiple` (the
  devices), that `need(rows)` (bytes per device, from compiling the program at that many
  rows) says fit in `USABLE_FRACTION` of `available` bytes. Memory grows about linearly in
  rows, so the first guess scales `rows` down by the ratio; halving then settles it. At
  `multiple` rows the need is returned whatever it is: the caller says what to lower."""
  needed = need(rows)
  if available is None:
    return rows, needed
  budget = USABLE_FRACTION * available
  while needed > budget and rows > multiple:
    guess = int(rows * budget / needed) // multiple * multiple
    rows = max(multiple, min(guess, rows // 2 // multiple * multiple))
    needed = need(rows)
  return rows, needed


def gigabytes(n: float) -> str:
  return f'{n / 1e9:.1f} GB'


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error`, or an error that caused it, is XLA running out of device or host memory
  (RESOURCE_EXHAUSTED: an allocation that failed) or a Python `MemoryError`."""
  return _out_of_memory_cause(error) is not None


def out_of_memory_message(error: BaseException, advice: str) -> str:
  """The one line for a program that ran out of memory: what XLA said and what to lower."""
  return f'out of memory ({errors.first_line(_out_of_memory_cause(error))}); {advice}'


def _out_of_memory_cause(error: BaseException | None) -> BaseException | None:
  """`error` or the first error in its chain of causes that is running out of memory."""
  while error is not None:
    if isinstance(error, MemoryError) or 'RESOURCE_EXHAUSTED' in str(error):
      return error
    error = error.__cause__
  return None
