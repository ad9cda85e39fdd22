"""Multiply-accumulate counting, as the SFP paper counts FLOPs."""

from __future__ import annotations

import keras
import numpy as np

from keras_sfp.core.wrapper import unwrap
from keras_sfp.graph import keras_graph as _keras_graph

L = keras.layers


def _own_shape(tensor) -> tuple:
    return tuple(tensor.shape)


_CONVOLUTIONS = (L.Conv1D, L.Conv2D, L.Conv3D)
_TRANSPOSED = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)


def mac_terms(layer, node, shape_of=None) -> list[tuple[float, bool, bool]]:
    """The multiply-accumulates of one call as terms `coef * C_in^a * C_out^b`.

    `C_in` is the channel count of the call's input, `C_out` of its output;
    each term is `(coef, a, b)` with `a`, `b` booleans. Counting MACs from
    these terms with the tensors' channel counts gives `count_flops`; with
    the channel counts a pruning would leave, it gives the pruned model's
    MACs (`keras_sfp.allocation.counts`). Layers that are not counted give `[]`.
    `shape_of(tensor)` gives the tensors' shapes (default: their own; a
    `ChannelGraph`'s `shape_of` for a model of inputs of unknown size).
    """
    shape_of = shape_of or _own_shape
    layer = unwrap(layer)

    def spatial(tensor) -> float:
        return float(np.prod(shape_of(tensor)[1:-1]))

    if isinstance(layer, L.Dense):
        return [(spatial(node.inputs[0]), True, True)]
    if not isinstance(layer, _CONVOLUTIONS + _TRANSPOSED + _DEPTHWISE + _SEPARABLE):
        return []
    kernel = float(np.prod(layer.kernel_size))
    if isinstance(layer, _TRANSPOSED):
        # Every input position scatters a whole kernel into the output.
        return [(spatial(node.inputs[0]) * kernel, True, True)]
    window = spatial(node.outputs[0]) * kernel
    if isinstance(layer, _SEPARABLE):
        dm = layer.depth_multiplier
        return [(window * dm, True, False), (window / kernel * dm, True, True)]
    if isinstance(layer, _DEPTHWISE):
        return [(window * layer.depth_multiplier, True, False)]
    cin = node.inputs[0].shape[-1]
    if 1 < layer.groups == cin == layer.filters:
        # The depthwise form: one channel per group, so `shrink` keeps
        # `groups` equal to the kept channels and the cost is linear in them.
        return [(window, True, False)]
    return [(window / layer.groups, True, True)]


def node_macs(layer, node, shape_of=None) -> int:
    """Multiply-accumulates of one call of `layer` (nested models counted)."""
    shape_of = shape_of or _own_shape
    inner = unwrap(layer)
    if isinstance(inner, keras.Model) and _keras_graph.is_graph_model(inner):
        if not _keras_graph.has_unknown_sizes(inner):
            return count_flops(inner)
        return count_flops(inner, [shape_of(t)[1:] for t in node.inputs])
    terms = mac_terms(layer, node, shape_of)
    if not terms:
        return 0
    cin, cout = node.inputs[0].shape[-1], node.outputs[0].shape[-1]
    return round(sum(c * (cin if a else 1) * (cout if b else 1) for c, a, b in terms))


def count_flops(model: keras.Model, input_shape=None) -> int:
    """Multiply-accumulates of one example through `model`.

    Counts what the Soft Filter Pruning paper counts (He et al., IJCAI 2018):
    convolutions (`Conv2D`: `H_out * W_out * kh * kw * C_in / groups *
    C_out`; `Conv1D` and `Conv3D` alike), transposed convolutions (`H_in *
    W_in * kh * kw * C_in * C_out`: each input position scatters a kernel),
    depthwise and separable convolutions (1D and 2D) and `Dense` layers;
    nested models are counted through. Biases, normalization and
    activations are not counted.

    Args:
        model: A built Sequential or functional model, wrapped or not.
        input_shape: The input size to count at, batch excluded (one shape
            per input for several), for a model whose inputs' size is
            unknown (`keras.Input((None, None, 3))`). Defaults to None: the
            model's own input shape.

    Returns:
        The number of multiply-accumulates, an `int`.

    Raises:
        ValueError: If `model` is not a built Sequential or functional model,
            or its input size is unknown and `input_shape` not given, or
            `input_shape` does not match its inputs.

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    >>> count_flops(keras.Model(inputs, x))  # 8 * 8 * 3 * 3 * 3 * 4
    6912
    """
    _keras_graph.check_graph_model(model)
    graph_nodes = _keras_graph.nodes(model)
    shapes = _keras_graph.check_input_shape(model, input_shape)
    if shapes is not None:
        shapes = _keras_graph.reference_shapes(model, graph_nodes, shapes)

    def shape_of(tensor) -> tuple:
        shape = tuple(tensor.shape)
        return shape if shapes is None else shapes.get(id(tensor), shape)

    total = 0
    for node in graph_nodes:
        if node.is_input:
            continue
        for tensor in node.inputs + node.outputs:
            if None in shape_of(tensor)[1:]:
                raise ValueError(
                    "`model` must have fixed input dimensions to count "
                    "multiply-accumulates, or `input_shape` must give them. "
                    f"Received: input_shape={input_shape!r}; tensor "
                    f"{tensor.name!r} of shape {tensor.shape} in layer "
                    f"{node.name!r}"
                )
        total += node_macs(node.layer, node, shape_of)
    return int(total)
