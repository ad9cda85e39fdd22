"""Channel dependency graph: which channels must be pruned together.

Every 4-D (or globally pooled) tensor's channel axis is described as a list of
*segments*, each a slice of a *channel set*. A set is created by a producer (a
`Conv2D` creates one for its filters) or by anything the graph cannot see
through (a model input, an unsupported layer). Layers that act channel by
channel (BatchNormalization, activations, pooling, dropout, padding) pass the
description through; element-wise merges (`Add`, `Multiply`, ...) unite the
sets they combine, because a channel of a residual sum can only be removed if
it is removed from every branch; `Concatenate` joins segments; `Flatten` and
`Dense` consume channels.

United sets form *groups*. A group is prunable when all its sets are: sets
that reach a model output, cross an unsupported layer, or belong to a skipped
layer are not. This is the dependency-graph idea of Torch-Pruning (Fang et
al., CVPR 2023) applied to Keras functional graphs; the reference SFP code
instead prunes each layer independently, which leaves residual channels that
cannot be removed (`coupling="layer"` reproduces that).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_sfp import _keras_graph
from keras_sfp.wrapper import FilterPruning

L = keras.layers

# Layers that act on each channel independently and map zero to zero (the
# element-wise ones are listed in `_ELEMENTWISE` below).
_PASS_THROUGH = (
    L.SpatialDropout2D,
    L.MaxPooling2D,
    L.AveragePooling2D,
    L.GlobalAveragePooling2D,
    L.GlobalMaxPooling2D,
    L.ZeroPadding2D,
    L.Cropping2D,
    L.UpSampling2D,
    L.BatchNormalization,
    L.DepthwiseConv2D,
)
# Channel-wise layers that add an offset: a zero channel leaves them non-zero
# unless the offset is zeroed too (the "BN shift").
OFFSET_LAYERS = (L.BatchNormalization, L.DepthwiseConv2D)
_ADD_LIKE = (L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum)
_MERGES = (*_ADD_LIKE, L.Multiply)

# Activations f with f(0) == 0: a zeroed channel stays zero through them.
_ZERO_PRESERVING = {
    "linear",
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "swish",
    "tanh",
    "hard_silu",
    "hard_swish",
    "mish",
    "softsign",
    "celu",
    "hard_tanh",
}
# Element-wise layers without weights: they may also follow a Flatten.
_ELEMENTWISE = (
    L.Activation,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.Dropout,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
)
_ACTIVATION_LAYERS = (L.Activation, L.ReLU, L.LeakyReLU, L.ELU)


def activation_preserves_zero(activation) -> bool:
    """True if `activation(0) == 0` (checked by name, then numerically).

    Example:
    >>> activation_preserves_zero(keras.activations.relu)
    True
    >>> activation_preserves_zero(keras.activations.sigmoid)
    False
    """
    if activation is None:
        return True
    name = getattr(activation, "__name__", None)
    if name in _ZERO_PRESERVING:
        return True
    return _maps_zero_to_zero(activation, 4)


def _maps_zero_to_zero(fn, channels: int) -> bool:
    """True if `fn` keeps the shape of a zero `(1, channels)` input and its zeros."""
    try:
        value = keras.ops.convert_to_numpy(fn(np.zeros((1, channels), "float32")))
    except Exception:  # noqa: BLE001 - something we cannot evaluate
        return False
    return value.shape == (1, channels) and bool(np.all(value == 0))


def _channels_last(layer) -> bool:
    fmt = getattr(layer, "data_format", "channels_last")
    return fmt in (None, "channels_last")


@dataclasses.dataclass
class ChannelSet:
    """Channels created by one layer (or by an input / unsupported layer)."""

    id: int
    length: int
    origin: str  # name of the layer that created it
    producer: object = None  # the Conv2D / FilterPruning layer, if any
    blocked: str | None = None  # why it cannot be pruned, or None


@dataclasses.dataclass
class Group:
    """Channel sets that must be pruned with the same indices."""

    id: int
    length: int
    sets: list
    producers: list  # layers producing the group's channels (Conv2D/wrappers)
    blocked: list  # reasons why it cannot be pruned (empty if prunable)

    @property
    def prunable(self) -> bool:
        return not self.blocked and bool(self.producers)


@dataclasses.dataclass
class TensorChannels:
    """Channel layout of one tensor: `segments` of `(set_id, length)`.

    `spatial` is set for the output of `Flatten`: the flattened vector holds
    `spatial` positions of all channels, channels fastest (channels_last).
    """

    segments: tuple
    spatial: int | None = None

    @property
    def length(self) -> int:
        return sum(n for _, n in self.segments)


class ChannelGraph:
    """The channel sets, groups and tensor layouts of a model.

    Args:
        model: A built Sequential or functional model.
        skip: Names of layers whose channels must not be pruned. Defaults to
            None.
    """

    def __init__(self, model: keras.Model, skip=None):
        _keras_graph.check_graph_model(model)
        self.model = model
        self.skip = set(skip or ())
        self.sets: list[ChannelSet] = []
        self._parent: list[int] = []
        self.tensors: dict[int, TensorChannels] = {}
        self.nodes = _keras_graph.nodes(model)
        self.kinds: dict[int, str] = {}  # id(node) -> rule applied
        self._calls: dict[int, int] = {}
        for node in self.nodes:
            self._calls[id(node.layer)] = self._calls.get(id(node.layer), 0) + 1
        for node in self.nodes:
            self._visit(node)
        for tensor in model.outputs:
            self._block(tensor, "reaches a model output")

    # -- union-find ---------------------------------------------------------
    def find(self, set_id: int) -> int:
        while self._parent[set_id] != set_id:
            self._parent[set_id] = self._parent[self._parent[set_id]]
            set_id = self._parent[set_id]
        return set_id

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def _new_set(self, length, origin, producer=None, blocked=None) -> int:
        set_id = len(self.sets)
        self.sets.append(ChannelSet(set_id, int(length), origin, producer, blocked))
        self._parent.append(set_id)
        return set_id

    # -- propagation --------------------------------------------------------
    def _info(self, tensor) -> TensorChannels | None:
        return self.tensors.get(id(tensor))

    def _block(self, tensor, reason: str) -> None:
        info = self._info(tensor)
        if info is None:
            return
        for set_id, _ in info.segments:
            if self.sets[set_id].blocked is None:
                self.sets[set_id].blocked = reason

    def _opaque(self, node, reason: str) -> None:
        """Unsupported operation: nothing crossing it may be pruned."""
        for tensor in node.inputs:
            self._block(tensor, reason)
        for tensor in node.outputs:
            self._new_tensor(tensor, node.name, blocked=reason)

    def _new_tensor(self, tensor, origin, producer=None, blocked=None) -> None:
        shape = tensor.shape
        if len(shape) < 2 or shape[-1] is None:
            return
        set_id = self._new_set(shape[-1], origin, producer, blocked)
        self.tensors[id(tensor)] = TensorChannels(((set_id, shape[-1]),))

    def _visit(self, node) -> None:
        layer = node.layer
        ins = [self._info(t) for t in node.inputs]
        name = node.name
        if node.is_input:
            self.kinds[id(node)] = "input"
            for tensor in node.outputs:
                self._new_tensor(tensor, name, blocked="model input")
            return
        kind, reason = self._classify(layer, node, ins)
        skipped = f"layer {name!r} is in `skip`"
        if name in self.skip and kind != "producer":
            # Leave the layer alone: nothing crossing it is pruned.
            kind, reason = "opaque", skipped
        self.kinds[id(node)] = kind
        if kind == "producer":
            out = node.outputs[0]
            conv = layer.layer if isinstance(layer, FilterPruning) else layer
            blocked = skipped if name in self.skip else None
            if not activation_preserves_zero(conv.activation):
                blocked = f"{name}: activation does not map 0 to 0"
            self._new_tensor(out, name, producer=layer, blocked=blocked)
        elif kind == "pass":
            self.tensors[id(node.outputs[0])] = ins[0]
        elif kind == "merge":
            for info in ins[1:]:
                for (a, _), (b, _) in zip(ins[0].segments, info.segments):
                    self._union(a, b)
            self.tensors[id(node.outputs[0])] = ins[0]
        elif kind == "concat":
            segments = tuple(s for info in ins for s in info.segments)
            self.tensors[id(node.outputs[0])] = TensorChannels(segments)
        elif kind == "flatten":
            spatial = int(np.prod(node.inputs[0].shape[1:-1]))
            self.tensors[id(node.outputs[0])] = TensorChannels(ins[0].segments, spatial)
        elif kind == "consumer":
            # Dense: consumes channels, produces units nobody prunes (yet).
            for tensor in node.outputs:
                self._new_tensor(tensor, name, blocked=f"{name}: Dense units")
        else:
            self._opaque(node, reason)

    def _classify(self, layer, node, ins):
        """Returns `(rule, reason)` for a node; the rule drives `_visit`."""
        cls = type(layer).__name__
        unsupported = f"{node.name} ({cls}) is not understood by the channel graph"
        if len(node.outputs) != 1 or any(info is None for info in ins[:1]):
            return "opaque", unsupported
        if getattr(layer, "weights", None) and self._calls[id(layer)] > 1:
            # One set of weights serves several calls whose channels could be
            # pruned differently: leave it whole.
            return "opaque", f"{node.name}: a layer with weights called twice"
        flat = [info.spatial is not None for info in ins]
        if any(flat):
            # A flattened tensor: Dense consumes it, element-wise layers
            # carry it; anything else would need the flat layout.
            if type(layer) is L.Dense:
                return "consumer", None
            if type(layer) in _ELEMENTWISE and len(ins) == 1:
                return self._elementwise(layer, node, ins)
            return "opaque", f"{node.name}: {cls} of a flattened tensor"
        out_rank = len(node.outputs[0].shape)
        if isinstance(layer, FilterPruning) or type(layer) is L.Conv2D:
            conv = layer.layer if isinstance(layer, FilterPruning) else layer
            if conv.groups != 1 or not _channels_last(conv):
                return "opaque", f"{node.name}: grouped or channels_first Conv2D"
            return "producer", None
        if type(layer) in _ELEMENTWISE:
            return self._elementwise(layer, node, ins)
        if type(layer) in _PASS_THROUGH:
            if not _channels_last(layer):
                return "opaque", f"{node.name}: channels_first"
            if isinstance(layer, L.BatchNormalization) and layer.axis not in (
                -1,
                out_rank - 1,
            ):
                return "opaque", f"{node.name}: normalizes another axis"
            if isinstance(layer, L.DepthwiseConv2D):
                if layer.depth_multiplier != 1:
                    return "opaque", f"{node.name}: depth_multiplier > 1"
                if not activation_preserves_zero(layer.activation):
                    return "opaque", f"{node.name}: activation does not map 0 to 0"
            return "pass", None
        if type(layer) in _MERGES:
            lengths = {tuple(n for _, n in i.segments) for i in ins if i is not None}
            if (
                any(i is None for i in ins)
                or len(lengths) != 1
                or any(len(t.shape) != out_rank for t in node.inputs)
            ):
                return "opaque", f"{node.name}: merges tensors of different layouts"
            return "merge", None
        if type(layer) is L.Concatenate:
            if layer.axis not in (-1, out_rank - 1) or any(i is None for i in ins):
                return "opaque", f"{node.name}: concatenates along another axis"
            return "concat", None
        if type(layer) is L.Flatten:
            shape = node.inputs[0].shape
            if len(shape) == 4 and None not in shape[1:] and _channels_last(layer):
                return "flatten", None
            return "opaque", f"{node.name}: Flatten of a non-image tensor"
        if type(layer) is L.Dense:
            return "consumer", None
        return "opaque", unsupported

    def _elementwise(self, layer, node, ins):
        """Element-wise layers pass channels through if they map 0 to 0."""
        if type(layer) in _ACTIVATION_LAYERS and not _maps_zero_to_zero(
            layer, ins[0].length
        ):
            return "opaque", f"{node.name}: does not map 0 to 0 channel by channel"
        return "pass", None

    # -- results ------------------------------------------------------------
    def groups(self) -> list[Group]:
        """The channel groups, in the order their first set was created."""
        by_root: dict[int, Group] = {}
        for channel_set in self.sets:
            root = self.find(channel_set.id)
            group = by_root.setdefault(
                root, Group(len(by_root), channel_set.length, [], [], [])
            )
            group.sets.append(channel_set)
            if channel_set.producer is not None:
                group.producers.append(channel_set.producer)
            if channel_set.blocked and channel_set.blocked not in group.blocked:
                group.blocked.append(channel_set.blocked)
        return list(by_root.values())

    def tensor_zeros(self, producer_zero, zeroed_offsets=False) -> dict:
        """Which channels of every tracked tensor are exactly zero.

        Args:
            producer_zero: Callable `layer -> bool array`: which output channels
                of a producer are zero (its filters and bias are zero).
            zeroed_offsets: If True, BatchNormalization and DepthwiseConv2D
                keep zero channels zero (as after `strip_pruning`, which zeroes
                their offsets there); otherwise their weights decide.

        Returns:
            `{id(tensor): bool array over the tensor's channels}`.
        """
        zeros: dict[int, np.ndarray] = {}
        for node in self.nodes:
            kind = self.kinds[id(node)]
            tracked = [t for t in node.outputs if self._info(t) is not None]
            if not tracked:
                continue
            if kind not in ("producer", "pass", "flatten", "merge", "concat"):
                for tensor in tracked:  # unsupported: assume nothing is zero
                    zeros[id(tensor)] = np.zeros(self._info(tensor).length, bool)
                continue
            ins = [zeros.get(id(t)) for t in node.inputs]
            if kind == "producer":
                value = np.asarray(producer_zero(node.layer), dtype=bool)
            elif kind in ("pass", "flatten"):
                offset = isinstance(node.layer, OFFSET_LAYERS)
                if offset and zeroed_offsets:
                    value = ins[0]
                else:
                    value = _pass_zero(node.layer, ins[0])
            elif kind == "merge":
                stack = np.stack(ins)
                multiply = isinstance(node.layer, L.Multiply)
                value = stack.any(axis=0) if multiply else stack.all(axis=0)
            else:  # concat
                value = np.concatenate(ins)
            zeros[id(node.outputs[0])] = value
        return zeros

    def zero_channels(self, producer_zero) -> dict[int, np.ndarray]:
        """Channels that are exactly zero on every tensor of each group.

        Args:
            producer_zero: As for `tensor_zeros`.

        Returns:
            `{root set id: bool array}`; `True` where the channel is zero in
            every tensor of the group, so removing it changes nothing.
        """
        acc: dict[int, np.ndarray] = {}
        for tensor_id, value in self.tensor_zeros(producer_zero).items():
            offset = 0
            for set_id, n in self.tensors[tensor_id].segments:
                root = self.find(set_id)
                part = value[offset : offset + n]
                acc[root] = part.copy() if root not in acc else acc[root] & part
                offset += n
        return acc


def _pass_zero(layer, zero_in: np.ndarray) -> np.ndarray:
    """Zero channels after a channel-wise layer, given those before it."""
    if isinstance(layer, L.BatchNormalization):
        at_zero = batch_norm_at_zero(layer)
        return zero_in & (at_zero == 0)
    if isinstance(layer, L.DepthwiseConv2D):
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        filter_zero = np.all(kernel.reshape(-1, kernel.shape[2]) == 0, axis=0)
        out = zero_in | filter_zero
        if layer.use_bias:
            out &= keras.ops.convert_to_numpy(layer.bias) == 0
        return out
    return zero_in


def batch_norm_at_zero(layer) -> np.ndarray:
    """The inference output of a BatchNormalization layer for a zero input."""
    mean = keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float64)
    var = keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
    gamma = keras.ops.convert_to_numpy(layer.gamma) if layer.scale else 1.0
    beta = keras.ops.convert_to_numpy(layer.beta) if layer.center else 0.0
    return beta - gamma * mean / np.sqrt(var + layer.epsilon)
