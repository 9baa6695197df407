"""The one exception type that reaches the user as a single line (`error: ...`) and a non-zero exit."""


class UserError(Exception):
    """Bad input or missing data: the message says what is wrong and what to do instead."""
