"""Entry points that add and remove the pruning wrappers.

Why one module of over 400 lines: `prune_filters` validates and wraps in
one pass over the graph, and about half of it is its docstring; targets
are `allocation.targets`', the state `core.state`'s, zeros `core.zeros`'.
"""

from __future__ import annotations

import warnings

import keras

from keras_sfp import _checks
from keras_sfp.allocation import counts as allocation_lib
from keras_sfp.allocation import targets as targets_lib
from keras_sfp.core import zeros as zeros_lib
from keras_sfp.core.wrapper import (
    PRUNABLE_TYPES,
    ChannelMask,
    FilterPruning,
    check_prune_args,
    output_kernel,
    unwrap,
)
from keras_sfp.graph import keras_graph as _keras_graph
from keras_sfp.graph.channels import ChannelGraph
from keras_sfp.latency import machine, timing
from keras_sfp.latency.table import LatencyTable

WRAPPER_PREFIX = "sfp_"
DEFAULT_RATE = 0.3


def _check_skip(model, skip) -> tuple:
    if skip is None:
        return ()
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise ValueError(
            f"`skip` must be a list of layer names (strings). Received: skip={skip!r}"
        )
    names = {layer.name for layer in _keras_graph.all_layers(model)}
    names |= {node.name for node in _keras_graph.nodes(model)}  # renamed, inlined
    missing = [s for s in skip if s not in names]
    if missing:
        raise ValueError(
            f"`skip` names layers that are not in the model: {missing}. "
            f"Received: skip={list(skip)!r}"
        )
    return tuple(skip)


def prunable_layers(model, skip=None, graph: ChannelGraph | None = None) -> list:
    """The layers whose filters (or units) `prune_filters` would prune."""
    graph = graph or ChannelGraph(model, skip=skip)
    return [
        producer
        for group in graph.groups()
        if group.prunable
        for producer in group.producers
        if type(producer) in PRUNABLE_TYPES
    ]


def _maskable_offset_layers(graph: ChannelGraph) -> list:
    """Layers with offsets (BatchNormalization, ...) fed by prunable channels.

    `prune_filters` wraps them in `ChannelMask`, so that hard epochs can hold
    the channels of pruned filters at zero after them.
    """
    roots = {
        graph.find(channel_set.id)
        for group in graph.groups()
        if group.prunable
        for channel_set in group.sets
    }
    layers = []
    for node in graph.offset_nodes():
        info = graph.tensors.get(id(node.inputs[0]))
        if info and any(graph.find(set_id) in roots for set_id, _ in info.segments):
            layers.append(node.layer)
    return layers


def resolve_round_to(round_to, coupling: str = "group"):
    """`round_to`, with `"auto"` replaced by this machine's multiple.

    `keras_sfp.latency.machine.auto_round_to` for the device Keras runs on
    (`keras_sfp.latency.timing.device_name`), at most 8 with
    `coupling="layer"` (each layer rounds to its nearest multiple alone,
    with no balancing: 16 would keep a 32-filter layer whole at rate 0.2
    and halve it at 0.3); any other value is returned as it is
    (`prune_filters` checks it).
    """
    if isinstance(round_to, str) and round_to == "auto":
        multiple = machine.auto_round_to(device=timing.device_name())
        return min(multiple, 8) if coupling == "layer" else multiple
    return round_to


