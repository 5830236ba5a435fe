"""Stop requests: SIGTERM (what preemption sends) and Ctrl-C end a run cleanly.

The first signal asks the training loop to finish the step in flight, write a
checkpoint and exit; a second one exits at once. On several hosts the signal
reaches one host, or each at a different step: `agreed_stop` turns the hosts'
flags into one decision, taken at the same step everywhere, so that every host
enters the same checkpoint save (a collective) and exits with the same status.
"""

import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class Stopped(Exception):
  """The run stopped on request after saving; `exit_code` follows the shell's 128 + signal."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class StopRequest:
  """A context manager that turns SIGTERM and SIGINT into a flag the loop polls."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_number: int | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_number is not None

  def _handle(self, number, frame):
    del frame
    if self.requested:  # The second signal: no more waiting.
      print(f'\n{signal.Signals(number).name} again: exiting now without saving.',
            file=sys.stderr, flush=True)
      os._exit(128 + number)  # pylint: disable=protected-access
    self.signal_number = number
    print(f'\n{signal.Signals(number).name}: saving a checkpoint after this step, then '
          'stopping (send it again to exit at once).', file=sys.stderr, flush=True)

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():  # Only there can Python trap signals.
      for number in self.SIGNALS:
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous.clear()


def agreed_stop(stop: StopRequest, step: int, every: int) -> int | None:
  """The signal number that every host stops for after `step`, or None to go on.

  With several hosts, every host calls this after every step and the hosts exchange
  their flags (a small all-gather) after each `every`-th step, so a signal received
  anywhere stops all hosts at the same step; between those steps nothing is exchanged.
  The first host's signal in process order names the stop, so every host exits alike.
  """
  if jax.process_count() == 1:
    return stop.signal_number
  if step % every:
    return None
  flags = np.asarray(multihost_utils.process_allgather(np.int32(stop.signal_number or 0)))
  raised = flags[flags > 0]
  return int(raised[0]) if raised.size else None
