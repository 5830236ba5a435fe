"""The one exception type for problems the user can fix (bad input, bad config).

Entry points print it as a single line and exit non-zero; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input; the message names the input and the fix."""


def first_line(error: BaseException) -> str:
  """The first line of an exception's message (or its type's name), for one-line errors."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