def prune_filters(
    model: keras.Model,
    rate: float | None = None,
    criterion="l2",
    schedule=None,
    coupling: str = "group",
    round_to: int | str = "auto",
    skip=None,
    target_macs: float | None = None,
    target_latency: float | None = None,
    latency_table=None,
    allocation: str | None = None,
    input_shape=None,
) -> keras.Model:
    """Prepares a model for Soft Filter Pruning.

    Returns a clone of `model` (same weights) in which every prunable `Conv2D`,
    `SeparableConv2D` (pointwise filters) and `Dense` (units) is wrapped in
    `FilterPruning`, a wrapper that owns a per-filter mask. Train the clone
    with the `SoftFilterPrune` callback; it zeroes the lowest-scoring filters
    at every epoch end (He et al., IJCAI 2018). The clone computes exactly what
    `model` computes until the first prune event.

    A layer is prunable if its output channels can be physically removed
    afterwards: they do not reach a model output, do not cross a layer the
    channel graph does not understand (see `describe`), and no layer of their
    group is named in `skip`. With `coupling="group"` channels joined by
    residual merges, concatenations' consumers or squeeze-and-excitation gates
    are scored and pruned together, so `shrink` removes all of them. Nested
    Sequential or functional models, and custom layers whose `call` uses
    only sublayers and `keras.ops` (`keras_sfp.graph.keras_graph.trace_call`),
    are inlined: the clone is one flat functional model. Grouped
    convolutions keep the same number of channels in every group.

    Call it inside `strategy.scope()` when training with a distribution
    strategy, like building any model.

    Args:
        model: A built Sequential or functional `keras.Model`. Not modified.
        rate: Fraction of each group's channels to prune, in [0, 1). None
            means 0.3, or the rate found for `target_macs`. Defaults to None.
        criterion: `"l2"` (the paper), `"l1"`, `"fpgm"`, `"l2_bn"` (the L2
            norm folded with the following BatchNormalization's scale; see
            `keras_sfp.criteria`) or a callable mapping a
            kernel `(kh, kw, in, out)` to `out` scores (register it with
            `keras.saving.register_keras_serializable` so that `.keras` files
            reload). Defaults to `"l2"`.
        schedule: `None` for a constant `rate`, `"asymptotic"`, or a schedule
            `epoch -> rate` such as `keras_sfp.schedules.Asymptotic`. Defaults
            to None.
        coupling: `"group"` (prune residual-coupled channels as one unit) or
            `"layer"` (the paper's independent per-layer choice). Defaults to
            `"group"`.
        round_to: Kept channel counts are multiples of this (or a group's
            full width; groups of at most `round_to` channels are not
            rounded), so that they fill the hardware's vector or tensor-core
            width. Each group is rounded to a nearby multiple, up or down,
            balanced across groups so that the model's MACs stay those of
            the unrounded counts (`keras_sfp.allocation.counts.balanced_kept`).
            With `coupling="layer"` each layer rounds to its nearest multiple
            alone (its pruned residual channels are not all removed, so there
            are no MACs to balance). 1 keeps `floor` counts, as the paper.
            `"auto"`: the multiple this machine's kernels run fastest at
            (`keras_sfp.latency.machine.auto_round_to`: 16 on a CPU with
            AVX-512, 8 with AVX2 or on a GPU, 4 with NEON); the wrappers
            store the number. Prune on (or pass the number of) the machine
            you deploy to. Defaults to `"auto"`: on an AVX-512 CPU, 16
            was faster than 8 on LiteRT, ONNX Runtime and OpenVINO for
            ResNet-56, ResNet-50 and MobileNetV2 (docs/benchmarks.md,
            "Latency").
        skip: Names of layers to leave alone. Defaults to None.
        target_macs: Fraction of the model's multiply-accumulates to keep,
            in (0, 1], instead of a `rate`: the smallest rate whose unrounded
            per-group counts keep at most this fraction is found by bisection
            and stored in the wrappers (it is the final rate of a
            `schedule`); the balanced multiples of `round_to` then keep it to
            within about one `round_to` step of one group. Needs
            `coupling="group"`. Defaults to None.
        target_latency: Fraction of the model's latency to keep, in (0, 1),
            instead of a `rate`: HALP's latency-aware allocation. Each
            convolution and dense layer is timed alone at a grid of channel
            counts on this device (`latency_table`), and, from all channels,
            the group whose next multiple of `round_to` down saves the most
            predicted time per unit of filter importance lost (`criterion`
            scores, each layer weighing the same) gives it up, until the
            predicted latency is at most this fraction; then the steps that
            still fit are given back, and one-up-one-down swaps that fit and
            lose less importance are made. Groups then prune at
            different rates (stored per channel in the wrappers; the largest
            is the schedule's final rate). Needs `coupling="group"`.
            Defaults to None.
        latency_table: The `keras_sfp.latency.table.LatencyTable` that
            `target_latency` reads and fills (saved afterwards when it has a
            path). Defaults to the table cached for this device and runtime
            at batch size 1 (`LatencyTable.for_device()`).
        allocation: How the channels to prune are shared among groups:
            `"uniform"` (each group prunes the same fraction, the paper) or
            `"global"`: one ranking of all groups' channels by importance
            (`keras_sfp.core.importance.importance_lost`, criterion scores
            normalised per layer, with the weights the model has now) under
            the MACs budget (what `"uniform"` keeps at `rate` with the same
            `round_to`, or `target_macs`): the group whose next multiple of
            `round_to` down saves the most MACs per unit of importance lost
            gives it up, until the budget is met, then the steps that still
            fit are given back and swaps that lose less importance are made
            (as `target_latency` does with latency). No group keeps fewer
            than half of the channels `"uniform"` at the same MACs keeps it
            (`allocation.targets.KEEP_FLOOR`, lowered where a `target_macs`
            needs it: one ranking alone empties whole layers). Groups then
            prune at different rates, as with `target_latency`. Meant for
            trained networks (a new network's weights carry no importance).
            Needs `coupling="group"`. None means `"uniform"`, or `"global"`
            with `target_latency` (which allocates globally by latency).
            Defaults to None.
        input_shape: For a model whose inputs' size is unknown
            (`keras.Input((None, None, 3))`, a fully convolutional network):
            the input size, batch excluded (one per input for several), at
            which MACs are counted for rounding, `target_macs`, global
            allocation and latency, e.g. the size it trains at. Stored in the
            wrappers. Needed for such a model unless `coupling="layer"`;
            ignored for a model of fixed size. Defaults to None.

    Returns:
        A new model of the same kind (functional if `model` nests models
        or has custom layers that were traced and inlined) with wrapped
        layers.

    Raises:
        ValueError: For an invalid option (`rate` and `target_macs`
            together, a `target_macs` below what pruning can reach), a
            subclassed or unbuilt model, a `skip` name that is not a layer, or
            a model with nothing to prune.
        RuntimeError: Inside a `tf.distribute.MultiWorkerMirroredStrategy`
            scope, which Keras 3 cannot train with (see
            `keras_sfp.training.distributed`).

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(x))
    >>> pruned = prune_filters(model, rate=0.25)
    >>> [type(layer).__name__ for layer in pruned.layers][1]
    'FilterPruning'
    """
    _checks.check_strategy()
    targets_lib.check_targets(target_macs, target_latency, rate, coupling)
    allocation_mode = targets_lib.check_allocation(allocation, target_latency, coupling)
    if allocation_mode == "global" and schedule not in (
        None,
        "constant",
        "asymptotic",
    ):
        raise ValueError(
            "`target_latency` and allocation='global' scale each group's own "
            "rate with the schedule, so the schedule must be None, 'constant' "
            "or 'asymptotic' (a schedule object carries a final rate of its "
            f"own). Received: schedule={schedule!r}"
        )
    if latency_table is not None and (
        target_latency is None or not hasattr(latency_table, "lookup")
    ):
        raise ValueError(
            "`latency_table` must be a keras_sfp.latency.table.LatencyTable, "
            "passed with `target_latency`. Received: "
            f"latency_table={latency_table!r}, target_latency={target_latency!r}"
        )
    round_to = resolve_round_to(_checks.round_to(round_to), coupling)
    check_prune_args(
        DEFAULT_RATE if rate is None else rate, criterion, coupling, round_to, schedule
    )
    _keras_graph.check_graph_model(model)
    if any(
        isinstance(layer, (FilterPruning, ChannelMask))
        for layer in _keras_graph.all_layers(model)
    ):
        raise ValueError(
            "`model` is already prepared by prune_filters (it holds "
            "FilterPruning wrappers): continue training it with "
            "SoftFilterPrune, or call keras_sfp.strip_pruning first to prune "
            f"it anew. Received: model {model.name!r}"
        )
    skip = _check_skip(model, skip)
    model = _keras_graph.inline(model)
    reference = _keras_graph.check_input_shape(model, input_shape)
    if reference is not None and not _keras_graph.has_unknown_sizes(model):
        reference = None  # the model's own shapes
    graph = ChannelGraph(model, skip=skip, input_shape=reference)
    if coupling == "group" and reference is None:
        for tensor in model.inputs:
            graph.shape_of(tensor)  # a ValueError for inputs of unknown size
    targets = {id(layer) for layer in prunable_layers(model, graph=graph)}
    if not targets:
        raise ValueError(
            "`model` has no prunable layer: every convolution's channels "
            "reach an output, cross an unsupported layer or are skipped "
            "(keras_sfp.describe(model) says why). "
            f"Received: model {model.name!r} with layers "
            f"{[type(layer).__name__ for layer in model.layers]}"
        )

    channel_rates = {}
    if allocation_mode == "global" and target_latency is None:
        groups = allocation_lib.pruned_groups(graph, lambda p: id(p) in targets)
        rates = targets_lib.global_rates(
            graph,
            groups,
            DEFAULT_RATE if rate is None and target_macs is None else rate,
            target_macs,
            round_to,
            criterion,
        )
        rate = targets_lib.per_channel(channel_rates, groups, rates)
    elif target_macs is not None:
        groups = allocation_lib.pruned_groups(graph, lambda p: id(p) in targets)
        rate = allocation_lib.rate_for_macs(
            allocation_lib.MacModel(graph, groups), target_macs, round_to
        )
    if target_latency is not None:
        table = latency_table or LatencyTable.for_device()
        groups = allocation_lib.pruned_groups(graph, lambda p: id(p) in targets)
        try:
            rates = targets_lib.latency_rates(
                graph, groups, table, target_latency, round_to, criterion
            )
        finally:  # keep what was measured, even if the target is out of reach
            if table.measured and table.path:
                try:
                    table.save()
                except OSError as error:
                    warnings.warn(
                        f"The latency table could not be saved to "
                        f"{table.path!r} ({error}): it will be measured again.",
                        stacklevel=2,
                    )
        rate = targets_lib.per_channel(channel_rates, groups, rates)
    elif rate is None:
        rate = DEFAULT_RATE
    masked = {id(layer) for layer in _maskable_offset_layers(graph)}

    def clone(layer):
        new = _keras_graph.layer_from_config(layer)
        if id(layer) in targets:
            new = FilterPruning(
                new,
                rate=rate,
                criterion=criterion,
                schedule=schedule,
                coupling=coupling,
                round_to=round_to,
                channel_rates=channel_rates.get(id(layer)),
                reference_shape=reference,
                name=WRAPPER_PREFIX + layer.name,
            )
        elif id(layer) in masked:
            new = ChannelMask(new, name=WRAPPER_PREFIX + layer.name)
        restores.append(_keras_graph.skip_initialization(new))
        return new

    restores = []
    pruned = keras.models.clone_model(model, clone_function=clone)
    _copy_weights(model, pruned)
    for restore in restores:
        restore()
    missing = len(targets) - len(wrappers(pruned))
    if missing:  # the clone did not reach layers the graph found
        raise ValueError(
            f"`model` could not be prepared: {missing} of the {len(targets)} "
            "prunable layers the channel graph found were not wrapped (a "
            "nested model keras.models.clone_model copies whole). Received: "
            f"model {model.name!r}"
        )
    return pruned


