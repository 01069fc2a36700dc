"""The one exception type for mistakes a user can fix (bad path, bad flag, wrong directory).

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class Stopped(Exception):
    """A run stopped by SIGINT or SIGTERM after keeping its work; the message says what was kept and how to go on."""
