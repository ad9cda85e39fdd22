"""What a channel rule is, and the registry of the user's own layer rules.

The base of the rule modules: `rules` (layers) and `op_rules` (`keras.ops`
calls) build `LayerRule`s from it, and `keras_graph` asks `is_registered`
whether a layer of the user's is to be traced or taken as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np

L = keras.layers
KINDS = ("producer", "channelwise", "merge", "boundary")  # and built-in
# kinds for `Concatenate` ("concat"), `Flatten` ("flatten") and channel
# slices such as `keras.ops.split` ("split")


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How one layer acts on channels.

    Attributes:
        kind: One of `KINDS`.
        slice_weights: Channelwise layers with weights:
            `(layer, config, weights, keep) -> (config, weights)` for the kept
            channel indices `keep`. Producers:
            `(layer, config, weights, keep_in, keep_out) -> (config, weights)`.
        zero: Channelwise: `(layer, zero_in, zeroed_offsets) -> zero_out`,
            bool arrays over channels. Merge: `(layer, [zero_in, ...]) ->
            zero_out`. None: decided by evaluating the layer on zeros.
        offsets: `layer -> variables` that `strip_pruning` zeroes on channels
            that only receive zeros (BatchNormalization's moving mean and
            beta, a depthwise bias): the "BN shift".
        reason: Why a boundary is one.
        ranges: Split: the `(start, stop)` channels of the input each output
            holds.
        resize: Split: `new ranges -> callable` doing the same split of the
            shrunk input (called with the node's arguments).
        border: Channelwise: the constant that constant padding writes
            around a zero channel (None: none). The next channelwise layer
            decides, by evaluating both on zeros, whether the channel is
            zero again (max pooling after -inf padding is).
    """

    kind: str
    slice_weights: Callable | None = None
    zero: Callable | None = None
    offsets: Callable | None = None
    reason: str | None = None
    ranges: list | None = None
    resize: Callable | None = None
    border: float | None = None


def boundary(reason: str) -> LayerRule:
    return LayerRule("boundary", reason=reason)


# -- zero propagation -------------------------------------------------------
def same(layer, zero_in, zeroed_offsets):
    return zero_in


def all_zero(layer, zeros):
    return np.logical_and.reduce(zeros)


def any_zero(layer, zeros):
    return np.logical_or.reduce(zeros)


def last_axis(axis, rank: int) -> bool:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return [a % rank for a in axes] == [rank - 1]


def slice_last_axis(layer, config, weights, keep):
    """Slices every weight whose last axis is per channel (size 1: shared)."""
    return config, [w if w.shape[-1] == 1 else w[..., keep] for w in weights]


USER_RULES: dict[type, LayerRule] = {}


def register_layer(layer_type: type, kind: str, slice_weights=None) -> None:
    """Tells the channel graph how a layer type of yours acts on channels.

    Unregistered layer types that the graph does not know are boundaries:
    correct, but channels crossing them are never pruned. Register a type to
    let channels through it:

    - `"channelwise"`: each output channel depends only on the same input
      channel (a per-channel scale, a custom activation). If the layer has
      weights with a per-channel axis, pass `slice_weights`.
    - `"merge"`: combines several inputs element by element (a scaled
      residual sum such as InceptionResNetV2's `CustomScaleLayer`).
    - `"boundary"`: never look through it (the default for unknown types).

    Whether a layer keeps zero channels at zero is measured by calling it on
    zeros, so only its channel behaviour has to be declared.

    Args:
        layer_type: A `keras.layers.Layer` subclass (matched exactly, not its
            subclasses).
        kind: `"channelwise"`, `"merge"` or `"boundary"`.
        slice_weights: For channelwise layers with weights:
            `fn(layer, config, weights, keep) -> (config, weights)` returning
            the config and weights of the layer with only the channels `keep`
            (an int array). Defaults to slicing the last axis of every weight
            (see `slice_last_axis`).

    Raises:
        ValueError: If `layer_type` is not a Layer subclass or `kind` is not
            one of the three.

    Example:
    >>> class Scale(keras.layers.Layer):
    ...     def build(self, shape):
    ...         self.gamma = self.add_weight(shape=(shape[-1],), initializer="ones")
    ...     def call(self, x):
    ...         return x * self.gamma
    >>> register_layer(Scale, "channelwise")
    >>> unregister_layer(Scale)
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, L.Layer)):
        raise ValueError(
            "`layer_type` must be a keras.layers.Layer subclass. "
            f"Received: layer_type={layer_type!r}"
        )
    kinds = ("channelwise", "merge", "boundary")
    if kind not in kinds:
        raise ValueError(f"`kind` must be one of {kinds}. Received: kind={kind!r}")
    if slice_weights is not None and not callable(slice_weights):
        raise ValueError(
            "`slice_weights` must be a callable "
            "(layer, config, weights, keep) -> (config, weights). "
            f"Received: slice_weights={slice_weights!r}"
        )
    if kind == "boundary":
        rule = boundary(f"{layer_type.__name__} is registered as a boundary")
    else:
        rule = LayerRule(kind, slice_weights=slice_weights or slice_last_axis)
    USER_RULES[layer_type] = rule


def is_registered(layer) -> bool:
    """True if `register_layer` has a rule for `layer`'s type."""
    return type(layer) in USER_RULES


def unregister_layer(layer_type: type) -> None:
    """Removes a rule added by `register_layer` (no error if there is none)."""
    USER_RULES.pop(layer_type, None)
