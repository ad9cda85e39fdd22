"""Argument checks shared by the model builders (private to `models`)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import keras

from keras_sfp import _checks


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Returns `input_shape` as a tuple of three positive Python ints.

    Raises:
        ValueError: If it is not three positive integers.
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(_checks.is_int(d) and d > 0 for d in shape):
        raise ValueError(
            "`input_shape` must be three positive integers (height, width, "
            f"channels). Received: input_shape={input_shape!r}"
        )
    return tuple(int(d) for d in shape)


def check_num_classes(num_classes: int) -> None:
    """Raises `ValueError` unless `num_classes` is an integer >= 1."""
    if not (_checks.is_int(num_classes) and num_classes >= 1):
        raise ValueError(
            "`num_classes` must be an integer >= 1. "
            f"Received: num_classes={num_classes!r}"
        )


def l2_regularizer(weight_decay: float) -> keras.regularizers.Regularizer | None:
    """Returns `L2(weight_decay)`, or `None` for a zero `weight_decay`.

    Raises:
        ValueError: If `weight_decay` is negative or not a number.
    """
    if not (isinstance(weight_decay, numbers.Real) and weight_decay >= 0.0):
        raise ValueError(
            "`weight_decay` must be a number >= 0. "
            f"Received: weight_decay={weight_decay!r}"
        )
    return keras.regularizers.L2(float(weight_decay)) if weight_decay > 0 else None
