"""The one exception type that reaches a user as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input or an unusable environment; the message names the bad value and the fix."""
