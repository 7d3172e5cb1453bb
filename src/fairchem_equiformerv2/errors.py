"""The exceptions the plugin raises for bad input, each naming what is wrong.

``fairchem-eqv2`` prints a :class:`UserInputError` (and an ``OSError``) as a single line on stderr
and exits with status 2; any other exception is a bug and keeps its traceback. The model raises
:class:`ConfigError` for a backbone or head argument and :class:`InputError` for a structure it
cannot evaluate, both ``ValueError``\\ s.
"""
from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user: a missing file, an invalid argument, a failed validation."""


class ConfigError(ValueError):
    """A backbone or head argument that cannot work; the message names the argument and its value."""


class InputError(ValueError):
    """A structure the model cannot evaluate; the message names the atom, structure or field."""


class ElementError(InputError, AssertionError):
    """An atomic number outside the model's element table. fairchem's EquiformerV2 raises a bare
    ``AssertionError`` there, so this is one too: code that catches either keeps working."""
