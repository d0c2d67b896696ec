"""Errors that describe bad user input.

The CLI turns these into one line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

__all__ = ["InputError", "MissingInputError"]


class InputError(ValueError):
    """A value given by the user is invalid; the message names it and the accepted values."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or directory named by the user does not exist."""
