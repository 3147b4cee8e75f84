"""The one error type of user-facing failures."""


class MuskError(Exception):
    """An error caused by the user's input: the CLI prints its message (no traceback), exits 2."""
