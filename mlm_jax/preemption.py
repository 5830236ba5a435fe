"""Stop requests: SIGTERM (what preemption sends) and Ctrl-C end a run cleanly.

The first signal asks the training loop to finish the step in flight, write a
checkpoint and exit; a second one exits at once.
"""

import os
import signal
import sys
import threading


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
