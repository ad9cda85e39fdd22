"""Entry points that add and remove the pruning wrappers."""

from __future__ import annotations

import keras
import numpy as np

from keras_sfp import _keras_graph
from keras_sfp.graph import ChannelGraph
from keras_sfp.wrapper import (
    PRUNABLE_TYPES,
    FilterPruning,
    check_prune_args,
    output_kernel,
)

WRAPPER_PREFIX = "sfp_"


def _check_skip(model, skip) -> tuple:
    if skip is None:
        return ()
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise ValueError(
            f"`skip` must be a list of layer names (strings). Received: skip={skip!r}"
        )
    names = {layer.name for layer in _keras_graph.all_layers(model)}
    missing = [s for s in skip if s not in names]
    if missing:
        raise ValueError(
            f"`skip` names layers that are not in the model: {missing}. "
            f"Received: skip={list(skip)!r}"
        )
    return tuple(skip)


def prunable_layers(model, skip=None) -> list:
    """The layers whose filters (or units) `prune_filters` would prune."""
    graph = ChannelGraph(model, skip=skip)
    return [
        producer
        for group in graph.groups()
        if group.prunable
        for producer in group.producers
        if type(producer) in PRUNABLE_TYPES
    ]


def prune_filters(
    model: keras.Model,
    rate: float = 0.3,
    criterion="l2",
    schedule=None,
    coupling: str = "group",
    round_to: int = 1,
    skip=None,
) -> keras.Model:
    """Prepares a model for Soft Filter Pruning.

    Returns a clone of `model` (same weights) in which every prunable `Conv2D`,
    `SeparableConv2D` (pointwise filters) and `Dense` (units) is wrapped in
    `FilterPruning`, a wrapper that owns a per-filter mask. Train the clone
    with the `SoftFilterPrune` callback; it zeroes the lowest-scoring filters
    at every epoch end (He et al., IJCAI 2018). The clone computes exactly what
    `model` computes until the first prune event.

    A layer is prunable if its output channels can be physically removed
    afterwards: they do not reach a model output, do not cross a layer the
    channel graph does not understand (see `describe`), and no layer of their
    group is named in `skip`. With `coupling="group"` channels joined by
    residual merges, concatenations' consumers or squeeze-and-excitation gates
    are scored and pruned together, so `shrink` removes all of them. Nested
    Sequential or functional models are inlined: the clone is one flat
    functional model.

    Call it inside `strategy.scope()` when training with a distribution
    strategy, like building any model.

    Args:
        model: A built Sequential or functional `keras.Model`. Not modified.
        rate: Fraction of each group's channels to prune, in [0, 1). Defaults
            to 0.3.
        criterion: `"l2"` (the paper), `"l1"`, `"fpgm"` or a callable mapping a
            kernel `(kh, kw, in, out)` to `out` scores (register it with
            `keras.saving.register_keras_serializable` so that `.keras` files
            reload). Defaults to `"l2"`.
        schedule: `None` for a constant `rate`, `"asymptotic"`, or a schedule
            `epoch -> rate` such as `keras_sfp.schedules.Asymptotic`. Defaults
            to None.
        coupling: `"group"` (prune residual-coupled channels as one unit) or
            `"layer"` (the paper's independent per-layer choice). Defaults to
            `"group"`.
        round_to: Kept channel counts are rounded up to a multiple of this.
            Defaults to 1.
        skip: Names of layers to leave alone. Defaults to None.

    Returns:
        A new model of the same kind (functional if `model` nests models)
        with wrapped layers.

    Raises:
        ValueError: For an invalid option, a subclassed or unbuilt model, a
            `skip` name that is not a layer, or a model with nothing to prune.

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(x))
    >>> pruned = prune_filters(model, rate=0.25)
    >>> [type(layer).__name__ for layer in pruned.layers][1]
    'FilterPruning'
    """
    check_prune_args(rate, criterion, coupling, round_to, schedule)
    _keras_graph.check_graph_model(model)
    skip = _check_skip(model, skip)
    model = _keras_graph.inline(model)
    targets = {id(layer) for layer in prunable_layers(model, skip)}
    if not targets:
        raise ValueError(
            "`model` has no prunable layer: every convolution's channels "
            "reach an output, cross an unsupported layer or are skipped "
            "(keras_sfp.describe(model) says why). "
            f"Received: model {model.name!r} with layers "
            f"{[type(layer).__name__ for layer in model.layers]}"
        )

    def clone(layer):
        config = layer.get_config()
        new = _keras_graph.layer_from_config(layer, config)
        if id(layer) in targets:
            new = FilterPruning(
                new,
                rate=rate,
                criterion=criterion,
                schedule=schedule,
                coupling=coupling,
                round_to=round_to,
                name=WRAPPER_PREFIX + layer.name,
            )
        return new

    pruned = keras.models.clone_model(model, clone_function=clone)
    _copy_weights(model, pruned)
    return pruned


