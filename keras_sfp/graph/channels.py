"""Channel dependency graph: which channels must be pruned together.

Why one module of about 600 lines: building the groups and answering
questions about them (zeros, removable channels, offsets) read the same
per-node rule table and segment lists; split, each half would need the
other's internals.

Every tracked tensor's channel axis is described as a list of *segments*,
each a slice of a *channel set*. A set is created by a producer (a `Conv2D`
creates one for its filters) or by a boundary (a model input, a layer the
graph cannot see through). Channelwise layers (normalization, depthwise
convolutions, activations, pooling, padding) pass the description through;
element-wise merges (`Add`, `Multiply`, `x + y`) unite the sets they combine,
because a channel of a residual sum can only be removed if it is removed from
every branch; `Concatenate` joins segments; a channel split (`keras.ops.split`,
`x[..., a:b]`) cuts sets at its edges and hands each output its segments;
`Flatten` keeps them, with a spatial stride. A grouped convolution marks the
sets it consumes and produces with its number of groups (`Group.blocks`):
they are pruned evenly per block. How each layer type behaves is in
`keras_sfp.rules`.

United sets form *groups*. A group is prunable when it has producers and all
its sets are prunable: sets that reach a model output, cross a boundary, or
belong to a skipped layer are not, nor are sets whose pruned channels would
not be zero where a layer consumes them (after an activation that does not
map 0 to 0, say). This is the dependency-graph idea of Torch-Pruning (Fang et
al., CVPR 2023) applied to Keras functional graphs; the reference SFP code
instead prunes each layer independently, which leaves residual channels that
cannot be removed (`coupling="layer"` reproduces that).

A channel can be removed exactly when it is zero in every tensor of its group
that a layer *consumes* by mixing channels (a producer's input): tensors
that only feed channelwise layers and merges may hold anything there, which
is what lets a squeeze-and-excitation gate (`sigmoid(0) = 0.5`) multiply a
pruned channel away.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import keras
import numpy as np

from keras_sfp.core.wrapper import num_outputs, unwrap
from keras_sfp.graph import keras_graph as _keras_graph
from keras_sfp.graph import rules
from keras_sfp.graph.rules import activation_preserves_zero, producer_layer


@dataclasses.dataclass
class ChannelSet:
    """Channels created by one layer (or by an input / boundary)."""

    id: int
    length: int
    origin: str  # name of the layer that created it
    producer: object = None  # the producing layer (Conv2D / wrapper / ...)
    blocked: str | None = None  # why it cannot be pruned, or None
    start: int = 0  # first of its channels in the producer's output
    retired: bool = False  # split into two sets (see `ChannelGraph._split`)


@dataclasses.dataclass
class Group:
    """Channel sets that must be pruned with the same indices."""

    id: int
    length: int
    sets: list
    producers: list  # layers producing the group's channels
    blocked: list  # reasons why it cannot be pruned (empty if prunable)
    # (layer, start, length): the slice of each producer's output channels
    # in the group (the whole output unless a merge split it)
    members: list = dataclasses.field(default_factory=list)
    # Grouped convolutions produce or consume the group: its channels form
    # `blocks` equal contiguous blocks that must keep equal counts.
    blocks: int = 1

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
        model: A built Sequential or functional model. Nested Sequential or
            functional models called once are analysed through.
        skip: Names of layers whose channels must not be pruned. Defaults to
            None.
        input_shape: For a model whose inputs' spatial size is unknown
            (`keras.Input((None, None, 3))`): the size at which `shape_of`
            gives every tensor's shape (MACs and latencies are counted at
            it), batch excluded; one shape per input for several. Defaults
            to None (the model's own shapes).

    Raises:
        ValueError: If `model` is not a built Sequential or functional
            model, or `input_shape` does not match its inputs.
    """

    def __init__(self, model: keras.Model, skip=None, input_shape=None):
        _keras_graph.check_graph_model(model)
        self.input_shape = _keras_graph.check_input_shape(model, input_shape)
        self.model = model
        self.skip = set(skip or ())
        self.sets: list[ChannelSet] = []
        self._parent: list[int] = []
        self.tensors: dict[int, TensorChannels] = {}
        self.nodes = _keras_graph.nodes(model)
        self.kinds: dict[int, str] = {}  # id(node) -> kind applied
        self.rules: dict[int, rules.LayerRule] = {}
        self.boundaries: list[tuple[str, str]] = []  # (layer name, reason)
        self.exits: list[tuple] = []  # (tensor, consumer node) mixing channels
        self._blocks: dict[int, int] = {}  # set id -> groups of a grouped conv
        self._probes: dict[int, np.ndarray] = {}
        self._calls = collections.Counter(id(node.operation) for node in self.nodes)
        self._made_by = {id(t): node for node in self.nodes for t in node.outputs}
        # Layer names as the graph (and an inlined copy) has them: a traced
        # block's renamed sublayers (`_keras_graph._expand`).
        self.names = {
            id(node.operation): node.name for node in self.nodes if node.rename
        }
        self._shapes = None
        if self.input_shape is not None:
            self._shapes = _keras_graph.reference_shapes(
                model, self.nodes, self.input_shape
            )
        for node in self.nodes:
            self._visit(node)
        for tensor in model.outputs:
            self._block(tensor, "reaches a model output")
        self._block_nonzero_exits()

    # -- union-find ---------------------------------------------------------

    def shape_of(self, tensor) -> tuple:
        """`tensor`'s shape, at `input_shape` where one was given.

        Raises:
            ValueError: If a dimension other than the batch's is unknown (the
                model takes inputs of any size and no `input_shape` was
                given).
        """
        shape = tuple(tensor.shape)
        if self._shapes is not None:
            shape = self._shapes.get(id(tensor), shape)
        if None in shape[1:]:
            raise ValueError(
                f"Model {self.model.name!r} takes inputs of unknown size "
                f"{[tuple(t.shape)[1:] for t in self.model.inputs]}: its MACs "
                "(and latencies) are counted at a reference size. Pass "
                "`input_shape=` (batch excluded), e.g. the size it is trained "
                f"at. Received: input_shape=None (tensor {tensor.name!r} of "
                f"shape {tensor.shape})"
            )
        return shape

    def find(self, set_id: int) -> int:
        while self._parent[set_id] != set_id:
            self._parent[set_id] = self._parent[self._parent[set_id]]
            set_id = self._parent[set_id]
        return set_id

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def _new_set(self, length, origin, producer=None, blocked=None, start=0) -> int:
        set_id = len(self.sets)
        self.sets.append(
            ChannelSet(set_id, int(length), origin, producer, blocked, start)
        )
        self._parent.append(set_id)
        return set_id

    def _split(self, set_id: int, cut: int) -> None:
        """Splits a set, and every set united with it, at channel `cut`.

        Needed when a merge adds tensors whose channels are concatenated
        differently (`concat([a, b]) + conv(x)`): the conv's filters then
        form two groups, one pruned with `a`'s indices, one with `b`'s.
        """
        root = self.find(set_id)
        members = [s for s in self.sets if not s.retired and self.find(s.id) == root]
        halves = {}
        for old in members:
            first = self._new_set(cut, old.origin, old.producer, old.blocked, old.start)
            second = self._new_set(
                old.length - cut, old.origin, old.producer, old.blocked, old.start + cut
            )
            old.retired = True
            halves[old.id] = ((first, cut), (second, old.length - cut))
        if any(old.id in self._blocks for old in members):
            for (a, _), (b, _) in halves.values():
                for half in (a, b):
                    self._block_set(
                        half, "channels of a grouped convolution are sliced apart"
                    )
        pairs = list(halves.values())
        for (a, _), (b, _) in pairs[1:]:
            self._union(pairs[0][0][0], a)
            self._union(pairs[0][1][0], b)
        for info in self.tensors.values():
            if any(sid in halves for sid, _ in info.segments):
                info.segments = tuple(
                    part
                    for sid, n in info.segments
                    for part in halves.get(sid, ((sid, n),))
                )

    def _align(self, tensors) -> None:
        """Splits sets until every tensor has its segments at the same places."""
        while True:
            cuts = set()
            for tensor in tensors:
                cuts.update(np.cumsum([n for _, n in self._info(tensor).segments]))
            straddles = (self._straddle(tensor, cuts) for tensor in tensors)
            split = next((s for s in straddles if s is not None), None)
            if split is None:
                return
            self._split(*split)

    def _straddle(self, tensor, cuts):
        """`(set id, cut)` for the first segment of `tensor` a cut falls inside."""
        position = 0
        for set_id, n in self._info(tensor).segments:
            inside = [c - position for c in cuts if position < c < position + n]
            if inside:
                return set_id, min(inside)
            position += n
        return None

    # -- propagation --------------------------------------------------------
    def _info(self, tensor) -> TensorChannels | None:
        return self.tensors.get(id(tensor))

    def _block(self, tensor, reason: str) -> None:
        info = self._info(tensor)
        if info is None:
            return
        for set_id, _ in info.segments:
            self._block_set(set_id, reason)

    def _new_tensor(self, tensor, origin, producer=None, blocked=None) -> None:
        shape = tensor.shape
        if len(shape) < 2 or shape[-1] is None:
            return
        set_id = self._new_set(shape[-1], origin, producer, blocked)
        self.tensors[id(tensor)] = TensorChannels(((set_id, shape[-1]),))

    def _visit(self, node) -> None:
        name = node.name
        if node.is_input:
            self.kinds[id(node)] = "input"
            for tensor in node.outputs:
                self._new_tensor(tensor, name, blocked="model input")
            return
        rule = rules.rule_for(node)
        kind, reason = self._check_layout(node, rule)
        skipped = f"layer {name!r} is in `skip`"
        if name in self.skip and kind != "producer":
            kind, reason = "boundary", skipped  # nothing crossing it is pruned
        self.kinds[id(node)] = kind
        self.rules[id(node)] = rule
        ins = [self._info(t) for t in node.inputs]
        out = node.outputs[0] if node.outputs else None
        if kind == "producer":
            layer = producer_layer(node.layer)
            blocked = skipped if name in self.skip else None
            problem = rules.activation_problem(layer.activation)
            if problem is not None:
                blocked = f"{name}: {problem}"
            if ins[0] is not None:
                self.exits.append((node.inputs[0], node))
            self._new_tensor(out, name, producer=node.layer, blocked=blocked)
            groups = getattr(layer, "groups", 1)
            if groups > 1:
                self._visit_grouped(node, groups)
        elif kind == "channelwise":
            self.tensors[id(out)] = ins[0]
            if node.layer is not None and getattr(node.layer, "weights", None):
                if rule.slice_weights is None:
                    self._block(
                        out, f"{name}: no rule to slice its per-channel weights"
                    )
        elif kind == "merge":
            aligned, side = self._merge_inputs(node)
            self._align(aligned)
            first = self._info(aligned[0])
            for tensor in aligned[1:]:
                for (a, _), (b, _) in zip(first.segments, self._info(tensor).segments):
                    self._union(a, b)
            self.exits.extend((t, node) for t in side if self._info(t) is not None)
            self.tensors[id(out)] = first
        elif kind == "concat":
            segments = tuple(s for info in ins for s in info.segments)
            self.tensors[id(out)] = TensorChannels(segments)
        elif kind == "split":
            self._visit_split(node, rule)
        elif kind == "flatten":
            spatial = int(np.prod(node.inputs[0].shape[1:-1]))
            self.tensors[id(out)] = TensorChannels(ins[0].segments, spatial)
        else:
            self.boundaries.append((name, reason))
            for tensor in node.inputs:
                self._block(tensor, reason)
            for tensor in node.outputs:
                self._new_tensor(tensor, name, blocked=reason)

    def _visit_grouped(self, node, groups: int) -> None:
        """Grouped convolution: its input and output channels keep equal blocks."""
        ((out_set, _),) = self._info(node.outputs[0]).segments
        self._blocks[out_set] = groups
        info = self._info(node.inputs[0])
        if info is None:
            return
        if len(info.segments) == 1:
            set_id = info.segments[0][0]
            self._blocks[set_id] = math.lcm(self._blocks.get(set_id, 1), groups)
        else:
            self._block(
                node.inputs[0],
                f"{node.name}: a grouped convolution's input joins channel sets",
            )

    def _visit_split(self, node, rule) -> None:
        """Each output holds the segments of its channel range of the input."""
        tensor = node.inputs[0]
        cuts = {edge for edges in rule.ranges for edge in edges}
        while (at := self._straddle(tensor, cuts)) is not None:
            self._split(*at)
        for out, (start, stop) in zip(node.outputs, rule.ranges):
            position, segments = 0, []
            for set_id, n in self._info(tensor).segments:
                if start <= position and position + n <= stop:
                    segments.append((set_id, n))
                position += n
            self.tensors[id(out)] = TensorChannels(tuple(segments))

    def _merge_inputs(self, node):
        """Splits a merge's inputs into channel-aligned ones and broadcast ones."""
        channels = node.outputs[0].shape[-1]
        aligned, side = [], []
        for tensor in node.inputs:
            info = self._info(tensor)
            if info is not None and info.spatial is None and info.length == channels:
                aligned.append(tensor)
            else:
                side.append(tensor)
        return aligned, side

    def _check_layout(self, node, rule):
        """Returns `(kind, reason)`: the rule's kind, or a boundary."""
        name, layer = node.name, node.layer
        if rule.kind == "boundary":
            return "boundary", rule.reason
        if rule.kind == "split":
            info = self._info(node.inputs[0]) if node.inputs else None
            if info is None or info.spatial is not None:
                return "boundary", f"{name}: slices channels it cannot follow"
            if len(node.outputs) != len(rule.ranges):
                return "boundary", f"{name}: not one output per channel range"
            return "split", None
        if len(node.outputs) != 1 or not node.inputs:
            return "boundary", f"{name}: not a single-output operation"
        ins = [self._info(t) for t in node.inputs]
        cls = type(layer).__name__ if layer is not None else "alias"
        if layer is not None and self._calls[id(layer)] > 1:
            if getattr(layer, "weights", None) or rule.slice_weights is not None:
                # One layer (its weights, or a config that names the channel
                # count) serves calls whose channels could be pruned
                # differently: leave it whole.
                return (
                    "boundary",
                    f"{name}: a layer with per-channel state called twice",
                )
        flat = any(info is not None and info.spatial is not None for info in ins)
        kind = rule.kind
        if kind == "producer":
            conv = producer_layer(layer)
            if ins[0] is None and not isinstance(conv, keras.layers.Dense):
                return "boundary", f"{name}: input channels unknown"
            return "producer", None
        if kind == "merge":
            aligned, side = self._merge_inputs(node)
            if not aligned or any(t.shape[-1] != 1 for t in side):
                return "boundary", f"{name}: merges tensors of different layouts"
            if rule.zero is None and self._probe(node) is None:
                return "boundary", f"{name}: maps 0 to inf or NaN"
            return "merge", None
        if ins[0] is None:
            return "boundary", f"{name}: input channels unknown"
        if flat:
            # A flattened tensor: only weightless channelwise layers carry it.
            if kind == "channelwise" and not getattr(layer, "weights", None):
                return "channelwise", None
            return "boundary", f"{name}: {cls} of a flattened tensor"
        rank = len(node.outputs[0].shape)
        if kind == "concat":
            if layer.axis not in (-1, rank - 1) or any(i is None for i in ins):
                return "boundary", f"{name}: concatenates along another axis"
            return "concat", None
        if kind == "flatten":
            shape = node.inputs[0].shape
            if len(shape) >= 3 and None not in shape[1:]:
                return "flatten", None
            return "boundary", f"{name}: Flatten of a tensor of unknown size"
        if node.outputs[0].shape[-1] != node.inputs[0].shape[-1]:
            return "boundary", f"{name}: changes the number of channels"
        if kind == "channelwise" and rule.zero is None and self._probe(node) is None:
            return "boundary", f"{name}: maps 0 to inf or NaN"
        return kind, None

    # -- zero channels ------------------------------------------------------
    def _probe(self, node) -> np.ndarray:
        if id(node) not in self._probes:
            self._probes[id(node)] = rules.probe_zero(node)
        return self._probes[id(node)]

    def _padded_zero(self, node, zeros):
        """Zero channels after constant padding and the layer after it."""
        pad = self._made_by.get(id(node.inputs[0]))
        if pad is None or self.kinds.get(id(pad)) != "channelwise":
            return None
        if not self.rules[id(pad)].border or self.kinds[id(node)] != "channelwise":
            return None
        key = ("padded", id(node))
        if key not in self._probes:
            self._probes[key] = rules.probe_zero(node, upstream=pad)
        probe, zero_in = self._probes[key], zeros.get(id(pad.inputs[0]))
        if probe is None or zero_in is None:
            return None
        return zero_in & probe

    def _channelwise_zero(self, node, zero_in, zeroed_offsets):
        rule = self.rules[id(node)]
        if rule.zero is not None:
            return np.asarray(
                rule.zero(unwrap(node.layer), zero_in, zeroed_offsets), bool
            )
        probe = self._probe(node)
        if len(probe) != len(zero_in):  # a flattened tensor: positions x channels
            probe = probe.reshape(-1, len(zero_in)).all(axis=0)
        return zero_in & probe

    def _merge_zero(self, node, zeros):
        channels = node.outputs[0].shape[-1]
        values = []
        for tensor in node.inputs:
            value = zeros.get(id(tensor))
            if value is None:
                value = np.zeros(1, bool)
            values.append(np.broadcast_to(value, (channels,)))
        rule = self.rules[id(node)]
        if rule.zero is not None:
            return np.asarray(rule.zero(unwrap(node.layer), values), bool)
        # A registered merge: zero where all inputs are, if it maps 0 to 0.
        return np.logical_and.reduce(values) & self._probe(node)

    def tensor_zeros(self, producer_zero, zeroed_offsets=False, culprits=None) -> dict:
        """Which channels of every tracked tensor are exactly zero.

        Args:
            producer_zero: Callable `layer -> bool array`: which output channels
                of a producer are zero (its filters and bias are zero).
            zeroed_offsets: If True, layers with offsets (BatchNormalization,
                depthwise biases) keep zero channels zero (as after
                `strip_pruning`, which zeroes their offsets there); otherwise
                their weights decide.
            culprits: Optional dict filled with `{id(tensor): layer name}` of
                the layer that first made a zero channel non-zero upstream.

        Returns:
            `{id(tensor): bool array over the tensor's channels}`.
        """
        zeros: dict[int, np.ndarray] = {}
        culprits = {} if culprits is None else culprits
        for node in self.nodes:
            kind = self.kinds[id(node)]
            tracked = [t for t in node.outputs if self._info(t) is not None]
            if not tracked:
                continue
            out = tracked[0]
            if kind not in (
                "producer",
                "channelwise",
                "merge",
                "concat",
                "flatten",
                "split",
            ):
                for tensor in tracked:  # a boundary: assume nothing is zero
                    zeros[id(tensor)] = np.zeros(self._info(tensor).length, bool)
                continue
            ins = [zeros.get(id(t)) for t in node.inputs]
            before = None
            if kind == "split":
                for tensor, (start, stop) in zip(
                    node.outputs, self.rules[id(node)].ranges
                ):
                    zeros[id(tensor)] = ins[0][start:stop]
                    if id(node.inputs[0]) in culprits:
                        culprits[id(tensor)] = culprits[id(node.inputs[0])]
                continue
            if kind == "producer":
                layer = producer_layer(node.layer)
                value = np.asarray(producer_zero(node.layer), dtype=bool)
                before = value
                value = value & activation_preserves_zero(layer.activation)
            elif kind == "channelwise":
                before = ins[0]
                value = self._channelwise_zero(node, ins[0], zeroed_offsets)
                padded = self._padded_zero(node, zeros)
                if padded is not None:
                    value = value | (
                        padded & self._channelwise_zero(node, padded, zeroed_offsets)
                    )
            elif kind == "merge":
                value = self._merge_zero(node, zeros)
            elif kind == "concat":
                value = np.concatenate(ins)
            else:  # flatten
                value = ins[0]
            if before is not None and np.any(before & ~value):
                culprits[id(out)] = node.name
            elif node.inputs:
                for tensor in node.inputs:
                    if id(tensor) in culprits:
                        culprits[id(out)] = culprits[id(tensor)]
                        break
            zeros[id(out)] = value
        return zeros

    def _exit_parts(self, zeros):
        """`(set id, zero part or None, consumer)` for every consumed segment."""
        for tensor, consumer in self.exits:
            value = zeros.get(id(tensor))
            offset = 0
            for set_id, n in self._info(tensor).segments:
                part = None if value is None else value[offset : offset + n]
                offset += n
                yield set_id, part, consumer, tensor

    def removable_channels(self, producer_zero) -> dict[int, np.ndarray]:
        """Channels that can be removed from each group without changing outputs.

        A channel is removable when it is zero in every tensor of its group
        that a layer consumes by mixing channels.

        Args:
            producer_zero: As for `tensor_zeros`.

        Returns:
            `{root set id: bool array}`, for groups that are consumed.
        """
        acc: dict[int, np.ndarray] = {}
        for set_id, part, _, _ in self._exit_parts(self.tensor_zeros(producer_zero)):
            root = self.find(set_id)
            if part is None:
                part = np.zeros(self.sets[set_id].length, bool)
            acc[root] = part.copy() if root not in acc else acc[root] & part
        return acc

    def _block_nonzero_exits(self) -> None:
        """Blocks sets whose channels stay non-zero, even pruned, where consumed."""
        culprits = {}
        zeros = self.tensor_zeros(
            lambda layer: np.ones(num_outputs(producer_layer(layer)), bool),
            zeroed_offsets=True,
            culprits=culprits,
        )
        for set_id, part, consumer, tensor in self._exit_parts(zeros):
            if part is None or not part.all():
                culprit = culprits.get(id(tensor), "a boundary")
                self._block_set(
                    set_id,
                    f"pruned channels would not be zero where {consumer.name} "
                    f"consumes them ({culprit} does not map 0 to 0)",
                )

    def _block_set(self, set_id: int, reason: str) -> None:
        if self.sets[set_id].blocked is None:
            self.sets[set_id].blocked = reason

    # -- results ------------------------------------------------------------
    def groups(self) -> list[Group]:
        """The channel groups, in the order their first set was created."""
        by_root: dict[int, Group] = {}
        for channel_set in self.sets:
            if channel_set.retired:
                continue
            root = self.find(channel_set.id)
            group = by_root.setdefault(
                root, Group(len(by_root), channel_set.length, [], [], [])
            )
            group.sets.append(channel_set)
            producer = channel_set.producer
            if producer is not None:
                if all(p is not producer for p in group.producers):
                    group.producers.append(producer)
                group.members.append((producer, channel_set.start, channel_set.length))
            if channel_set.blocked and channel_set.blocked not in group.blocked:
                group.blocked.append(channel_set.blocked)
            group.blocks = math.lcm(group.blocks, self._blocks.get(channel_set.id, 1))
        for group in by_root.values():
            if group.length % group.blocks:
                group.blocked.append(
                    f"grouped convolutions split its {group.length} channels "
                    f"into blocks that do not divide them ({group.blocks})"
                )
        return list(by_root.values())

    def offset_nodes(self):
        """Channelwise nodes with offsets (BatchNormalization, depthwise bias)."""
        return [
            node
            for node in self.nodes
            if self.kinds.get(id(node)) == "channelwise"
            and self.rules[id(node)].offsets is not None
        ]
