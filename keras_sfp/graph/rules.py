"""How each layer acts on channels: the rules behind the graph and `shrink`.

Why one module of over 400 lines: it is the table of every Keras layer
type's channel behaviour, and a layer's zero propagation and weight slicing
are read together (`op_rules` has the `keras.ops` calls, `layer_rule` the
shared base).

A layer (or `keras.ops` call) is one of four kinds:

- *producer*: creates new channels that can be pruned (`Conv2D`, the
  pointwise half of `SeparableConv2D`, `Dense`) and consumes its input's
  channels by mixing them;
- *channelwise*: acts on each channel on its own (normalization, depthwise
  convolution, pooling, padding, activations, per-channel scales), so a
  channel removed before it is removed after it;
- *merge*: combines tensors element by element (`Add`, `Multiply`, `x + y`),
  so their channels must be pruned with the same indices;
- *boundary*: anything else; channels crossing it are never pruned.

The channel graph also knows `Concatenate` ("concat"), `Flatten`
("flatten") and channel slices ("split", `keras_sfp.graph.op_rules`). Grouped
convolutions are producers pruned evenly per group. Custom layers are
traced and inlined before any rule applies (`keras_sfp.graph.keras_graph`).

A rule also says how a zero channel propagates (does the layer map 0 to 0?)
and how to slice the layer's weights when channels are removed. Users add
rules for their own layer types with `register_layer`, the extension point
that tfmot's `PrunableLayer` is for magnitude pruning.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_sfp.core.wrapper import unwrap
from keras_sfp.graph import keras_graph as _keras_graph
from keras_sfp.graph import layer_rule, op_rules
from keras_sfp.graph.layer_rule import (  # noqa: F401  (this module's API too)
    KINDS,
    LayerRule,
    all_zero,
    any_zero,
    boundary,
    is_registered,
    last_axis,
    register_layer,
    same,
    slice_last_axis,
    unregister_layer,
)

L = keras.layers


# -- zero propagation -------------------------------------------------------
def batch_norm_at_zero(layer) -> np.ndarray:
    """The inference output of a BatchNormalization layer for a zero input."""
    mean = keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float64)
    var = keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
    gamma = keras.ops.convert_to_numpy(layer.gamma) if layer.scale else 1.0
    beta = keras.ops.convert_to_numpy(layer.beta) if layer.center else 0.0
    return beta - gamma * mean / np.sqrt(var + layer.epsilon)


def _batch_norm_zero(layer, zero_in, zeroed_offsets):
    if zeroed_offsets:
        return zero_in
    return zero_in & (batch_norm_at_zero(layer) == 0)


def _depthwise_zero(layer, zero_in, zeroed_offsets):
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    channels = kernel.shape[2] * kernel.shape[3]  # (kh, kw, C, 1) or (kh, kw, 1, C)
    filter_zero = np.all(kernel.reshape(-1, channels) == 0, axis=0)
    if zeroed_offsets or not layer.use_bias:
        return zero_in | (filter_zero & _bias_zero(layer))
    return (zero_in | filter_zero) & _bias_zero(layer)


def _bias_zero(layer):
    if not layer.use_bias:
        return True
    return keras.ops.convert_to_numpy(layer.bias) == 0


def _rescaling_zero(layer, zero_in, zeroed_offsets):
    offset = np.asarray(layer.offset, dtype=np.float64)
    return zero_in & (offset == 0)


def _bias_offsets(layer):
    return [layer.bias] if layer.use_bias else []


def _batch_norm_offsets(layer):
    return [layer.moving_mean] + ([layer.beta] if layer.center else [])


# -- weight slicing -----------------------------------------------------------
def _slice_conv2d(layer, config, weights, keep_in, keep_out):
    config["filters"] = len(keep_out)
    kernel = weights[0][:, :, keep_in, :][..., keep_out]
    return config, [kernel] + [b[keep_out] for b in weights[1:]]


def _per_block(indices, length: int, blocks: int) -> list:
    """`indices` (sorted) split by block of `length // blocks`, made local."""
    size = length // blocks
    return [
        indices[(indices >= b * size) & (indices < (b + 1) * size)] - b * size
        for b in range(blocks)
    ]


def _slice_grouped_conv(layer, config, weights, keep_in, keep_out):
    """A grouped Conv2D keeping the same number of channels in every group."""
    groups, kernel = layer.groups, weights[0]
    ins = _per_block(keep_in, kernel.shape[2] * groups, groups)
    outs = _per_block(keep_out, kernel.shape[3], groups)
    if len({len(i) for i in ins}) > 1 or len({len(o) for o in outs}) > 1:
        raise RuntimeError(
            f"{layer.name}: uneven channels per group "
            f"(in {[len(i) for i in ins]}, out {[len(o) for o in outs]})"
        )
    size = kernel.shape[3] // groups
    columns = [
        kernel[:, :, local_in, :][..., local_out + b * size]
        for b, (local_in, local_out) in enumerate(zip(ins, outs))
    ]
    config["filters"] = len(keep_out)
    return config, [np.concatenate(columns, axis=-1)] + [
        b[keep_out] for b in weights[1:]
    ]


def _slice_separable(layer, config, weights, keep_in, keep_out):
    multiplier = layer.depth_multiplier
    rows = (keep_in[:, None] * multiplier + np.arange(multiplier)).reshape(-1)
    config["filters"] = len(keep_out)
    depthwise = weights[0][:, :, keep_in, :]
    pointwise = weights[1][:, :, rows, :][..., keep_out]
    return config, [depthwise, pointwise] + [b[keep_out] for b in weights[2:]]


def _slice_dense(layer, config, weights, keep_in, keep_out):
    config["units"] = len(keep_out)
    kernel = weights[0][keep_in, :][:, keep_out]
    return config, [kernel] + [b[keep_out] for b in weights[1:]]


def _slice_depthwise(layer, config, weights, keep):
    return config, [weights[0][:, :, keep, :]] + [b[keep] for b in weights[1:]]


def _slice_grouped_depthwise(layer, config, weights, keep):
    config["filters"] = config["groups"] = len(keep)
    return config, [weights[0][..., keep]] + [b[keep] for b in weights[1:]]


def _slice_reshape(layer, config, weights, keep):
    config["target_shape"] = (*tuple(config["target_shape"])[:-1], len(keep))
    return config, weights


def _slice_layer_scale(layer, config, weights, keep):
    config["projection_dim"] = len(keep)
    return config, [w[keep] for w in weights]


# -- the tables -------------------------------------------------------------
_IDENTITY = LayerRule("channelwise", zero=same)
# Layers that act on each channel alone and keep zeros zero.
_CHANNELWISE = (
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
)
_MERGE_LAYERS = {
    L.Add: all_zero,
    L.Subtract: all_zero,
    L.Average: all_zero,
    L.Maximum: all_zero,
    L.Minimum: all_zero,
    L.Multiply: any_zero,
}
# Activations computed element by element (the others mix channels).
ELEMENTWISE_ACTIVATIONS = set(
    (
        "linear relu relu6 leaky_relu elu selu gelu silu swish tanh sigmoid "
        "hard_sigmoid hard_silu hard_swish mish softsign softplus celu hard_tanh "
        "hard_shrink soft_shrink tanh_shrink squareplus sparse_plus threshold "
        "sparse_sigmoid log_sigmoid exponential"
    ).split()
)


def activation_name(activation) -> str:
    """The name of an activation function (or its repr)."""
    if isinstance(activation, str):
        return activation
    return getattr(activation, "__name__", repr(activation))


def activation_kind(activation) -> str:
    """`"elementwise"`, `"mixing"` (softmax and the like) or `"unknown"`.

    Example:
    >>> activation_kind(keras.activations.relu), activation_kind("softmax")
    ('elementwise', 'mixing')
    """
    if activation is None:
        return "elementwise"
    name = activation_name(activation)
    if name in ELEMENTWISE_ACTIVATIONS:
        return "elementwise"
    if name in ("softmax", "log_softmax", "glu", "sparsemax"):
        return "mixing"
    return "unknown"


_PRESERVES_ZERO: dict = {}


def activation_preserves_zero(activation) -> bool:
    """True if `activation` acts element by element and maps 0 to 0.

    Example:
    >>> activation_preserves_zero(keras.activations.relu)
    True
    >>> activation_preserves_zero(keras.activations.sigmoid)
    False
    """
    if activation is None:
        return True
    if activation_kind(activation) != "elementwise":
        return False
    activation = keras.activations.get(activation)
    if activation not in _PRESERVES_ZERO:
        value = keras.ops.convert_to_numpy(activation(np.zeros((1, 2), "float32")))
        _PRESERVES_ZERO[activation] = bool(np.all(value == 0))
    return _PRESERVES_ZERO[activation]


def activation_problem(activation) -> str | None:
    """Why an activation stops channels, or None if it acts element-wise."""
    kind = activation_kind(activation)
    if kind == "elementwise":
        return None
    if kind == "mixing":
        what = "mixes channels"
    else:
        what = "is not known to act channel by channel"
    return f"activation {activation_name(activation)!r} {what}"


def _activation_rule(name: str, activation) -> LayerRule:
    problem = activation_problem(activation)
    if problem is None:
        return LayerRule("channelwise")
    return boundary(f"{name}: {problem}")


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


def producer_layer(layer):
    """The layer whose filters a producer node prunes (unwraps FilterPruning)."""
    return unwrap(layer)


def rule_for(node) -> LayerRule:
    """The rule for one graph node (kind, zero propagation, slicing)."""
    if node.is_alias:
        return _IDENTITY
    op, name = unwrap(node.operation), node.name
    cls = type(op).__name__
    if not _keras_graph.is_layer(op):
        return op_rules.rule_for_op(node)
    if type(op) in layer_rule.USER_RULES:
        rule = layer_rule.USER_RULES[type(op)]
        if op.weights and _keras_graph.config_or_none(op) is None:
            # Its weights could not be sliced: a copy needs its config.
            return boundary(
                f"{name} ({cls}) cannot be copied (get_config raises "
                "NotImplementedError), so its weights cannot be sliced"
            )
        if rule.kind in ("channelwise", "merge"):
            _check_user_rule(node, rule.kind)
        return rule
    rank = len(node.outputs[0].shape) if node.outputs else 0
    if not _channels_last(op):
        return boundary(f"{name}: channels_first data format")
    layer = producer_layer(op)
    if type(layer) is L.Conv2D:
        cin = node.inputs[0].shape[-1]
        if layer.groups == 1:
            return LayerRule("producer", slice_weights=_slice_conv2d)
        if layer.groups == cin == layer.filters:  # a depthwise convolution
            return _depthwise_rule(name, layer, _slice_grouped_depthwise)
        # Grouped (ResNeXt): its input and output channels are pruned evenly
        # per group (the channel graph's `blocks`), so it stays grouped.
        return LayerRule("producer", slice_weights=_slice_grouped_conv)
    if type(layer) is L.SeparableConv2D:
        return LayerRule("producer", slice_weights=_slice_separable)
    if type(layer) is L.Dense:
        if getattr(layer, "lora_enabled", False) or getattr(
            layer, "quantization_mode", None
        ):
            return boundary(f"{name}: LoRA or quantized Dense")
        return LayerRule("producer", slice_weights=_slice_dense)
    if type(op) is L.DepthwiseConv2D:
        if op.depth_multiplier != 1:
            return boundary(f"{name}: depth_multiplier > 1")
        return _depthwise_rule(name, op, _slice_depthwise)
    if type(op) is L.BatchNormalization:
        if not last_axis(op.axis, rank):
            return boundary(f"{name}: normalizes another axis")
        return LayerRule(
            "channelwise",
            slice_weights=slice_last_axis,
            zero=_batch_norm_zero,
            offsets=_batch_norm_offsets,
        )
    if type(op) in (L.LayerNormalization, L.GroupNormalization, L.UnitNormalization):
        return boundary(
            f"{name}: {cls} computes statistics across channels, so removing "
            "one changes the others"
        )
    if type(op) in _CHANNELWISE:
        return _IDENTITY
    if type(op) is L.Activation:
        return _activation_rule(name, op.activation)
    if type(op) in (L.ReLU, L.LeakyReLU, L.ELU):
        return LayerRule("channelwise")
    if type(op) is L.PReLU:
        return LayerRule("channelwise", slice_weights=slice_last_axis, zero=same)
    if type(op) is _keras_graph.LayerScale:
        return LayerRule("channelwise", slice_weights=_slice_layer_scale, zero=same)
    if type(op) is L.Rescaling:
        if np.size(op.scale) != 1 or np.size(op.offset) != 1:
            return boundary(f"{name}: per-channel Rescaling")
        return LayerRule("channelwise", zero=_rescaling_zero)
    if type(op) is L.Reshape:
        return _reshape_rule(node)
    if type(op) in _MERGE_LAYERS:
        return LayerRule("merge", zero=_MERGE_LAYERS[type(op)])
    if type(op) is L.Concatenate:
        return LayerRule("concat")
    if type(op) is L.Flatten:
        return LayerRule("flatten")
    if type(op) is L.Normalization:
        if not last_axis(op.axis, rank):
            return boundary(f"{name}: normalizes another axis")
        return LayerRule("channelwise")  # no slicing rule: its set is kept whole
    if _keras_graph.is_graph_model(op):
        return boundary(
            f"{name}: a nested model called more than once, or whose layer "
            "names are also used outside it"
        )
    if node.opaque:
        if _scalar_weights(op):
            return _scalar_weights_rule(node, f"{name} ({cls}) {node.opaque}")
        return boundary(f"{name} ({cls}) {node.opaque}")
    return boundary(f"{name} ({cls}) is not understood by the channel graph")


def _depthwise_rule(name, layer, slice_weights) -> LayerRule:
    """A depthwise convolution: channelwise, with a bias as its offset."""
    if activation_kind(layer.activation) != "elementwise":
        return _activation_rule(name, layer.activation)
    return LayerRule(
        "channelwise",
        slice_weights=slice_weights,
        zero=_activation_after(_depthwise_zero),
        offsets=_bias_offsets,
    )


def _activation_after(zero_fn):
    """Composes a channelwise zero rule with the layer's own activation."""

    def zero(layer, zero_in, zeroed_offsets):
        out = zero_fn(layer, zero_in, zeroed_offsets)
        return out & activation_preserves_zero(layer.activation)

    return zero


