"""The layer wrappers: a convolution's filter mask, the channel masks of hard epochs.

Why one module of about 400 lines: both wrappers share the host-side state
(mask, hard flag, last event) that `.keras` files and backups save, and its
checks.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_sfp import _checks
from keras_sfp.core import criteria as criteria_lib
from keras_sfp.core import schedules as schedules_lib

COUPLINGS = ("group", "layer")
# Layers whose output channels (filters, units) the wrapper can mask.
PRUNABLE_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.Dense)


def output_kernel(layer):
    """The kernel whose last axis indexes the layer's output channels."""
    if isinstance(layer, keras.layers.SeparableConv2D):
        return layer.pointwise_kernel
    return layer.kernel


def num_outputs(layer) -> int:
    """Output channels of a Conv2D/SeparableConv2D (filters) or Dense (units)."""
    return layer.units if isinstance(layer, keras.layers.Dense) else layer.filters


def check_prune_args(
    rate: float, criterion, coupling: str, round_to: int, schedule=None
) -> None:
    """Validates the pruning options shared by `prune_filters` and the wrapper."""
    _checks.number_in("rate", rate, 0, 1)
    criteria_lib.get(criterion)
    if coupling not in COUPLINGS:
        raise ValueError(
            f"`coupling` must be one of {COUPLINGS}. Received: coupling={coupling!r}"
        )
    _checks.positive_int("round_to", round_to)
    schedules_lib.get(schedule, rate)


def _channel_values(name: str, value, channels: int) -> np.ndarray:
    """`value` as a float32 vector of `channels` zeros and ones, or raise."""
    array = np.asarray(value, dtype=np.float32)
    if array.shape != (channels,) or not np.all((array == 0) | (array == 1)):
        raise ValueError(
            f"`{name}` must be {channels} values, each 0 or 1. Received: "
            f"{name} of shape {array.shape}: {array.tolist()!r}"
        )
    array.flags.writeable = False
    return array


def _channel_rates(value, rate: float, channels: int) -> np.ndarray | None:
    """`channel_rates` validated: None, or `channels` rates in [0, `rate`]."""
    if value is None:
        return None
    array = np.array(value, dtype=np.float64)  # a copy: made read-only below
    if (
        array.shape != (channels,)
        or not np.all(array >= 0.0)
        or not np.all(array <= rate)
    ):
        raise ValueError(
            f"`channel_rates` must be {channels} rates in [0, rate={rate}]. "
            f"Received: channel_rates of shape {array.shape}: {array.tolist()!r}"
        )
    array.flags.writeable = False
    return array


class _HostState:
    """Saved state of the wrappers, held on the host as NumPy values.

    Not Keras variables, on purpose: every variable is an input and an output
    of each compiled training step (on JAX, one more array to pass and donate
    per step), and the soft forward pass never reads this state. The hard
    forward pass reads it as constants when it is traced, which is why the
    hard state is switched with `keras_sfp.core.state.set_hard`, which rebuilds
    the compiled functions. `.keras` files, `save_weights` and
    `BackupAndRestore` save and restore it with the layer's own variables.
    """

    _SAVED: tuple = ()  # attribute names, stored under their names

    @property
    def hard(self) -> bool:
        """Whether the forward pass enforces the state (read-only: `set_hard`)."""
        return self._hard

    def set_hard(self, hard: bool) -> None:
        """Switches between the soft and the hard forward pass.

        The state is a Python value, so a compiled function (`fit`'s train
        step) keeps the forward pass it was traced with:
        `keras_sfp.core.state.set_hard` switches a whole model and rebuilds its
        compiled functions, and `SoftFilterPrune` calls it.
        """
        self._hard = bool(hard)

    def save_own_variables(self, store):
        for name in self._SAVED:
            store[name] = np.asarray(getattr(self, name), dtype=np.float32)

    def load_own_variables(self, store):
        for name in self._SAVED:
            value = np.asarray(store[name], dtype=np.float32)
            if name == "hard":
                self._hard = bool(value == 1)
            elif value.ndim == 0:
                setattr(self, name, float(value))
            else:
                setattr(self, name, value)


