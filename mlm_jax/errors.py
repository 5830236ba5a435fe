"""The one exception type for problems the user can fix (bad input, bad config).

Entry points print it as a single line and exit non-zero; everything else is a
bug and keeps its traceback.
"""

import errno
import os


class UserError(Exception):
  """A problem with the user's input; the message names the input and the fix."""


def first_line(error: BaseException) -> str:
  """The first line of an exception's message (or its type's name), for one-line errors."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def described(error: BaseException) -> str:
  """'Type: first line of the message', what a one-line error quotes of the error behind it."""
  return f'{type(error).__name__}: {first_line(error)}'


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error that caused it, is a write to a full disk: an `OSError` with
  ENOSPC, or a library's error that quotes the system's message (tensorstore, safetensors)."""
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if os.strerror(errno.ENOSPC) in str(error):
      return True
    error = error.__cause__
  return False


def reason(error: BaseException) -> str:
  """What went wrong, for a one-line error: 'the disk is full', else the type and first line."""
  if is_disk_full(error):
    return 'the disk is full'
  return described(error)
