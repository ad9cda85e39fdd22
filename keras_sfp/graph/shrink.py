"""Physically remove pruned channels: a smaller model that computes the same.

Which channels go is decided by the channel graph (`keras_sfp.graph.channels`); how a
layer loses channels is decided by its rule's `slice_weights` (the split
Torch-Pruning makes between dependency groups and per-layer pruning
functions; see `keras_sfp.rules`).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_sfp.core import prune as prune_lib
from keras_sfp.core import zeros as zeros_lib
from keras_sfp.graph import keras_graph as _keras_graph
from keras_sfp.graph.channels import ChannelGraph


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
    zero = graph.removable_channels(zeros_lib.filters_are_zero)
    keep = {}
    for group in graph.groups():
        root = graph.find(group.sets[0].id)
        removable = zero.get(root)
        if not group.prunable or removable is None or removable.all():
            keep[root] = np.arange(group.length)
        else:
            keep[root] = np.flatnonzero(~_evenly(removable, group.blocks))
    return keep


def _evenly(removable: np.ndarray, blocks: int) -> np.ndarray:
    """The first removable channels of each block, as many in every block.

    A grouped convolution must keep the same number of channels per group.
    """
    if blocks == 1:
        return removable
    parts = removable.reshape(blocks, -1)
    count = int(parts.sum(axis=1).min())
    even = np.zeros_like(parts)
    for row, part in zip(even, parts):
        row[np.flatnonzero(part)[:count]] = True
    return even.reshape(-1)


def shrink(model: keras.Model) -> keras.Model:
    """Returns a plain functional model with the pruned channels removed.

    Every layer that produces or consumes a removed channel loses it: Conv2D,
    SeparableConv2D and Dense filters (units) and input channels, biases,
    BatchNormalization parameters and moving statistics, depthwise filters,
    per-channel scales, Dense input rows after global pooling or `Flatten`,
    the inputs of concatenations. A channel is removed only where it is
    exactly zero in every tensor of its channel group that a layer consumes,
    so the result computes what `strip_pruning` computes (up to float
    rounding). Nested models are inlined. With `coupling="layer"`, a residual
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
    >>> FilterPruner(pruned).prune(0)["sfp_pruned"]  # floor(8 * 0.3) filters
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

    return _keras_graph.rebuild(
        plain,
        graph.nodes,
        lambda node: _rebuild_layer(graph, node, keep),
        name=f"{model.name}_shrunk",
    )


def _rebuild_layer(graph: ChannelGraph, node, keep):
    """A new layer for `node` with its removed channels sliced away."""
    layer = node.layer
    rule = graph.rules[id(node)]
    if rule.resize is not None and graph.kinds[id(node)] in ("split", "channelwise"):
        # A slice names channel positions: cut at the kept ones.
        keep_in = _index(graph, node.inputs[0], keep)
        ranges = [
            tuple(int(np.searchsorted(keep_in, edge)) for edge in edges)
            for edges in rule.ranges
        ]
        return rule.resize(ranges)
    if not _keras_graph.is_layer(layer):
        return layer  # a stateless operation (a keras.ops call): reuse it
    config = _keras_graph.config_of(node)
    if config is None:  # cannot be copied; nothing to slice (`rules.rule_for`)
        return _keras_graph.shared(layer)
    weights = layer.get_weights()
    kind = graph.kinds[id(node)]
    if kind == "producer":
        keep_in = _index(graph, node.inputs[0], keep)
        keep_out = _index(graph, node.outputs[0], keep)
        if keep_in is None:
            keep_in = np.arange(node.inputs[0].shape[-1])
        if keep_out is None:
            keep_out = np.arange(node.outputs[0].shape[-1])
        config, weights = rule.slice_weights(layer, config, weights, keep_in, keep_out)
    elif kind == "channelwise" and rule.slice_weights is not None:
        keep_in = _index(graph, node.inputs[0], keep)
        if keep_in is not None and len(keep_in) < node.inputs[0].shape[-1]:
            config, weights = rule.slice_weights(layer, config, weights, keep_in)
    new = _keras_graph.layer_from_config(layer, config, node)
    return _keras_graph.WeightsOnBuild(new, weights)


def _warn_unremoved(model, graph, keep) -> None:
    """Warns about pruned filters whose channels had to be kept."""
    kept_zero = 0
    for group in graph.groups():
        root = graph.find(group.sets[0].id)
        kept = np.zeros(group.length, dtype=bool)
        kept[keep[root]] = True
        for producer, start, length in group.members:
            zero = zeros_lib.filters_are_zero(producer)[start : start + length]
            kept_zero += int(np.sum(zero & kept))
    if kept_zero:
        warnings.warn(
            f"shrink kept {kept_zero} all-zero (pruned or dead) filters of model "
            f"{model.name!r}: their channels are not zero in every tensor of "
            "their channel group (a residual sum with unpruned branches, as "
            'with coupling="layer", a following layer that does not map '
            "zero to zero, or a grouped convolution, which loses as many "
            "channels in every group). The shrunk model is exact but larger "
            "than the masks suggest.",
            stacklevel=2,
        )