@keras.saving.register_keras_serializable(package="keras_sfp")
class FilterPruning(_HostState, keras.layers.Wrapper):
    """Wraps a `Conv2D`, `SeparableConv2D` or `Dense` with a per-filter mask.

    In the default *soft* state the wrapper calls the wrapped layer and does
    nothing else (no extra work in the forward pass): Soft Filter Pruning (He
    et al., IJCAI 2018) zeroes the pruned filters' weights at prune events but
    lets them train in between, so they can recover. `SoftFilterPrune` writes
    the mask and zeroes weights; the wrapper carries the state (mask, hard
    flag, prune-event counter) so that it is saved with the model and
    restored by `BackupAndRestore`.

    In the *hard* state (`SoftFilterPrune`'s last `hard_epochs` epochs, one by
    default) the mask multiplies the kernel and bias in the forward pass, so pruned
    filters output zero and receive no gradient, and the `ChannelMask`
    wrappers that `prune_filters` puts around BatchNormalization (and other
    layers with offsets) zero the channels those filters feed: the network
    trains with the structure it will be deployed with. The state is a
    Python value fixed when a function is traced; switch it with
    `keras_sfp.core.state.set_hard(model, ...)`, which also rebuilds the model's
    compiled functions.

    Args:
        layer: A built or unbuilt `keras.layers.Conv2D` (plain or grouped;
            a depthwise-form one is refused when built),
            `SeparableConv2D` (its pointwise filters are masked) or `Dense`
            (its units are masked).
        rate: Fraction of filters to prune, in [0, 1). Defaults to 0.3.
        criterion: `"l2"`, `"l1"`, `"fpgm"`, `"l2_bn"` or a callable (register it with
            `keras.saving.register_keras_serializable` so that `.keras` files
            reload). Defaults to `"l2"`.
        schedule: `None` (constant `rate`), or a schedule `epoch -> rate`.
            Defaults to None.
        coupling: `"group"` or `"layer"`. Defaults to `"group"`.
        round_to: Kept filter counts are multiples of this, rounded up or
            down and balanced across groups (see `prune_filters`). Defaults
            to 8.
        channel_rates: None (every group prunes `rate`), or one rate per
            output channel: the final rate of the group the channel belongs
            to, when groups prune at different rates (`prune_filters` with
            `target_latency`). Each must be at most `rate`, the schedule's
            final rate, which scales them at earlier events. Defaults to
            None.
        reference_shape: For a model whose inputs' size is unknown, the
            input shapes (one per model input, batch excluded) at which its
            MACs are counted (`prune_filters(input_shape=...)`). Defaults to
            None.
        **kwargs: Passed to `keras.layers.Wrapper`.

    Raises:
        ValueError: If `layer` is not one of those or an option is invalid.

    Example:
    >>> w = FilterPruning(keras.layers.Conv2D(4, 3), rate=0.5)
    >>> tuple(w(np.zeros((1, 5, 5, 2))).shape)
    (1, 3, 3, 4)
    >>> w.mask.tolist(), w.hard
    ([1.0, 1.0, 1.0, 1.0], False)
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        rate: float = 0.3,
        criterion="l2",
        schedule=None,
        coupling: str = "group",
        round_to: int = 8,
        channel_rates=None,
        reference_shape=None,
        **kwargs,
    ):
        if type(layer) not in PRUNABLE_TYPES:
            raise ValueError(
                "`layer` must be a keras.layers.Conv2D (plain or grouped, "
                "not depthwise), SeparableConv2D or Dense. "
                f"Received: layer={layer!r} of type {type(layer).__name__}"
            )
        check_prune_args(rate, criterion, coupling, round_to, schedule)
        super().__init__(layer, **kwargs)
        self.rate = float(rate)
        self.criterion = criterion
        self.schedule = schedule
        self.coupling = coupling
        self.round_to = int(round_to)
        self.channel_rates = _channel_rates(channel_rates, rate, num_outputs(layer))
        self.reference_shape = (
            None
            if reference_shape is None
            else tuple(tuple(int(d) for d in shape) for shape in reference_shape)
        )
        self._hard = False
        self._mask = _channel_values(
            "mask", np.ones(num_outputs(layer)), num_outputs(layer)
        )
        # Epoch of the last prune event: -2 before any event, -1 after the
        # event before training; lets resumed runs skip the initial event.
        self.last_event = -2.0

    _SAVED = ("mask", "hard", "last_event")

    def build(self, input_shape=None):
        groups = getattr(self.layer, "groups", 1)
        if 1 < groups == self.layer.filters == (input_shape or [None])[-1]:
            raise ValueError(
                "`layer` must not be a depthwise-form Conv2D (groups equal to "
                "its input and output channels): it has no filters to prune. "
                f"Received: layer {self.layer.name!r} with groups={groups}"
            )
        if not self.layer.built:
            self.layer.build(input_shape)
        self.built = True

    @property
    def mask(self) -> np.ndarray:
        """1 for kept filters, 0 for pruned ones (a read-only float32 array)."""
        return self._mask

    @mask.setter
    def mask(self, value) -> None:
        self._mask = _channel_values("mask", value, len(self._mask))

    @property
    def kernel(self):
        """The wrapped layer's kernel whose last axis indexes filters."""
        return output_kernel(self.layer)

    @property
    def bias(self):
        return self.layer.bias if self.layer.use_bias else None

    def call(self, inputs):
        layer = self.layer
        if not self._hard:
            # Soft: exactly the wrapped layer, at exactly its cost.
            return layer(inputs)
        dtype = layer.compute_dtype
        m = ops.convert_to_tensor(self._mask, dtype)  # a constant of the trace
        kernel = ops.cast(output_kernel(layer), dtype) * m
        if isinstance(layer, keras.layers.Dense):
            outputs = ops.matmul(inputs, kernel)
        elif isinstance(layer, keras.layers.SeparableConv2D):
            outputs = ops.separable_conv(
                inputs,
                ops.cast(layer.depthwise_kernel, dtype),
                kernel,
                strides=layer.strides,
                padding=layer.padding,
                dilation_rate=layer.dilation_rate,
                data_format=layer.data_format,
            )
        else:
            outputs = layer.convolution_op(inputs, kernel)
        if layer.use_bias:
            bias = ops.cast(layer.bias, dtype) * m
            if getattr(layer, "data_format", "channels_last") == "channels_last":
                shape = (1,) * (len(outputs.shape) - 1) + (-1,)
            else:
                shape = (1, -1) + (1,) * (len(outputs.shape) - 2)
            outputs = ops.add(outputs, ops.reshape(bias, shape))
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "rate": self.rate,
                "criterion": keras.saving.serialize_keras_object(self.criterion)
                if not isinstance(self.criterion, str)
                else self.criterion,
                "schedule": keras.saving.serialize_keras_object(self.schedule)
                if self.schedule is not None
                else None,
                "coupling": self.coupling,
                "round_to": self.round_to,
                "channel_rates": None
                if self.channel_rates is None
                else self.channel_rates.tolist(),
                "reference_shape": None
                if self.reference_shape is None
                else [list(shape) for shape in self.reference_shape],
            }
        )
        return config

    def channel_rate(self, channel: int) -> float:
        """The final rate of the group output `channel` belongs to."""
        if self.channel_rates is None:
            return self.rate
        return float(self.channel_rates[channel])

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )
        for key in ("criterion", "schedule"):
            value = config.get(key)
            if value is not None and not isinstance(value, str):
                config[key] = keras.saving.deserialize_keras_object(
                    value, custom_objects=custom_objects
                )
        return cls(layer, **config)


