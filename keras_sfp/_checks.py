"""Argument checks shared by the public functions: one wording, one home."""

from __future__ import annotations

import numbers


def is_int(value) -> bool:
    """True for Python and NumPy integers, False for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_at_least(name: str, value, minimum: int) -> int:
    """`value` as an int if it is an integer >= `minimum`, else a ValueError."""
    if not is_int(value) or value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}"
        )
    return int(value)


def positive_int(name: str, value) -> int:
    """`value` as an int if it is an integer >= 1, else a ValueError."""
    return int_at_least(name, value, 1)


def optional_int_at_least(name: str, value, minimum: int) -> int | None:
    """None, or `value` as an int if it is an integer >= `minimum`; else a
    ValueError."""
    if value is None:
        return None
    if not is_int(value) or value < minimum:
        raise ValueError(
            f"`{name}` must be None or an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    return int(value)
