"""Sparse training before pruning: group lasso on coupled channel groups.

A channel that several layers share (a residual stream, a concatenation's
consumers) is removed from all of them at once, so its importance is that of
all its filters together. The group lasso `coef * sum_c ||W_c||_2`, where
`W_c` gathers every member layer's filter (kernel slice and bias) of channel
`c` of a group, drives whole groups of filters toward zero together during
the first epochs, so that the pruning event that follows removes channels
the network has already learnt to do without (DepGraph's group-norm
regularisation: Fang et al., CVPR 2023; Torch-Pruning's `GroupNormPruner`).

The penalty is a Keras weight regularizer attached to one member's kernel
per group (`attach`), so it is part of `fit`'s loss on every backend, and is
removed again (`detach`) without a trace in the saved model.
"""

from __future__ import annotations

import keras
import numpy as np

_EPSILON = 1e-12  # keeps the gradient of the norm finite at zero


def _channel_squares(member, xp=keras.ops):
    """Per-channel sum of squares of a member's filters (kernel and bias).

    `member` is `(wrapper, start, length)`; `xp` is `keras.ops` (tensors, in
    the training step) or `numpy` (host values).
    """
    wrapper, start, length = member
    weights = [wrapper.kernel] + ([wrapper.bias] if wrapper.bias is not None else [])
    if xp is np:
        weights = [keras.ops.convert_to_numpy(w) for w in weights]
    kernel = weights[0][..., start : start + length]
    squares = xp.sum(xp.reshape(xp.square(kernel), (-1, length)), axis=0)
    if len(weights) > 1:
        squares = squares + xp.square(weights[1][start : start + length])
    return squares


def group_norms(unit) -> np.ndarray:
    """`||W_c||_2` of every channel of a unit: a list of group members."""
    squares = sum(_channel_squares(member, np) for member in unit)
    return np.sqrt(squares)


def penalty(units, coef: float) -> float:
    """The group lasso of `units` (lists of members), as NumPy computes it."""
    return float(coef * sum(np.sum(group_norms(unit)) for unit in units))


class GroupLasso:
    """A weight regularizer computing the group lasso of whole channel groups.

    Attached to one variable, it reads the other members' variables too
    (inside `fit`'s compiled step, their current values), and adds the
    regularizer that variable had before, if any.

    Args:
        units: Lists of members `(FilterPruning wrapper, start, length)`.
        coef: The penalty's weight.
        previous: The variable's own regularizer, or None.
    """

    def __init__(self, units: list, coef: float, previous=None):
        self.units = units
        self.coef = float(coef)
        self.previous = previous

    def __call__(self, variable):
        total = self.previous(variable) if self.previous is not None else 0.0
        for unit in self.units:
            squares = sum(_channel_squares(member) for member in unit)
            norms = keras.ops.sqrt(squares + _EPSILON)
            total = total + self.coef * keras.ops.sum(norms)
        return total


def attach(units: list, coef: float) -> list:
    """Adds the group lasso of `units` to the loss; returns what `detach` takes.

    The penalty of each unit sits on its first member's kernel variable.
    Compiled training functions must be rebuilt to see it.
    """
    by_variable = {}
    for unit in units:
        variable = unit[0][0].kernel
        by_variable.setdefault(id(variable), (variable, []))[1].append(unit)
    attached = []
    for variable, variable_units in by_variable.values():
        previous = variable.regularizer
        variable.regularizer = GroupLasso(variable_units, coef, previous)
        attached.append((variable, previous))
    return attached


def detach(attached: list) -> None:
    """Restores the regularizers `attach` replaced."""
    for variable, previous in attached:
        variable.regularizer = previous
