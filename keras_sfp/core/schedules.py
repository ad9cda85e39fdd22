"""Pruning-rate schedules: serializable callables `epoch -> rate`.

A schedule tells `SoftFilterPrune` which fraction of filters to prune at the
prune event that follows epoch `epoch` (0-based; the event before training uses
epoch 0). Like `tfmot.sparsity.keras.PruningSchedule`, schedules are small
objects with `get_config`, registered for `.keras` serialization.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras

from keras_sfp import _checks


def _check_rate(name: str, value: float) -> None:
    _checks.number_in(name, value, 0, 1)


@keras.saving.register_keras_serializable(package="keras_sfp")
class PruningSchedule:
    """Base class: subclasses implement `__call__(epoch, epochs=None)`."""

    def __call__(self, epoch: int, epochs: int | None = None) -> float:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict) -> PruningSchedule:
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_sfp")
class Constant(PruningSchedule):
    """The same rate at every event (the paper's schedule).

    Args:
        rate: Fraction of filters pruned, in [0, 1).

    Raises:
        ValueError: If `rate` is not in [0, 1).

    Example:
    >>> Constant(0.3)(5)
    0.3
    """

    def __init__(self, rate: float):
        _check_rate("rate", rate)
        self.rate = float(rate)

    def __call__(self, epoch: int, epochs: int | None = None) -> float:
        return self.rate

    def get_config(self) -> dict:
        return {"rate": self.rate}


@keras.saving.register_keras_serializable(package="keras_sfp")
class Asymptotic(PruningSchedule):
    """The ASFP schedule (He et al., IEEE T-Cybernetics 2019).

    The rate grows as `P(t) = a * exp(-k * t) + b` with `P(0) = 0`,
    `P(epochs - 1) = rate` and `P(epochs / 8) = 3/4 * rate`: pruning starts
    gently and reaches three quarters of its target after an eighth of
    training.

    Args:
        rate: Target fraction of filters pruned, in [0, 1).
        epochs: Number of epochs of the schedule (> 1). `None` (the default)
            takes the number of epochs of the `fit` call (its soft epochs when
            `SoftFilterPrune(hard_epochs=...)` freezes the last ones).

    Raises:
        ValueError: If `rate` is not in [0, 1) or `epochs` is not an integer
            >= 2 or None.

    Example:
    >>> s = Asymptotic(0.4, epochs=80)
    >>> s(0), round(s(10), 4), round(s(79), 4)
    (0.0, 0.3, 0.4)
    """

    def __init__(self, rate: float, epochs: int | None = None):
        _check_rate("rate", rate)
        _checks.optional_int_at_least("epochs", epochs, 2)
        self.rate = float(rate)
        self.epochs = epochs

    def _k(self, last: float) -> float:
        # P(0) = 0 gives a = -b, so P(t) = b * (1 - exp(-k t)). The 3/4 point
        # fixes k through a ratio that is monotone in k: solve by bisection.
        t_q = (last + 1) / 8.0

        def ratio(k: float) -> float:
            return (1.0 - math.exp(-k * t_q)) / (1.0 - math.exp(-k * last))

        lo, hi = 1e-9, 1e3
        if ratio(hi) < 0.75:  # schedule too short for the 3/4 point: linear-ish
            return hi
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if ratio(mid) < 0.75:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def __call__(self, epoch: int, epochs: int | None = None) -> float:
        total = self.epochs or epochs
        if total is None or total < 2:
            return self.rate  # a single event: it has to reach the target
        last = float(total - 1)
        t = min(max(float(epoch), 0.0), last)
        k = self._k(last)
        b = self.rate / (1.0 - math.exp(-k * last))
        return float(b * (1.0 - math.exp(-k * t)))

    def get_config(self) -> dict:
        return {"rate": self.rate, "epochs": self.epochs}


NAMES = ("constant", "asymptotic")
"""The schedules `get` (and `--pruning_schedule`) know by name."""


def get(schedule: PruningSchedule | Callable | None, rate: float) -> Callable:
    """Returns the schedule to use: `schedule`, or `Constant(rate)` if None."""
    if schedule is None:
        return Constant(rate)
    if isinstance(schedule, str):
        if schedule == "constant":
            return Constant(rate)
        if schedule == "asymptotic":
            return Asymptotic(rate)
    elif callable(schedule):
        return schedule
    raise ValueError(
        "`schedule` must be None, 'constant', 'asymptotic' or a callable "
        f"epoch -> rate. Received: schedule={schedule!r}"
    )
