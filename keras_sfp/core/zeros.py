"""Which channels are zero: masked or all-zero filters, and what they feed.

`strip_pruning` and the hard state need the channels that the masks make
zero in the deployed network, including those of BatchNormalization layers
fed only by pruned filters (whose offsets would otherwise emit constants).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_sfp.core.wrapper import FilterPruning, output_kernel, unwrap
from keras_sfp.graph.channels import ChannelGraph


def producer_zero(layer) -> np.ndarray:
    """Output channels of a producer that are zero: masked or all-zero."""
    if isinstance(layer, FilterPruning):
        return layer.mask == 0
    return filters_are_zero(layer)


def dead_offset_channels(model, graph: ChannelGraph | None = None) -> dict:
    """Channels of offset layers (BatchNormalization, depthwise bias) fed zeros.

    Returns:
        `{layer name: (offsets, bool array)}` for every channelwise layer of
        `model` with offsets that receives at least one channel that the
        masks (or all-zero filters) make zero; `offsets(layer)` lists the
        layer's offset variables. Names are those of the unwrapped layers.
    """
    graph = graph or ChannelGraph(model)

    zeros = graph.tensor_zeros(producer_zero, zeroed_offsets=True)
    result = {}
    for node in graph.offset_nodes():
        entering = zeros.get(id(node.inputs[0]))
        if entering is not None and entering.any():
            name = unwrap(node.layer).name
            result[name] = (graph.rules[id(node)].offsets, entering)
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
    for variable in variables:
        variable.assign(keras.ops.convert_to_numpy(variable) * keep)
