"""Type and range checks of configuration fields, with messages that name the field and its value.

A config is YAML typed by hand: ``num_layers: "2"`` or ``max_radius: 0`` should stop at construction
with the field's name, not as a ``TypeError`` or ``ZeroDivisionError`` deep inside the first forward
pass. Each rule is a function of the value that returns what is wrong with it, or ``None``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

from ..errors import ConfigError

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


def real(minimum: float, *, above: bool = False, below: float | None = None, maximum: float | None = None) -> Rule:
    """A finite number ``>= minimum`` (``> minimum`` with ``above``; ``< below`` and ``<= maximum`` when given)."""
    bounds = f"{'>' if above else '>='} {minimum}" + (f" and < {below}" if below is not None else "")
    bounds += f" and <= {maximum}" if maximum is not None else ""

    def rule(value):
        if not _is_real(value):
            return f"must be a number {bounds}, not a {type(value).__name__}"
        value = float(value)
        ok = math.isfinite(value) and (value > minimum if above else value >= minimum)
        ok = ok and (below is None or value < below) and (maximum is None or value <= maximum)
        return None if ok else f"must be a number {bounds}"

    return rule


def flag(value) -> str | None:
    """true or false (0 and 1 too, as fairchem reads them by truth)."""
    if isinstance(value, bool) or (_is_integer(value) and value in (0, 1)):
        return None
    return f"must be true or false, not a {type(value).__name__}"


def boolean(value) -> str | None:
    """true or false only (YAML's booleans): a string such as ``"no"`` or ``"false"`` is true to Python."""
    return None if isinstance(value, bool) else f"must be true or false, not a {type(value).__name__}"


def text(value) -> str | None:
    return None if isinstance(value, str) else f"must be a string, not a {type(value).__name__}"


def one_of(*choices: str) -> Rule:
    """One of the strings ``choices``."""
    names = ", ".join(repr(choice) for choice in choices)
    return lambda value: None if isinstance(value, str) and value in choices else f"must be one of {names}"


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


def check_block(values: object, rules: Mapping[str, Rule], block: str) -> dict:
    """The settings of a nested config block (``noisy_nodes: {...}``) as a dict, after checking them:
    :class:`ConfigError` when ``values`` is not a mapping (``None`` is an empty block), names a field
    without a rule (an unknown field) or a field breaks its rule: ``"<block>.<field>=<value>: <what is
    wrong>"``."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{block}={values!r}: must be a mapping of settings (field: value)")
    for name, value in values.items():
        problem = rules[name](value) if name in rules else f"unknown field (the fields: {', '.join(rules)})"
        if problem:
            raise ConfigError(f"{block}.{name}={value!r}: {problem}")
    return dict(values)
