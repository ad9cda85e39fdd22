"""Multiply-accumulate counting, as the SFP paper counts FLOPs."""

from __future__ import annotations

import keras
import numpy as np

from keras_sfp import _keras_graph
from keras_sfp.wrapper import unwrap

L = keras.layers


def _spatial(tensor) -> int:
    return int(np.prod(tensor.shape[1:-1]))


def _conv_macs(layer, node) -> int:
    kh, kw = layer.kernel_size
    cin = node.inputs[0].shape[-1]
    return _spatial(node.outputs[0]) * kh * kw * (cin // layer.groups) * layer.filters


def _macs(layer, node) -> int:
    layer = unwrap(layer)
    if isinstance(layer, L.SeparableConv2D):
        kh, kw = layer.kernel_size
        cin = node.inputs[0].shape[-1]
        out = _spatial(node.outputs[0])
        depthwise = out * kh * kw * cin * layer.depth_multiplier
        return depthwise + out * cin * layer.depth_multiplier * layer.filters
    if isinstance(layer, L.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        cin = node.inputs[0].shape[-1]
        return _spatial(node.outputs[0]) * kh * kw * cin * layer.depth_multiplier
    if isinstance(layer, L.Conv2D):
        return _conv_macs(layer, node)
    if isinstance(layer, L.Dense):
        rows = int(np.prod(node.inputs[0].shape[1:-1]))
        return rows * node.inputs[0].shape[-1] * layer.units
    if isinstance(layer, keras.Model) and _keras_graph.is_graph_model(layer):
        return count_flops(layer)
    return 0


def count_flops(model: keras.Model) -> int:
    """Multiply-accumulates of one example through `model`.

    Counts what the Soft Filter Pruning paper counts (He et al., IJCAI 2018):
    `Conv2D` (`H_out * W_out * kh * kw * C_in / groups * C_out`),
    `DepthwiseConv2D`, `SeparableConv2D` and `Dense` layers; nested models are
    counted through. Biases, normalization and activations are not counted.

    Args:
        model: A built Sequential or functional model, wrapped or not.

    Returns:
        The number of multiply-accumulates, an `int`.

    Raises:
        ValueError: If `model` is not a built Sequential or functional model,
            or its spatial input size is not fixed.

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    >>> count_flops(keras.Model(inputs, x))  # 8 * 8 * 3 * 3 * 3 * 4
    6912
    """
    _keras_graph.check_graph_model(model)
    total = 0
    for node in _keras_graph.nodes(model):
        if node.is_input:
            continue
        for tensor in node.inputs + node.outputs:
            if None in tensor.shape[1:]:
                raise ValueError(
                    "`model` must have fixed input dimensions to count "
                    f"multiply-accumulates. Received: tensor {tensor.name!r} "
                    f"of shape {tensor.shape} in layer {node.name!r}"
                )
        total += _macs(node.layer, node)
    return int(total)