@keras.saving.register_keras_serializable(package="keras_sfp")
class ChannelMask(_HostState, keras.layers.Wrapper):
    """Zeroes, in the hard state, the channels that only pruned filters feed.

    A pruned filter outputs zero, but a BatchNormalization after it turns that
    zero into `beta - gamma * mean / sqrt(var + eps)` (in training mode,
    `beta`), and a depthwise convolution adds its bias. The deployed model
    (`strip_pruning`, `shrink`) has no such channel. `prune_filters` wraps
    every such layer whose channels can be pruned, so that during
    `SoftFilterPrune`'s hard epochs the network computes exactly what it will
    be deployed as. In the soft state it calls the wrapped layer and does
    nothing else.

    Args:
        layer: A channelwise layer with offsets (`BatchNormalization`,
            `DepthwiseConv2D`, a depthwise-form grouped `Conv2D`).
        **kwargs: Passed to `keras.layers.Wrapper`.

    Example:
    >>> w = ChannelMask(keras.layers.BatchNormalization(center=True))
    >>> _ = w(np.zeros((1, 3)))
    >>> w.keep.tolist(), w.hard
    ([1.0, 1.0, 1.0], False)
    """

    def __init__(self, layer: keras.layers.Layer, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                "`layer` must be a keras.layers.Layer. "
                f"Received: layer={layer!r} of type {type(layer).__name__}"
            )
        super().__init__(layer, **kwargs)
        self._hard = False
        self._keep = None

    _SAVED = ("keep", "hard")

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        channels = self.layer.compute_output_shape(input_shape)[-1]
        self._keep = _channel_values("keep", np.ones(channels), channels)
        self.built = True

    @property
    def keep(self) -> np.ndarray | None:
        """1 for channels kept in the hard state, 0 for zeroed ones."""
        return self._keep

    @keep.setter
    def keep(self, value) -> None:
        self._keep = _channel_values("keep", value, len(self._keep))

    def call(self, inputs, training=None, **kwargs):
        # (No `mask` argument of its own, so Keras records none in the graph
        # and `strip_pruning` can call the bare layer with the same arguments.)
        outputs = self.layer(inputs, training=training, **kwargs)
        if not self._hard:
            return outputs
        return outputs * ops.convert_to_tensor(self._keep, outputs.dtype)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)  # (keras.layers.Wrapper pops from it)
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )
        return cls(layer, **config)


def unwrap(layer):
    """The layer inside a `FilterPruning` or `ChannelMask`, else `layer`."""
    if isinstance(layer, (FilterPruning, ChannelMask)):
        return layer.layer
    return layer
