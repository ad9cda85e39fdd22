"""BatchNormalization folded into the convolution before it, for inference.

In inference a BatchNormalization after a linear layer is an affine map per
channel, `y = x * s + t` with `s = gamma / sqrt(moving_variance + epsilon)`
and `t = beta - moving_mean * s`, so the layer's kernel can absorb `s` and its
bias `t`. The folded model computes the same (up to float rounding) with one
layer fewer per pair: TFLite's converter does this itself, but Keras on a CPU
runs every BatchNormalization as separate small kernels whose fixed cost does
not fall when `shrink` removes channels (docs/benchmarks.md, "Latency").

Folding is for deployment: the folded model has no BatchNormalization left to
train.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_sfp.core import prune as prune_lib
from keras_sfp.graph import keras_graph as _keras_graph

L = keras.layers
_FOLDABLE = (L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D, L.Dense)


def _is_linear(layer) -> bool:
    activation = getattr(layer, "activation", None)
    return activation is None or activation is keras.activations.linear


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _bn_last_axis(bn, rank: int) -> bool:
    axis = bn.axis if isinstance(bn.axis, int) else None
    return axis is not None and axis in (-1, rank - 1)


def _training_flag(node):
    """The `training` argument a call fixes (None if it does not)."""
    arguments = node.node.arguments
    if "training" in arguments.kwargs:
        return arguments.kwargs["training"]
    return arguments.args[1] if len(arguments.args) > 1 else None


def _pairs(graph_nodes, outputs) -> dict:
    """`{id(linear node): BatchNormalization node}` for every foldable pair."""
    calls, consumers, producer = {}, {}, {}
    for node in graph_nodes:
        if node.is_input:
            continue
        for tensor in node.inputs:  # aliases (inlined models' edges) count
            consumers.setdefault(id(tensor), []).append(node)
        if not node.is_alias:
            calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
            producer.update((id(t), node) for t in node.outputs)
    output_ids = {id(t) for t in outputs}
    pairs = {}
    for node in graph_nodes:
        if node.is_input or node.is_alias:
            continue
        bn = node.operation
        if type(bn) is not L.BatchNormalization or calls[id(bn)] != 1:
            continue
        if _training_flag(node) is True:  # batch statistics: not an affine map
            continue
        source = producer.get(id(node.inputs[0]))
        if source is None:
            continue
        layer = source.operation
        if (
            type(layer) not in _FOLDABLE
            or calls[id(layer)] != 1
            or not _is_linear(layer)
            or not _channels_last(layer)
            or not _bn_last_axis(bn, len(node.inputs[0].shape))
            or len(consumers.get(id(source.outputs[0]), [])) != 1
            or id(source.outputs[0]) in output_ids
        ):
            continue
        pairs[id(source)] = node
    return pairs


def _scale_shift(bn) -> tuple[np.ndarray, np.ndarray]:
    mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
    variance = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
    gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else 1.0
    beta = keras.ops.convert_to_numpy(bn.beta) if bn.center else 0.0
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return scale, beta - mean * scale


def _folded_layer(node, bn_node):
    """A copy of the linear layer with the BatchNormalization in its weights."""
    layer = node.operation
    scale, shift = _scale_shift(bn_node.operation)
    config = _keras_graph.config_of(node)
    config["use_bias"] = True
    weights = [w.astype(np.float64) for w in layer.get_weights()]
    if isinstance(layer, L.SeparableConv2D):
        depthwise, pointwise = weights[0], weights[1] * scale
        bias = weights[2] if layer.use_bias else 0.0
        new_weights = [depthwise, pointwise, bias * scale + shift]
    elif isinstance(layer, L.DepthwiseConv2D):
        kh, kw, cin, multiplier = weights[0].shape
        kernel = weights[0] * scale.reshape(cin, multiplier)
        bias = weights[1] if layer.use_bias else 0.0
        new_weights = [kernel, bias * scale + shift]
    else:  # Conv2D (plain or grouped) and Dense: the last axis is the output
        bias = weights[1] if layer.use_bias else 0.0
        new_weights = [weights[0] * scale, bias * scale + shift]
    dtype = layer.get_weights()[0].dtype
    new = _keras_graph.layer_from_config(layer, config)
    return _keras_graph.WeightsOnBuild(new, [w.astype(dtype) for w in new_weights])


def _wrapped(model) -> bool:
    return bool(prune_lib.wrappers(model)) or any(
        type(layer).__name__ == "ChannelMask" for layer in model.layers
    )


def can_fold(model: keras.Model) -> bool:
    """Whether `fold_batch_norm(model)` has something to fold.

    False for a model with pruning wrappers, and for a subclass of the
    functional `keras.Model` (a rebuilt graph would lose its own `call`).
    """
    if not type(model).__module__.startswith("keras.") or _wrapped(model):
        return False
    return bool(_pairs(_keras_graph.nodes(model), model.outputs))


def _identity(*args, **kwargs):
    return args[0]


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """Returns an inference copy of `model` with BatchNormalization folded.

    Every BatchNormalization (on the channel axis, called once) whose input
    is the only use of a linear `Conv2D`, `DepthwiseConv2D`,
    `SeparableConv2D` or `Dense` output (no activation, channels last,
    called once) is folded into that layer's kernel and bias and removed.
    Other BatchNormalization layers are kept.

    Args:
        model: A built Sequential or functional model without pruning
            wrappers (`shrink` or `strip_pruning` it first). Not modified.

    Returns:
        A new functional model computing the same in inference.

    Raises:
        ValueError: If `model` is not a built graph model, still has
            pruning wrappers, or has nothing to fold.

    Example:
    >>> inputs = keras.Input((6, 6, 3))
    >>> x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    >>> x = keras.layers.BatchNormalization()(x)
    >>> model = keras.Model(inputs, keras.layers.ReLU()(x))
    >>> [type(layer).__name__ for layer in fold_batch_norm(model).layers]
    ['InputLayer', 'Conv2D', 'ReLU']
    """
    _keras_graph.check_graph_model(model)
    if _wrapped(model):
        raise ValueError(
            "`model` still has pruning wrappers: fold the result of "
            "keras_sfp.shrink (or strip_pruning). "
            f"Received: model {model.name!r}"
        )
    graph_nodes = _keras_graph.nodes(model)
    pairs = _pairs(graph_nodes, model.outputs)
    if not pairs:
        raise ValueError(
            "`model` has no BatchNormalization to fold (none follows a linear "
            "convolution or dense layer whose output it alone uses). "
            f"Received: model {model.name!r}"
        )
    folded = {id(bn_node.operation) for bn_node in pairs.values()}

    def make(node):
        if id(node) in pairs:
            return _folded_layer(node, pairs[id(node)])
        if id(node.operation) in folded:
            return _identity
        return _keras_graph.clone_operation(node)

    return _keras_graph.rebuild(model, graph_nodes, make, name=f"{model.name}_folded")