def _copy_weights(source, target, transform=None) -> None:
    """Copies weights from `source` to its clone `target`, layer by layer.

    `keras.models.clone_model` keeps the order of `layers`, so layers are
    paired by position (names can repeat inside nested models).
    """
    pairs = list(zip(source.layers, target.layers, strict=True))
    for src, layer in pairs:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        inner, plain = unwrap(layer), unwrap(src)
        if inner.name != plain.name:  # a Keras change in clone_model's order
            raise RuntimeError(
                f"clone_model reordered layers: {plain.name!r} vs {inner.name!r}"
            )
        weights = transform(src) if transform else _plain_weights(src)
        inner.set_weights(weights)


def _plain_weights(layer) -> list:
    return unwrap(layer).get_weights()


def masked_weights(wrapper: FilterPruning) -> list:
    """The wrapped layer's weights with pruned filters set to zero."""
    mask = wrapper.mask
    layer = wrapper.layer
    masked = {id(output_kernel(layer))}
    if layer.use_bias:
        masked.add(id(layer.bias))
    return [
        keras.ops.convert_to_numpy(v) * mask.astype(v.dtype)
        if id(v) in masked
        else keras.ops.convert_to_numpy(v)
        for v in layer.weights
    ]


def wrappers(model) -> list[FilterPruning]:
    """The `FilterPruning` layers of `model`, in layer order."""
    return [layer for layer in model.layers if isinstance(layer, FilterPruning)]


