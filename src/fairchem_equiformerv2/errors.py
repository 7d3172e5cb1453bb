"""The one exception type the command line reports as a user error.

``fairchem-eqv2`` prints a :class:`UserInputError` as a single line on stderr and exits
with status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user: a missing file, an invalid argument, a failed validation."""
