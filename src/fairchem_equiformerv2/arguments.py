"""Type and range checks of configuration fields, with messages that name the field and its value.

A config is YAML typed by hand: ``num_layers: "2"`` or ``max_radius: 0`` should stop at construction
with the field's name, not as a ``TypeError`` or ``ZeroDivisionError`` deep inside the first forward
pass. Each rule is a function of the value that returns what is wrong with it, or ``None``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

from .errors import ConfigError

Rule = Callable[[object], "str | None"]


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(minimum: int) -> Rule:
    """A whole number ``>= minimum``."""

    def rule(value):
        if not _is_integer(value):
            return f"must be a whole number >= {minimum}, not a {type(value).__name__}"
        return None if value >= minimum else f"must be >= {minimum}"

    return rule


def real(minimum: float, *, above: bool = False, below: float | None = None) -> Rule:
    """A finite number ``>= minimum`` (``> minimum`` with ``above``; ``< below`` when given)."""

    def rule(value):
        bounds = f"{'>' if above else '>='} {minimum}" + (f" and < {below}" if below is not None else "")
        if not _is_real(value):
            return f"must be a number {bounds}, not a {type(value).__name__}"
        value = float(value)
        ok = math.isfinite(value) and (value > minimum if above else value >= minimum)
        ok = ok and (below is None or value < below)
        return None if ok else f"must be a number {bounds}"

    return rule


def flag(value) -> str | None:
    """true or false (0 and 1 too, as fairchem reads them by truth)."""
    if isinstance(value, bool) or (_is_integer(value) and value in (0, 1)):
        return None
    return f"must be true or false, not a {type(value).__name__}"


def text(value) -> str | None:
    return None if isinstance(value, str) else f"must be a string, not a {type(value).__name__}"


def optional(rule: Rule) -> Rule:
    """``rule``, or ``None`` (null in YAML: the default)."""
    return lambda value: None if value is None else rule(value)


def integer_list(minimum: int) -> Rule:
    """A non-empty list of whole numbers ``>= minimum`` (any sequence: hydra passes a ``ListConfig``)."""
    element = integer(minimum)

    def rule(value):
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            return f"must be a non-empty list of whole numbers, not {type(value).__name__}"
        problems = [element(v) for v in value]
        return next((f"entry {v!r} {p}" for v, p in zip(value, problems) if p), None)

    return rule


def check_arguments(values: Mapping[str, object], rules: Mapping[str, Rule], owner: str) -> None:
    """Raise :class:`ConfigError` for the first field of ``values`` that breaks its rule:
    ``"<owner>: <field>=<value>: <what is wrong>"``."""
    for name, rule in rules.items():
        if name in values:
            problem = rule(values[name])
            if problem:
                raise ConfigError(f"{owner}: {name}={values[name]!r}: {problem}")
