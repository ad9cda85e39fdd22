"""Multiply-accumulate counting, as the SFP paper counts FLOPs."""

from __future__ import annotations

import keras
import numpy as np

from keras_sfp.core.wrapper import unwrap
from keras_sfp.graph import keras_graph as _keras_graph

L = keras.layers


def _spatial(tensor) -> int:
    return int(np.prod(tensor.shape[1:-1]))


def mac_terms(layer, node) -> list[tuple[float, bool, bool]]:
    """The multiply-accumulates of one call as terms `coef * C_in^a * C_out^b`.

    `C_in` is the channel count of the call's input, `C_out` of its output;
    each term is `(coef, a, b)` with `a`, `b` booleans. Counting MACs from
    these terms with the tensors' channel counts gives `count_flops`; with
    the channel counts a pruning would leave, it gives the pruned model's
    MACs (`keras_sfp.allocation.counts`). Layers that are not counted give `[]`.
    """
    layer = unwrap(layer)
    if isinstance(layer, L.Dense):
        return [(float(np.prod(node.inputs[0].shape[1:-1])), True, True)]
    if not isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D)):
        return []
    kh, kw = layer.kernel_size
    window = float(_spatial(node.outputs[0]) * kh * kw)
    if isinstance(layer, L.SeparableConv2D):
        dm = layer.depth_multiplier
        return [(window * dm, True, False), (window / (kh * kw) * dm, True, True)]
    if isinstance(layer, L.DepthwiseConv2D):
        return [(window * layer.depth_multiplier, True, False)]
    cin = node.inputs[0].shape[-1]
    if 1 < layer.groups == cin == layer.filters:
        # The depthwise form: one channel per group, so `shrink` keeps
        # `groups` equal to the kept channels and the cost is linear in them.
        return [(window, True, False)]
    return [(window / layer.groups, True, True)]


def node_macs(layer, node) -> int:
    """Multiply-accumulates of one call of `layer` (nested models counted)."""
    inner = unwrap(layer)
    if isinstance(inner, keras.Model) and _keras_graph.is_graph_model(inner):
        return count_flops(inner)
    terms = mac_terms(layer, node)
    if not terms:
        return 0
    cin, cout = node.inputs[0].shape[-1], node.outputs[0].shape[-1]
    return round(sum(c * (cin if a else 1) * (cout if b else 1) for c, a, b in terms))


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
        total += node_macs(node.layer, node)
    return int(total)