def pruned_model(model):
    """The model prepared by `prune_filters` that `model` trains, or None.

    `model` itself, or the `student` of a `keras.distillation.Distiller` (or
    of any model that trains a `student` attribute, as distillers do).
    """
    if wrappers(model):
        return model
    student = getattr(model, "student", None)
    if isinstance(student, keras.Model) and wrappers(student):
        return student
    return None


def strip_pruning(model: keras.Model) -> keras.Model:
    """Returns a plain model (no wrappers, same shapes) with the masks applied.

    Pruned filters (mask 0) get zero kernels and biases. A zeroed filter
    followed by BatchNormalization would still emit the constant
    `beta - gamma * mean / sqrt(var + eps)` (the "BN shift" that makes naive
    rebuilds disagree with the pruned network). keras-sfp removes it: where a
    BatchNormalization channel only receives pruned channels, its moving mean
    and beta are set to zero (likewise a following depthwise convolution's
    bias), so the channel is exactly zero everywhere downstream and `shrink`
    can remove it without changing any output. With
    `SoftFilterPrune(hard_epochs=...)` the network is trained with these
    channels already at zero, so stripping costs no accuracy.

    Args:
        model: A model prepared by `prune_filters`. Not modified.

    Returns:
        A new model of the same kind without `FilterPruning` wrappers.

    Raises:
        ValueError: If `model` is not a Sequential or functional model.

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3)(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> pruned = prune_filters(keras.Model(inputs, keras.layers.Dense(2)(x)))
    >>> any(isinstance(l, FilterPruning) for l in strip_pruning(pruned).layers)
    False
    """
    _keras_graph.check_graph_model(model)
    dead = zeros_lib.dead_offset_channels(model)

    def clone(layer):
        new = _keras_graph.layer_from_config(unwrap(layer))
        restores.append(_keras_graph.skip_initialization(new))
        return new

    restores = []
    stripped = keras.models.clone_model(model, clone_function=clone)
    _copy_weights(
        model,
        stripped,
        transform=lambda src: (
            masked_weights(src)
            if isinstance(src, FilterPruning)
            else _plain_weights(src)
        ),
    )
    for restore in restores:
        restore()
    for name, (offsets, channels) in dead.items():
        zeros_lib.zero_offsets(offsets(stripped.get_layer(name)), channels)
    return stripped
