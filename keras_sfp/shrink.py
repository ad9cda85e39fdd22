"""Physically remove pruned channels: a smaller model that computes the same.

Which channels go is decided by the channel graph (`keras_sfp.graph`); how a
layer loses channels is decided by one small handler per layer type, looked up
in `LAYER_HANDLERS` (the split Torch-Pruning makes between dependency groups
and per-layer pruning functions).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_sfp import _keras_graph
from keras_sfp import prune as prune_lib
from keras_sfp.graph import ChannelGraph

L = keras.layers


def _conv2d(layer, config, weights, keep_in, keep_out):
    config["filters"] = len(keep_out)
    kernel = weights[0][:, :, keep_in, :][..., keep_out]
    return config, [kernel] + [b[keep_out] for b in weights[1:]]


def _depthwise(layer, config, weights, keep_in, keep_out):
    kernel = weights[0][:, :, keep_in, :]
    return config, [kernel] + [b[keep_in] for b in weights[1:]]


def _per_channel(layer, config, weights, keep_in, keep_out):
    return config, [w[keep_in] for w in weights]


def _dense(layer, config, weights, keep_in, keep_out):
    return config, [weights[0][keep_in, :]] + weights[1:]


# layer type -> fn(layer, config, weights, keep_in, keep_out) -> (config, weights)
LAYER_HANDLERS = {
    L.Conv2D: _conv2d,
    L.DepthwiseConv2D: _depthwise,
    L.BatchNormalization: _per_channel,
    L.Dense: _dense,
}


def _index(graph: ChannelGraph, tensor, keep: dict) -> np.ndarray | None:
    """Indices kept along the last axis of `tensor` (None: keep all)."""
    info = graph.tensors.get(id(tensor))
    if info is None:
        return None
    parts, offset = [], 0
    for set_id, n in info.segments:
        parts.append(keep[graph.find(set_id)] + offset)
        offset += n
    channels = np.concatenate(parts)
    if info.spatial is None:
        return channels
    positions = np.arange(info.spatial)[:, None] * info.length
    return (positions + channels[None, :]).reshape(-1)


def kept_channels(model: keras.Model, graph: ChannelGraph | None = None) -> dict:
    """`{root set id: kept indices}` for a plain (stripped) model."""
    graph = graph or ChannelGraph(model)
    zero = graph.zero_channels(prune_lib.filters_are_zero)
    keep = {}
    for group in graph.groups():
        root = graph.find(group.sets[0].id)
        removable = zero.get(root)
        if not group.prunable or removable is None or removable.all():
            keep[root] = np.arange(group.length)
        else:
            keep[root] = np.flatnonzero(~removable)
    return keep


def shrink(model: keras.Model) -> keras.Model:
    """Returns a plain functional model with the pruned channels removed.

    Every layer that produces or consumes a removed channel loses it: Conv2D
    filters and input channels, biases, BatchNormalization parameters and
    moving statistics, depthwise filters, Dense input rows after global pooling
    or `Flatten`. A channel is removed only where it is exactly zero in every
    tensor of its channel group, so the result computes what `strip_pruning`
    computes (up to float rounding). With `coupling="layer"`, a residual
    channel pruned in some branches but not all cannot be removed; a warning
    says how many such channels were kept.

    Args:
        model: A model prepared by `prune_filters` (its masks are used), or a
            plain model such as the result of `strip_pruning`. Not modified.

    Returns:
        A new functional `keras.Model` with the same inputs and outputs.

    Raises:
        ValueError: If `model` is not a built Sequential or functional model.

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3)(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> pruned = prune_filters(keras.Model(inputs, keras.layers.Dense(2)(x)))
    >>> callback = SoftFilterPrune()
    >>> callback.set_model(pruned)
    >>> callback.prune(0)["sfp_pruned"]  # floor(8 * 0.3) filters
    2
    >>> shrink(pruned).layers[1].filters
    6
    """
    _keras_graph.check_graph_model(model)
    wrapped = prune_lib.wrappers(model)
    plain = prune_lib.strip_pruning(model) if wrapped else model
    graph = ChannelGraph(plain)
    keep = kept_channels(plain, graph)
    _warn_unremoved(model, graph, keep)

    tensor_map = {}
    new_inputs = []
    for tensor in plain.inputs:
        new = keras.Input(
            batch_shape=tensor.shape, dtype=tensor.dtype, name=tensor.name
        )
        tensor_map[id(tensor)] = new
        new_inputs.append(new)
    rebuilt = {}
    for node in graph.nodes:
        if node.is_input:
            continue
        layer = node.layer
        if id(layer) not in rebuilt:
            rebuilt[id(layer)] = _rebuild_layer(graph, node, keep)
        args, kwargs = _keras_graph.fill_in(node, tensor_map)
        outputs = rebuilt[id(layer)](*args, **kwargs)
        for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
            tensor_map[id(old)] = new
    new_outputs = [tensor_map[id(t)] for t in plain.outputs]
    return keras.Model(
        new_inputs if len(new_inputs) > 1 else new_inputs[0],
        new_outputs if len(new_outputs) > 1 else new_outputs[0],
        name=f"{model.name}_shrunk",
    )


def _rebuild_layer(graph: ChannelGraph, node, keep):
    """A new layer for `node` with its removed channels sliced away."""
    layer = node.layer
    if not isinstance(layer, L.Layer):
        return layer  # a stateless operation (a keras.ops call): reuse it
    config = layer.get_config()
    weights = layer.get_weights()
    handler = LAYER_HANDLERS.get(type(layer))
    kind = graph.kinds[id(node)]
    if handler is not None and kind in ("producer", "pass", "consumer"):
        keep_in = _index(graph, node.inputs[0], keep)
        keep_out = _index(graph, node.outputs[0], keep)
        if keep_in is None:
            keep_in = np.arange(node.inputs[0].shape[-1])
        if keep_out is None:
            keep_out = np.arange(node.outputs[0].shape[-1])
        config, weights = handler(layer, config, weights, keep_in, keep_out)
    new = layer.__class__.from_config(config)
    return _WeightsOnBuild(new, weights)


class _WeightsOnBuild:
    """Calls a new layer, then sets its weights once it has been built."""

    def __init__(self, layer, weights):
        self.layer = layer
        self.weights = weights
        self.loaded = False

    def __call__(self, *args, **kwargs):
        outputs = self.layer(*args, **kwargs)
        if not self.loaded:
            self.layer.set_weights(self.weights)
            self.loaded = True
        return outputs


def _warn_unremoved(model, graph, keep) -> None:
    """Warns about pruned filters whose channels had to be kept."""
    kept_zero = 0
    for group in graph.groups():
        root = graph.find(group.sets[0].id)
        kept = np.zeros(group.length, dtype=bool)
        kept[keep[root]] = True
        for producer in group.producers:
            if isinstance(producer, L.Conv2D):
                kept_zero += int(np.sum(prune_lib.filters_are_zero(producer) & kept))
    if kept_zero:
        warnings.warn(
            f"shrink kept {kept_zero} all-zero (pruned or dead) filters of model "
            f"{model.name!r}: their channels are not zero in every tensor of "
            "their channel group (a residual sum with unpruned branches, as "
            'with coupling="layer", or a following layer that does not map '
            "zero to zero). The shrunk model is exact but larger than the "
            "masks suggest.",
            stacklevel=2,
        )
