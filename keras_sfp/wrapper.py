"""The layer wrapper that carries a convolution's filter mask."""

from __future__ import annotations

import numbers

import keras
from keras import ops

from keras_sfp import criteria as criteria_lib
from keras_sfp import schedules as schedules_lib

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
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise ValueError(f"`rate` must be a number in [0, 1). Received: rate={rate!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"`rate` must be in [0, 1). Received: rate={rate!r}")
    criteria_lib.get(criterion)
    if coupling not in COUPLINGS:
        raise ValueError(
            f"`coupling` must be one of {COUPLINGS}. Received: coupling={coupling!r}"
        )
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(
            f"`round_to` must be an integer >= 1. Received: round_to={round_to!r}"
        )
    schedules_lib.get(schedule, rate)


@keras.saving.register_keras_serializable(package="keras_sfp")
class FilterPruning(keras.layers.Wrapper):
    """Wraps a `Conv2D`, `SeparableConv2D` or `Dense` with a per-filter mask.

    In the default *soft* state the wrapper computes exactly what the wrapped
    convolution computes: Soft Filter Pruning (He et al., IJCAI 2018) zeroes
    the pruned filters' weights at prune events but lets them train in between,
    so they can recover. `SoftFilterPrune` writes the mask and zeroes weights;
    the wrapper only carries the state (mask, hard flag, prune-event counter) so
    that it is saved with the model and restored by `BackupAndRestore`.

    In the *hard* state (`hard == 1`, used for the last epochs if the callback
    is asked to) the mask multiplies the kernel and bias in the forward pass, so
    pruned filters output zero and receive no gradient: the network adapts to
    the structure it will be deployed with.

    Args:
        layer: A built or unbuilt `keras.layers.Conv2D` (not grouped),
            `SeparableConv2D` (its pointwise filters are masked) or `Dense`
            (its units are masked).
        rate: Fraction of filters to prune, in [0, 1). Defaults to 0.3.
        criterion: `"l2"`, `"l1"`, `"fpgm"` or a callable (register it with
            `keras.saving.register_keras_serializable` so that `.keras` files
            reload). Defaults to `"l2"`.
        schedule: `None` (constant `rate`), or a schedule `epoch -> rate`.
            Defaults to None.
        coupling: `"group"` or `"layer"`. Defaults to `"group"`.
        round_to: Kept filter counts are rounded up to a multiple of this.
            Defaults to 1.
        **kwargs: Passed to `keras.layers.Wrapper`.

    Raises:
        ValueError: If `layer` is not one of those or an option is invalid.

    Example:
    >>> w = FilterPruning(keras.layers.Conv2D(4, 3), rate=0.5)
    >>> tuple(w(np.zeros((1, 5, 5, 2))).shape)
    (1, 3, 3, 4)
    >>> w.mask.numpy().tolist()
    [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        rate: float = 0.3,
        criterion="l2",
        schedule=None,
        coupling: str = "group",
        round_to: int = 1,
        **kwargs,
    ):
        if type(layer) not in PRUNABLE_TYPES or getattr(layer, "groups", 1) != 1:
            raise ValueError(
                "`layer` must be a keras.layers.Conv2D (groups=1), "
                "SeparableConv2D or Dense. "
                f"Received: layer={layer!r} of type {type(layer).__name__}"
            )
        check_prune_args(rate, criterion, coupling, round_to, schedule)
        super().__init__(layer, **kwargs)
        self.rate = float(rate)
        self.criterion = criterion
        self.schedule = schedule
        self.coupling = coupling
        self.round_to = int(round_to)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        filters = num_outputs(self.layer)
        self.mask = self.add_weight(
            name="mask",
            shape=(filters,),
            initializer="ones",
            trainable=False,
            aggregation="only_first_replica",
        )
        self.hard = self.add_weight(
            name="hard",
            shape=(),
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )
        # Epoch of the last prune event: -2 before any event, -1 after the
        # event before training; lets resumed runs skip the initial event.
        self.last_event = self.add_weight(
            name="last_event",
            shape=(),
            initializer=keras.initializers.Constant(-2.0),
            trainable=False,
            aggregation="only_first_replica",
        )
        self.built = True

    @property
    def kernel(self):
        """The wrapped layer's kernel whose last axis indexes filters."""
        return output_kernel(self.layer)

    @property
    def bias(self):
        return self.layer.bias if self.layer.use_bias else None

    def effective_mask(self):
        """`mask` in the hard state, all ones in the soft state."""
        return 1.0 - self.hard * (1.0 - self.mask)

    def call(self, inputs):
        layer = self.layer
        dtype = layer.compute_dtype
        m = ops.cast(self.effective_mask(), dtype)
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
            }
        )
        return config

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
