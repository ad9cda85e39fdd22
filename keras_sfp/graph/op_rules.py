"""How `keras.ops` calls act on channels (the layers' rules are in `rules`).

Element-wise operations are channelwise with one tensor argument and merges
with two; `keras.ops.concatenate` joins channels; `keras.ops.split`,
`x[..., a:b]` and `keras.ops.slice` along the channel axis hand each output
a range of the input's channels (kind `"split"`, with a `resize` that
re-cuts the split for the kept channels); `keras.ops.pad` of the spatial
axes and reductions over them (`keras.ops.mean(x, axis=(1, 2))`) are
channelwise, and a non-zero constant is recorded as the rule's
`border` so that the graph can check what the next layer makes of it.
Anything else is a boundary.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_sfp.graph.layer_rule import (
    LayerRule,
    all_zero,
    any_zero,
    boundary,
    last_axis,
    same,
)

# keras.ops operations that act element by element. With one tensor argument
# (the others constants) they are channelwise; with two, merges.
_ELEMENTWISE_OPS = {
    "Add": all_zero,
    "Subtract": all_zero,
    "Maximum": all_zero,
    "Minimum": all_zero,
    "Multiply": any_zero,
    # x / y: x / constant is channelwise; dividing by a tensor that may be
    # zero where x is (0 / 0) is not something to look through.
    "Divide": None,
    "TrueDivide": None,
    **dict.fromkeys(
        (
            "ConvertToTensor Negative Absolute Abs Square Sqrt Exp Expm1 Log1p "
            "Power Clip Tanh Sin Sinh Arcsinh Arctan Sign Floor Ceil Round Cast "
            "Relu Relu6 "
            "Sigmoid SparseSigmoid Softplus Softsign SoftShrink SparsePlus Silu "
            "Squareplus LogSigmoid LeakyRelu HardSigmoid HardSilu Elu Selu "
            "Gelu Celu TanhShrink HardTanh HardShrink Threshold Erf "
            # keras.activations.relu (any arguments) records an operation
            # of its own
            "ReLU "
            "Cos Cosh Tan Arcsin Arccos Arctanh Arccosh Log Log2 Log10 Exp2 "
            "Reciprocal Rsqrt Cbrt Trunc Erfinv NanToNum"
        ).split()
    ),
}


def rule_for_op(node) -> LayerRule:
    """The rule for a `keras.ops` call (an `Operation` that is not a layer)."""
    cls = type(node.operation).__name__
    name = f"{node.name} (keras.ops {cls})"
    special = _SPECIAL_OPS.get(cls)
    if special is not None:
        return special(node, name)
    if cls not in _ELEMENTWISE_OPS:
        return boundary(f"{name} is not understood by the channel graph")
    for constant in node.constants:
        if np.size(constant) > 1:
            return boundary(f"{name}: a constant with per-channel values")
    if len(node.inputs) == 1:
        return LayerRule("channelwise")
    if len(node.inputs) == 2 and _ELEMENTWISE_OPS[cls] is not None:
        return LayerRule("merge", zero=_ELEMENTWISE_OPS[cls])
    return boundary(f"{name}: {len(node.inputs)} tensor arguments")


def _reduce_op(node, name) -> LayerRule:
    """A reduction over axes other than the batch's and the channels'.

    `keras.ops.mean(x, axis=(1, 2), keepdims=True)` (a squeeze-and-excitation
    gate written with ops) keeps each channel apart, like global pooling.
    Whether a zero channel stays zero is measured (`Max`'s `initial`).
    """
    rank, axis = _rank(node), node.operation.axis
    if axis is None:
        return boundary(f"{name}: reduces every axis")
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    axes = {int(a) % rank for a in axes}
    if not axes or 0 in axes or rank - 1 in axes:
        return boundary(f"{name}: reduces the batch or the channel axis")
    return LayerRule("channelwise")


def _rank(node) -> int:
    return len(node.inputs[0].shape)


def _concatenate_op(node, name) -> LayerRule:
    if not last_axis(node.operation.axis, len(node.outputs[0].shape)):
        return boundary(f"{name}: concatenates along another axis")
    return LayerRule("concat")


def _split_rule(node, name, ranges, resize) -> LayerRule:
    """A channel slice: channelwise if it keeps every channel, else a split."""
    channels = node.inputs[0].shape[-1]
    if channels is None:
        return boundary(f"{name}: unknown number of channels")
    if ranges == [(0, channels)]:  # spatial slicing only: still re-cut
        return LayerRule("channelwise", zero=same, ranges=ranges, resize=resize)
    return LayerRule("split", ranges=ranges, resize=resize)


def _split_op(node, name) -> LayerRule:
    op, rank = node.operation, _rank(node)
    if not last_axis(op.axis, rank):
        return boundary(f"{name}: splits along another axis")
    channels = node.inputs[0].shape[-1]
    sections = op.indices_or_sections
    if isinstance(sections, int):
        cuts = [channels * k // sections for k in range(1, sections)]
    else:
        cuts = [int(c) for c in sections]
    edges = [0, *cuts, channels]
    ranges = list(zip(edges[:-1], edges[1:]))

    def resize(new_ranges):
        indices = [start for start, _ in new_ranges[1:]]
        return lambda x, *args, **kwargs: keras.ops.split(x, indices, axis=-1)

    return _split_rule(node, name, ranges, resize)


def _channel_key(key, rank):
    """`key` as one entry per axis, or None unless it is slices (and `...`)."""
    key = list(key) if isinstance(key, (tuple, list)) else [key]
    if sum(k is Ellipsis for k in key) > 1:
        return None
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key[at : at + 1] = [slice(None)] * (rank - len(key) + 1)
    key += [slice(None)] * (rank - len(key))
    if len(key) != rank or not all(isinstance(k, slice) for k in key):
        return None
    return key


def _getitem_op(node, name) -> LayerRule:
    args = node.node.arguments.args
    rank, channels = _rank(node), node.inputs[0].shape[-1]
    key = _channel_key(args[1], rank) if len(args) == 2 else None
    if key is None or key[0] != slice(None) or channels is None:
        return boundary(f"{name}: indexing other than slices of the batch")
    start, stop, step = key[-1].indices(channels)
    if step != 1:
        return boundary(f"{name}: a strided slice of channels")

    def resize(new_ranges):
        ((new_start, new_stop),) = new_ranges
        new_key = tuple(key[:-1]) + (slice(new_start, new_stop),)
        return lambda x, *args, **kwargs: x[new_key]

    return _split_rule(node, name, [(start, stop)], resize)


def _slice_op(node, name) -> LayerRule:
    args = node.node.arguments.args
    starts = args[1] if len(args) == 2 else None
    shape = node.operation.shape
    if isinstance(starts, keras.KerasTensor) or starts is None:
        return boundary(f"{name}: slice start given as a tensor")
    starts = [int(s) for s in starts]
    if shape[-1] is None or shape[-1] < 0:
        return boundary(f"{name}: slice size not fixed")
    if starts[0] != 0 or shape[0] not in (-1, None, node.inputs[0].shape[0]):
        return boundary(f"{name}: slices the batch")

    def resize(new_ranges):
        ((new_start, new_stop),) = new_ranges
        new_starts = [*starts[:-1], new_start]
        new_shape = [*shape[:-1], new_stop - new_start]
        return lambda x, *args, **kwargs: keras.ops.slice(x, new_starts, new_shape)

    return _split_rule(node, name, [(starts[-1], starts[-1] + int(shape[-1]))], resize)


def _pad_op(node, name) -> LayerRule:
    op, rank = node.operation, _rank(node)
    widths = list(op.pad_width)
    widths = widths * rank if len(widths) == 1 else widths
    if len(widths) != rank or tuple(widths[-1]) != (0, 0):
        return boundary(f"{name}: pads the channel axis")
    if tuple(widths[0]) != (0, 0):
        return boundary(f"{name}: pads the batch axis")
    args, kwargs = node.node.arguments.args, node.node.arguments.kwargs
    value = args[1] if len(args) > 1 else kwargs.get("constant_values")
    if isinstance(value, keras.KerasTensor) or np.size(value) > 1:
        return boundary(f"{name}: padding value given per channel or as a tensor")
    if op.mode != "constant" or value is None or float(value) == 0.0:
        return LayerRule("channelwise", zero=same)  # zeros pad (or reflect) to 0
    return LayerRule("channelwise", zero=_nothing_zero, border=float(value))


def _nothing_zero(layer, zero_in, zeroed_offsets):
    return np.zeros_like(zero_in)


_SPECIAL_OPS = {
    "Concatenate": _concatenate_op,
    "Split": _split_op,
    "GetItem": _getitem_op,
    "Slice": _slice_op,
    "Pad": _pad_op,
    **dict.fromkeys("Mean Sum Max Min Amax Amin Var Std Prod".split(), _reduce_op),
}
