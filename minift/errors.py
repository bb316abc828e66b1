"""The one exception type for mistakes a user can fix (a flag, a file, a folder).

``minift`` prints a ``UserError`` as one line on stderr and exits with status 2; every other
exception is a bug in minift (or in the environment) and keeps its traceback. ``UserError`` is a
``ValueError``, so code that catches ValueError still catches it.
"""


class UserError(ValueError):
    """A mistake in the user's input: the message says what was expected and what came."""
