"""What the entry points share: multi-host start-up and one-line errors for user mistakes."""

import sys
from typing import Callable, TypeVar

import jax

from mlm_jax.errors import UserError

T = TypeVar('T')


def run_user_facing(fn: Callable[[], T]) -> T:
  """Runs `fn`; a `UserError` becomes one line on stderr and exit status 2."""
  try:
    return fn()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-host run: from flags, or auto-detected (Cloud TPU, SLURM, Open MPI)."""
  if coordinator_address or num_processes or process_id is not None:
    if not (coordinator_address and num_processes and process_id is not None):
      raise UserError('a multi-host run needs all of --coordinator_address, --num_processes '
                      'and --process_id (or none of them, where JAX detects the cluster)')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError):
    pass  # Not a cluster JAX knows how to detect: a single-process run.


def train(config, workdir: str, coordinator_address: str | None = None,
          num_processes: int | None = None, process_id: int | None = None) -> dict:
  from mlm_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  initialize_distributed(coordinator_address, num_processes, process_id)
  if jax.process_index() == 0:
    print(f'Workdir: {workdir}', flush=True)
  return train_lib.train_and_evaluate(config, workdir)