def _reshape_rule(node) -> LayerRule:
    """A Reshape that only adds or drops size-1 axes keeps channels apart."""
    before, after = node.inputs[0].shape[1:], node.outputs[0].shape[1:]
    if (
        before
        and after
        and before[-1] == after[-1]
        and all(d == 1 for d in before[:-1])
        and all(d == 1 for d in after[:-1])
    ):
        return LayerRule("channelwise", slice_weights=_slice_reshape, zero=same)
    return boundary(f"{node.name}: Reshape from {before} to {after} moves channels")


def _scalar_weights(layer) -> bool:
    """A custom layer whose weights are all per-tensor scalars (size 1)."""
    return bool(layer.weights) and all(
        int(np.prod(w.shape)) == 1 for w in layer.weights
    )


def _keep_weights(layer, config, weights, keep):
    return config, weights


def _scalar_weights_rule(node, reason: str) -> LayerRule:
    """A custom layer with scalar weights only (`scale * x + bias`).

    It cannot be inlined (its weights would have nowhere to live), but it has
    no per-channel state: if it is measured to act channel by channel (as
    for `register_layer`), it is channelwise, its weights kept as they are.
    Whether it keeps zero channels zero is measured too (a bias does not).
    """
    try:
        _check_user_rule(node, "channelwise")
    except Exception:  # noqa: BLE001 - mixing channels, or not runnable
        return boundary(reason)
    return LayerRule("channelwise", slice_weights=_keep_weights)