def _copy_weights(source, target, transform=None) -> None:
    """Copies weights from `source` to its clone `target`, layer by layer.

    `keras.models.clone_model` keeps the order of `layers`, so layers are
    paired by position (names can repeat inside nested models).
    """
    pairs = list(zip(source.layers, target.layers, strict=True))
    for src, layer in pairs:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        inner = layer.layer if isinstance(layer, FilterPruning) else layer
        plain = src.layer if isinstance(src, FilterPruning) else src
        if inner.name != plain.name:  # a Keras change in clone_model's order
            raise RuntimeError(
                f"clone_model reordered layers: {plain.name!r} vs {inner.name!r}"
            )
        weights = transform(src) if transform else _plain_weights(src)
        inner.set_weights(weights)


def _plain_weights(layer) -> list:
    if isinstance(layer, FilterPruning):
        return layer.layer.get_weights()
    return layer.get_weights()


def masked_weights(wrapper: FilterPruning) -> list:
    """The wrapped layer's weights with pruned filters set to zero."""
    mask = keras.ops.convert_to_numpy(wrapper.mask)
    layer = wrapper.layer
    masked = {id(output_kernel(layer))}
    if layer.use_bias:
        masked.add(id(layer.bias))
    return [
        keras.ops.convert_to_numpy(v) * mask.astype(v.dtype)
        if id(v) in masked
        else keras.ops.convert_to_numpy(v)
        for v in layer.weights
    ]


def wrappers(model) -> list[FilterPruning]:
    """The `FilterPruning` layers of `model`, in layer order."""
    return [layer for layer in model.layers if isinstance(layer, FilterPruning)]


def dead_offset_channels(model, graph: ChannelGraph | None = None) -> dict:
    """Channels of offset layers (BatchNormalization, depthwise bias) fed zeros.

    Returns:
        `{layer name: (offsets, bool array)}` for every channelwise layer of
        `model` with offsets that receives at least one channel that the
        masks (or all-zero filters) make zero; `offsets(layer)` lists the
        layer's offset variables.
    """
    graph = graph or ChannelGraph(model)

    def producer_zero(layer):
        if isinstance(layer, FilterPruning):
            return keras.ops.convert_to_numpy(layer.mask) == 0
        return filters_are_zero(layer)

    zeros = graph.tensor_zeros(producer_zero, zeroed_offsets=True)
    result = {}
    for node in graph.offset_nodes():
        entering = zeros.get(id(node.inputs[0]))
        if entering is not None and entering.any():
            result[node.layer.name] = (graph.rules[id(node)].offsets, entering)
    return result


def filters_are_zero(layer) -> np.ndarray:
    """Output channels of a producer whose kernel slice and bias are all zero."""
    if isinstance(layer, FilterPruning):
        layer = layer.layer
    kernel = keras.ops.convert_to_numpy(output_kernel(layer))
    zero = np.all(kernel.reshape(-1, kernel.shape[-1]) == 0, axis=0)
    if layer.use_bias:
        zero &= keras.ops.convert_to_numpy(layer.bias) == 0
    return zero


def zero_offsets(variables, channels: np.ndarray) -> None:
    """Sets the offsets of `channels` to zero, so they map 0 to exactly 0.

    For BatchNormalization the offsets are the moving mean and beta, so
    `gamma * (0 - 0) / sqrt(var + eps) + 0 == 0` whatever gamma and variance;
    for a depthwise convolution, its bias.
    """
    keep = (~channels).astype("float32")
    # Called after every batch of the hard epochs: stay on the device.
    for variable in variables:
        variable.assign(keras.ops.multiply(variable, keep))


def strip_pruning(model: keras.Model) -> keras.Model:
    """Returns a plain model (no wrappers, same shapes) with the masks applied.

    Pruned filters (mask 0) get zero kernels and biases. A zeroed filter
    followed by BatchNormalization would still emit the constant
    `beta - gamma * mean / sqrt(var + eps)` (the "BN shift" that makes naive
    rebuilds disagree with the pruned network). keras-sfp removes it: where a
    BatchNormalization channel only receives pruned channels, its moving mean
    and beta are set to zero (likewise a following depthwise convolution's
    bias), so the channel is exactly zero everywhere downstream and `shrink`
    can remove it without changing any output. With
    `SoftFilterPrune(hard_epochs=...)` the network is trained with these
    channels already at zero, so stripping costs no accuracy.

    Args:
        model: A model prepared by `prune_filters`. Not modified.

    Returns:
        A new model of the same kind without `FilterPruning` wrappers.

    Raises:
        ValueError: If `model` is not a Sequential or functional model.

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3)(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> pruned = prune_filters(keras.Model(inputs, keras.layers.Dense(2)(x)))
    >>> any(isinstance(l, FilterPruning) for l in strip_pruning(pruned).layers)
    False
    """
    _keras_graph.check_graph_model(model)
    dead = dead_offset_channels(model)

    def clone(layer):
        if isinstance(layer, FilterPruning):
            layer = layer.layer
        return _keras_graph.layer_from_config(layer)

    stripped = keras.models.clone_model(model, clone_function=clone)
    _copy_weights(
        model,
        stripped,
        transform=lambda src: (
            masked_weights(src) if isinstance(src, FilterPruning) else src.get_weights()
        ),
    )
    for name, (offsets, channels) in dead.items():
        zero_offsets(offsets(stripped.get_layer(name)), channels)
    return stripped
