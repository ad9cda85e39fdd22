"""Argument checks shared by the public functions: one wording, one home."""

from __future__ import annotations

import numbers
import sys


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


def round_to(value, received=None):
    """`"auto"`, or `value` as an int if it is an integer >= 1; else a
    ValueError naming `received` (default: `value`), what the user gave."""
    if isinstance(value, str) and value == "auto":
        return value
    if not is_int(value) or value < 1:
        shown = value if received is None else received
        raise ValueError(
            "`round_to` must be a positive integer or 'auto'. "
            f"Received: round_to={shown!r}"
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


def is_number(value) -> bool:
    """True for Python and NumPy real numbers, False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_number(name: str, value) -> float:
    """`value` as a float if it is a number > 0, else a ValueError."""
    if not is_number(value) or not value > 0:
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}"
        )
    return float(value)


def number_in(name: str, value, low: float, high: float, closed: bool = False) -> float:
    """`value` as a float if it is a number in [low, high) ([low, high] if
    `closed`), else a ValueError."""
    number = is_number(value)
    inside = number and (low <= value <= high if closed else low <= value < high)
    if not inside:
        interval = f"[{low:g}, {high:g}{']' if closed else ')'}"
        kind = "" if number else "a number "
        raise ValueError(
            f"`{name}` must be {kind}in {interval}. Received: {name}={value!r}"
        )
    return float(value)


def boolean(name: str, value) -> bool:
    """`value` if it is a bool, else a ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return value


STRATEGY_UPSTREAM = "keras-team/keras#20585, tensorflow/tensorflow#72388"


def check_strategy() -> None:
    """Stops a `tf.distribute.MultiWorkerMirroredStrategy` before `fit` fails.

    Raises:
        RuntimeError: If such a strategy is in scope.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None or not hasattr(tf, "distribute"):
        return
    strategy = tf.distribute.get_strategy()
    kinds = tuple(
        getattr(module, "MultiWorkerMirroredStrategy", None)
        for module in (tf.distribute, tf.distribute.experimental)
    )
    if isinstance(strategy, tuple(k for k in kinds if k is not None)):
        raise RuntimeError(
            "tf.distribute.MultiWorkerMirroredStrategy does not work with "
            "Keras 3: `fit` fails converting PerReplica values to tensors, for "
            f"any model ({STRATEGY_UPSTREAM}). Train on several hosts with the JAX "
            "backend instead: keras_sfp.training.distributed.initialize() and "
            "keras_sfp.training.distributed.data_parallel() (train.py "
            "--distribute=multi_process). MirroredStrategy (one host, several "
            "devices) works."
        )