def _check_user_rule(node, kind: str) -> None:
    """Refuses a `register_layer` rule that the layer does not follow.

    The layer is run on random inputs, then with one input channel changed
    (the first, a middle and the last, of every input): a channelwise or
    merge layer may change only the same output channel. Unknown spatial
    sizes are taken as 3.

    Raises:
        ValueError: Naming the layer, if another output channel changed.
    """
    rng = np.random.default_rng(0)
    values = {}
    for tensor in node.inputs:
        shape = [3 if d is None else d for d in tensor.shape]
        values[id(tensor)] = rng.uniform(0.5, 1.5, shape).astype(
            tensor.dtype or "float32"
        )

    def run():
        args, kwargs = _keras_graph.fill_in(node, values)
        out = node.operation(*args, **kwargs)
        return keras.ops.convert_to_numpy(out).astype(np.float64)

    base = run()
    channels = base.shape[-1]
    for tensor in node.inputs:
        original = values[id(tensor)]
        if original.shape[-1] != channels:
            raise ValueError(
                f"Layer {node.name!r} of type {type(unwrap(node.operation)).__name__} "
                f"is registered as {kind!r} (register_layer) but its input has "
                f"{original.shape[-1]} channels and its output {channels}."
            )
        for c in sorted({0, channels // 2, channels - 1}):
            changed = original.copy()
            changed[..., c] += rng.uniform(1.0, 2.0, changed.shape[:-1])
            values[id(tensor)] = changed
            moved = np.abs(run() - base).reshape(-1, channels).max(axis=0)
            values[id(tensor)] = original
            scale = np.abs(base).max() + 1e-12
            others = np.flatnonzero(moved > 1e-5 * scale)
            others = others[others != c]
            if others.size:
                raise ValueError(
                    f"Layer {node.name!r} of type "
                    f"{type(unwrap(node.operation)).__name__} is registered as "
                    f"{kind!r} (register_layer), but changing its input "
                    f"channel {c} changed output channels {others[:5].tolist()}: "
                    "it mixes channels, so pruning through it would not be "
                    "exact. Register it as 'boundary' (or not at all)."
                )


def probe_zero(node, upstream=None) -> np.ndarray | None:
    """Which channels a channelwise node maps from 0 to exactly 0 (by running it).

    Unknown spatial sizes are taken as 1; merges get zeros on every input.
    With `upstream` (the channelwise node before it, such as constant
    padding), the node gets what `upstream` outputs for zeros instead.
    Returns None if the output at zero is not finite (`1 / x`, `x ** -1`):
    such a layer turns a removed channel into inf or NaN, not a value
    that a later `Multiply` by zero cancels.
    """
    values = {}
    for tensor in node.inputs + (upstream.inputs if upstream else []):
        shape = [1 if d is None else d for d in tensor.shape]
        values[id(tensor)] = np.zeros(shape, dtype=tensor.dtype or "float32")
    try:
        if upstream is not None:
            args, kwargs = _keras_graph.fill_in(upstream, values)
            before = upstream.operation(*args, **kwargs)
            values[id(node.inputs[0])] = keras.ops.convert_to_numpy(before)
        args, kwargs = _keras_graph.fill_in(node, values)
        out = keras.ops.convert_to_numpy(node.operation(*args, **kwargs))
    except Exception:  # noqa: BLE001 - a layer we cannot evaluate keeps nothing zero
        return np.zeros(node.outputs[0].shape[-1], dtype=bool)
    if not np.all(np.isfinite(out)):
        return None
    out = out.reshape(-1, out.shape[-1])
    return np.all(out == 0, axis=0)
