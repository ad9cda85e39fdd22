"""Read access to a Keras 3 functional graph, and rebuilding one.

Keras has no public API to walk a model's nodes; this module is the one place
that touches `keras.src` internals (the same ones `keras.models.clone_model`
uses), so a Keras upgrade that moves them breaks here and nowhere else.

Nested Sequential or functional models called once are seen through: their
nodes are listed in place, joined to the outer graph by *alias* nodes (an
outer tensor that is the nested model's input or output). A nested model
called more than once shares its weights between calls and stays one node.
Custom layers (classes of the user's) are seen through the same way when
their `call` can be traced on symbolic tensors (`trace_call`).
"""

from __future__ import annotations

import collections
import dataclasses
import warnings

import keras
import numpy as np
from keras.src.models.functional import Functional
from keras.src.ops.function import map_graph

from keras_sfp.graph import layer_rule

try:  # ConvNeXt's per-channel scale layer (re-exported for `rules`)
    from keras.src.applications.convnext import LayerScale
except ImportError:  # a Keras without it: no ConvNeXt to support

    class LayerScale:  # noqa: D101 - a placeholder no layer is an instance of
        pass


__all__ = ["LayerScale"]


@dataclasses.dataclass
class GraphNode:
    """One call of an operation in the graph, in topological order."""

    operation: object  # a Layer or keras.ops Operation; None for an alias
    inputs: list  # flattened KerasTensor inputs
    outputs: list  # flattened KerasTensor outputs
    node: object  # the Keras node (for `arguments.fill_in`); None for an alias
    opaque: str | None = None  # why a custom layer is not looked into
    rename: str | None = None  # the layer's name once inlined, if it must change
    in_block: bool = False  # a sublayer call of a traced custom layer

    @property
    def layer(self):
        return self.operation

    @property
    def name(self) -> str:
        if self.is_alias:
            return f"alias of {self.outputs[0].name}"
        if self.rename:
            return self.rename
        return getattr(self.operation, "name", type(self.operation).__name__)

    @property
    def is_alias(self) -> bool:
        return self.node is None

    @property
    def is_input(self) -> bool:
        return self.node is not None and bool(self.node.is_input)

    @property
    def constants(self) -> list:
        """The call's non-tensor arguments (for keras.ops nodes)."""
        flat = keras.tree.flatten(
            (self.node.arguments.args, self.node.arguments.kwargs)
        )
        return [a for a in flat if not isinstance(a, keras.KerasTensor)]


def is_graph_model(model) -> bool:
    """True for Sequential and functional models (graphs we can read)."""
    return isinstance(model, (keras.Sequential, Functional))


def is_layer(operation) -> bool:
    """True for a Keras layer; False for a bare `keras.ops` operation."""
    return isinstance(operation, keras.layers.Layer)


def check_graph_model(model, arg: str = "model") -> None:
    """Raises a `ValueError` unless `model` is a built Sequential/functional model."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{arg}` must be a keras.Model (Sequential or functional). "
            f"Received: {arg}={model!r} of type {type(model).__name__}"
        )
    if not is_graph_model(model):
        raise ValueError(
            f"`{arg}` must be a Sequential or functional keras.Model; subclassed "
            f"models have no graph to analyse. Received: {arg} of type "
            f"{type(model).__name__}"
        )
    try:
        model.inputs  # noqa: B018  (raises on unbuilt Sequential models)
        built = model.inputs is not None and model.outputs is not None
    except (AttributeError, ValueError):
        built = False
    if not built:
        raise ValueError(
            f"`{arg}` must be built with a known input shape (e.g. start a "
            f"Sequential model with keras.Input). Received: an unbuilt "
            f"{type(model).__name__} named {model.name!r}"
        )


def _ordered(inputs, outputs) -> list:
    _, nodes_by_depth, _, _ = map_graph(list(inputs), list(outputs))
    return [
        node
        for depth in sorted(nodes_by_depth, reverse=True)
        for node in nodes_by_depth[depth]
        if node.operation is not None
    ]


def nodes(model) -> list[GraphNode]:
    """The model's nodes, inputs first, each after all nodes it depends on.

    Nested graph models called once, and custom layers whose `call` can be
    traced (`trace_call`), are replaced by their own nodes between alias
    nodes; nodes that no model output depends on are left out.
    """
    ordered = _ordered(model.inputs, model.outputs)
    return _used(_expand(ordered, all_layers(model)), model.outputs)


def _expand(
    ordered, layers, prefix: str = "", in_block: bool = False
) -> list[GraphNode]:
    """GraphNodes of `ordered`, inlining what `_inner` can look into.

    The layers of a custom layer whose sublayer names repeat elsewhere (each
    instance of a block class naming its convolution "conv1") are renamed
    `<block name>_<name>` once inlined; `prefix` carries that down, and
    `in_block` that the nodes come from a custom layer's `call`.
    """
    calls = collections.Counter(id(node.operation) for node in ordered)
    result = []
    for node in ordered:
        op = node.operation
        ins, outs = list(node.input_tensors), list(node.outputs)
        inner = None if node.is_input else _inner(node, calls[id(op)], layers)
        if inner is None or isinstance(inner, str):
            rename = prefix + op.name if prefix and is_layer(op) else None
            result.append(
                GraphNode(op, ins, outs, node, inner, rename, in_block=in_block)
            )
            continue
        inner_ins, inner_outs, inner_nodes, clash = inner
        inner_prefix = prefix + (f"{op.name}_" if clash else "")
        block = in_block or not is_graph_model(op)
        result.extend(GraphNode(None, [o], [i], None) for o, i in zip(ins, inner_ins))
        result.extend(
            n
            for n in _expand(inner_nodes, layers, inner_prefix, block)
            if not n.is_input
        )
        result.extend(GraphNode(None, [i], [o], None) for i, o in zip(inner_outs, outs))
    return result


def _used(graph_nodes, outputs) -> list[GraphNode]:
    """`graph_nodes` without those no tensor of `outputs` depends on."""
    needed = {id(t) for t in outputs}
    kept = []
    for node in reversed(graph_nodes):
        if node.is_input or any(id(t) in needed for t in node.outputs):
            kept.append(node)
            needed.update(id(t) for t in node.inputs)
    return kept[::-1]


def _inner(node, calls: int, layers):
    """`(inputs, outputs, ordered nodes, rename)` to inline a call, or why not.

    `rename` is True when the inlined layers' names must be prefixed (they
    repeat elsewhere in the model); why not is a str.

    None for an operation that is not a nested model or a custom layer.
    """
    op = node.operation
    if is_graph_model(op):
        if calls != 1:
            return None
        try:
            check_graph_model(op)
        except ValueError:
            return None
        if len(keras.tree.flatten(op.inputs)) != len(node.input_tensors):
            return None
        if _clashes(op, layers):
            return None
        inner_ins = keras.tree.flatten(op.inputs)
        if all(
            tuple(i.shape) == tuple(o.shape)
            for i, o in zip(inner_ins, node.input_tensors)
        ):
            inner_outs = keras.tree.flatten(op.outputs)
            return inner_ins, inner_outs, _ordered(inner_ins, inner_outs), False
        # Built for other (less known) shapes: trace it with the call's.
        traced = trace_call(op, node)
        return None if isinstance(traced, str) else (*traced, False)
    if not _is_custom(op):
        return None
    traced = trace_call(op, node)
    return traced if isinstance(traced, str) else (*traced, bool(_clashes(op, layers)))


def _is_custom(op) -> bool:
    """A layer class of the user's (not Keras', not keras-sfp's, no rule)."""
    if not is_layer(op) or is_graph_model(op):
        return False
    package = type(op).__module__.split(".")[0]
    return package not in ("keras", "keras_sfp") and not layer_rule.is_registered(op)


def _clashes(op, layers) -> list:
    """Names of `op`'s sublayers also used by other layers of the model."""
    inner = [
        layer
        for layer in _sublayers(op)
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    inside = {id(layer) for layer in inner} | {id(op)}
    outside = {layer.name for layer in layers if id(layer) not in inside}
    return sorted({layer.name for layer in inner} & outside)


def _sublayers(op) -> list:
    if is_graph_model(op):
        return all_layers(op)
    return list(op._flatten_layers(include_self=False))


def trace_call(op, node):
    """The nodes `op.call` creates on symbolic inputs shaped like `node`'s.

    Calling a layer's `call` (not the layer) on fresh `KerasTensor`s runs
    its sublayers and `keras.ops` calls symbolically, which records them as
    a functional graph: a custom block layer made of Conv2D,
    BatchNormalization and `keras.ops` becomes nodes the channel graph can
    look through and `rebuild` can copy. Nothing of `op` is changed: the
    nodes the trace appends to its sublayers are removed again.

    Returns:
        `(inputs, outputs, ordered keras nodes)`, or a string saying why the
        call cannot be traced (it has weights of its own, its graph depends
        on `training`, it uses something other than sublayers and
        `keras.ops`, ...). Such a layer stays a boundary.
    """
    sublayers = _sublayers(op)
    own = {id(v) for v in op.variables} - {
        id(v) for layer in sublayers for v in layer.variables
    }
    if own:
        names = [v.path for v in op.variables if id(v) in own]
        return f"has weights of its own, outside its sublayers ({names[:3]})"
    kwargs = node.arguments.kwargs
    if kwargs.get("training") is not None:
        return f"is called with training={kwargs['training']!r}"
    fresh = {
        id(t): keras.KerasTensor(t.shape, dtype=t.dtype) for t in node.input_tensors
    }
    args, kwargs = node.arguments.fill_in(fresh)
    inner_ins = [fresh[id(t)] for t in node.input_tensors]
    unique_ins = list({id(t): t for t in inner_ins}.values())
    modes = [None]
    if not is_graph_model(op) and getattr(op, "_call_has_training_arg", False):
        modes = [None, True, False]
    watched = {id(o): o for o in sublayers}
    if is_graph_model(op):
        watched.update((id(o), o) for o in op.operations)
    lengths = {
        k: (len(o._inbound_nodes), len(o._outbound_nodes)) for k, o in watched.items()
    }
    traces = []
    try:
        for training in modes:
            call_kwargs = dict(kwargs)
            if training is not None:
                call_kwargs["training"] = training
            outs = keras.tree.flatten(op.call(*args, **call_kwargs))
            if not outs or not all(isinstance(t, keras.KerasTensor) for t in outs):
                return "returns something other than tensors"
            computed = [t for t in outs if all(t is not i for i in unique_ins)]
            ordered = _ordered(unique_ins, computed) if computed else []
            traces.append((outs, ordered))
        signatures = {_signature(ordered) for _, ordered in traces}
    except Exception as error:  # noqa: BLE001 - any failure leaves a boundary
        message = str(error).strip().splitlines()[0][:120] if str(error) else ""
        return f"could not be traced ({type(error).__name__}: {message})"
    finally:
        for key, o in watched.items():
            inbound, outbound = lengths[key]
            del o._inbound_nodes[inbound:]
            del o._outbound_nodes[outbound:]
        for _, ordered in traces:  # layers `call` uses without tracking them
            _forget(ordered)
    if len(signatures) > 1:
        return "builds a different graph for training and inference"
    outs, ordered = traces[0]
    fixed = [
        n.operation.name
        for n in ordered
        if n.arguments.kwargs.get("training") is not None
    ]
    if fixed:
        # Inlined, such a call would follow fit's training flag instead.
        return f"calls sublayers with a fixed `training` value ({fixed[:3]})"
    return inner_ins, outs, ordered


def _forget(ordered) -> None:
    """Removes traced nodes from their operations' node lists."""
    for node in ordered:
        for owner, attribute in [(node.operation, "_inbound_nodes")] + [
            (t._keras_history.operation, "_outbound_nodes")
            for t in node.input_tensors
            if getattr(t, "_keras_history", None) is not None
        ]:
            nodes_list = getattr(owner, attribute, None)
            if nodes_list is not None:
                nodes_list[:] = [n for n in nodes_list if n is not node]


def _signature(ordered) -> tuple:
    """What a traced graph computes, the `training` flags aside."""
    rows = []
    for node in ordered:
        op = node.operation
        kwargs = {k: v for k, v in node.arguments.kwargs.items() if k != "training"}
        constants = [
            repr(a)
            for a in keras.tree.flatten((node.arguments.args, kwargs))
            if not isinstance(a, keras.KerasTensor)
        ]
        if is_layer(op):
            key = id(op)
        else:  # a keras.ops operation made by this trace: its config, unnamed
            key = repr({k: v for k, v in op.get_config().items() if k != "name"})
        rows.append((type(op).__name__, key, tuple(constants)))
    return tuple(rows)


def all_layers(model) -> list:
    """The layers of `model` and, recursively, of the models and custom layers in it."""
    result = []
    for layer in model.layers:
        result.append(layer)
        if is_graph_model(layer):
            result.extend(all_layers(layer))
        elif _is_custom(layer):
            result.extend(layer._flatten_layers(include_self=False))
    return result


def fill_in(graph_node: GraphNode, tensor_map: dict):
    """The node's call arguments with tensors replaced via `tensor_map[id(t)]`."""
    return graph_node.node.arguments.fill_in(tensor_map)


def has_unknown_sizes(model) -> bool:
    """Whether an input of `model` has a dimension other than the batch's
    left unknown (`keras.Input((None, None, 3))`)."""
    return any(None in tuple(t.shape)[1:] for t in model.inputs)


def check_input_shape(model, input_shape) -> list[tuple] | None:
    """`input_shape` (one shape, or one per model input, batch excluded) as a
    list of tuples of ints matching `model`'s inputs, or None for None."""
    if input_shape is None:
        return None
    shapes = list(input_shape)
    if shapes and not isinstance(shapes[0], (list, tuple)):
        shapes = [shapes]
    ok = len(shapes) == len(model.inputs)
    for shape, tensor in zip(shapes, model.inputs) if ok else ():
        known = tuple(tensor.shape)[1:]
        ok = ok and len(shape) == len(known)
        for value, want in zip(shape, known) if ok else ():
            ok = ok and _is_size(value) and want in (None, int(value))
    if not ok:
        wanted = [tuple(t.shape)[1:] for t in model.inputs]
        raise ValueError(
            "`input_shape` must give the size of every dimension of the model's "
            f"input{'s' if len(wanted) > 1 else ''} but the batch's, matching "
            f"{wanted[0] if len(wanted) == 1 else wanted} where known. "
            f"Received: input_shape={input_shape!r}"
        )
    return [tuple(int(v) for v in shape) for shape in shapes]


def _is_size(value) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, np.integer))
        and value > 0
    )


def _propagate(graph_nodes, tensor_map: dict, call) -> None:
    """Walks `graph_nodes` in order: each node's `call(node, args, kwargs)`
    gets its arguments with tensors taken from `tensor_map` (by `id` of the
    original tensor), and its outputs are recorded there in turn."""
    for node in graph_nodes:
        if node.is_input:
            continue
        if node.is_alias:
            tensor_map[id(node.outputs[0])] = tensor_map[id(node.inputs[0])]
            continue
        args, kwargs = fill_in(node, tensor_map)
        outputs = call(node, args, kwargs)
        for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
            tensor_map[id(old)] = new


def reference_shapes(model, graph_nodes, input_shapes: list) -> dict:
    """`{id(tensor): shape}` of every tensor of `model`'s graph when its
    inputs have `input_shapes` (`check_input_shape`'s, batch excluded).

    Shapes are computed symbolically (`compute_output_spec`): nothing runs
    and no node is added to the model's layers.
    """
    tensor_map = {
        id(tensor): keras.KerasTensor((tensor.shape[0], *shape), dtype=tensor.dtype)
        for tensor, shape in zip(model.inputs, input_shapes)
    }
    _propagate(
        graph_nodes,
        tensor_map,
        lambda node, args, kwargs: node.operation.compute_output_spec(*args, **kwargs),
    )
    return {key: tuple(value.shape) for key, value in tensor_map.items()}


_ZEROS = keras.initializers.Zeros()


def skip_initialization(layer):
    """Makes `layer` (and the layers it wraps) build with zero weights.

    For a layer whose weights are set right after it is built: a random
    initialization would be thrown away, and on JAX each weight shape costs
    an XLA compilation of the random generator (seconds for a ResNet).

    Returns:
        A function that puts the layer's own initializers back, so that its
        config, and any later re-initialization, are unchanged.
    """
    saved = []
    while layer is not None:
        for name, value in list(vars(layer).items()):
            if name.endswith("_initializer") and isinstance(
                value, keras.initializers.Initializer
            ):
                saved.append((layer, name, value))
        layer = getattr(layer, "layer", None)  # keras.layers.Wrapper
    for owner, name, _ in saved:
        setattr(owner, name, _ZEROS)

    def restore() -> None:
        for owner, name, value in saved:
            setattr(owner, name, value)

    return restore


class WeightsOnBuild:
    """Calls a new layer, then sets its weights once it has been built."""

    def __init__(self, layer, weights):
        self.layer = layer
        self.weights = weights
        self.loaded = False
        self._restore = skip_initialization(layer)

    def __call__(self, *args, **kwargs):
        outputs = self.layer(*args, **kwargs)
        if not self.loaded:
            self.layer.set_weights(self.weights)
            self._restore()
            self.loaded = True
        return outputs


def rebuild(model, graph_nodes, make_operation, name: str) -> keras.Model:
    """A new functional model: `model`'s graph with every operation replaced.

    Args:
        model: The model whose inputs and outputs are rebuilt.
        graph_nodes: `nodes(model)` (or a list with the same tensors).
        make_operation: `GraphNode -> callable`, called once per layer; the
            callable is then called with the node's arguments.
        name: The new model's name.
    """
    tensor_map, new_inputs = {}, []
    for tensor in model.inputs:
        new = keras.Input(
            batch_shape=tensor.shape, dtype=tensor.dtype, name=tensor.name
        )
        tensor_map[id(tensor)] = new
        new_inputs.append(new)
    made = {}

    def call(node, args, kwargs):
        if id(node.operation) not in made:
            made[id(node.operation)] = make_operation(node)
        return made[id(node.operation)](*args, **kwargs)

    _propagate(graph_nodes, tensor_map, call)
    new_outputs = [tensor_map[id(t)] for t in model.outputs]
    return keras.Model(
        _structure(model, "_inputs_struct", new_inputs),
        _structure(model, "_outputs_struct", new_outputs),
        name=name,
    )


def _structure(model, attribute: str, flat: list):
    """`flat` packed like the model's inputs or outputs (a dict stays a dict)."""
    struct = getattr(model, attribute, None)
    if struct is not None and len(keras.tree.flatten(struct)) == len(flat):
        return keras.tree.pack_sequence_as(struct, flat)
    return flat if len(flat) > 1 else flat[0]


def layer_from_config(layer, config=None, node: GraphNode | None = None):
    """A new layer like `layer` from `config` (default: its own config).

    The config comes from a live object, not a file, so a `Lambda`'s Python
    function may be restored (Keras refuses that by default, for files).
    A layer of the user's that `node` takes out of a custom block (or that
    was copied from one) records no build config (`_build_on_call`).

    A layer (or `keras.ops` operation) whose `get_config` raises
    `NotImplementedError` (created with arguments Keras cannot serialize)
    cannot be copied: `layer` itself is returned, shared by reference
    (`shared`), with a warning.
    """
    if config is None:
        config = config_or_none(layer)
        if config is None:
            return shared(layer)
    if isinstance(layer, keras.layers.Lambda):
        new = layer.__class__.from_config(config, safe_mode=False)
    else:
        new = layer.__class__.from_config(config)
    if (node is not None and node.in_block) or _builds_on_call(layer):
        _build_on_call(new)
    return new


def config_or_none(operation) -> dict | None:
    """`operation.get_config()`, or None if it raises `NotImplementedError`."""
    try:
        return operation.get_config()
    except NotImplementedError:
        return None


def shared(operation):
    """`operation` itself, for a new model, with a warning if it is a layer.

    Used for layers whose `get_config` raises `NotImplementedError`: the new
    model calls the same layer, so it shares its weights with the model it
    came from, and saving it to `.keras` fails as saving that model does.
    """
    if is_layer(operation):
        warnings.warn(
            f"Layer {operation.name!r} of type {type(operation).__name__} cannot "
            "be copied: its get_config() raises NotImplementedError (it was "
            "created with arguments Keras cannot serialize). keras-sfp leaves "
            "its channels intact and uses the layer itself in the new model, "
            "which therefore shares its weights with the original, and cannot "
            "be saved to a .keras file until the layer implements get_config() "
            "(saving raises that NotImplementedError).",
            stacklevel=3,
        )
    return operation


def _no_build_config():
    return None


def _builds_on_call(layer) -> bool:
    return vars(layer).get("get_build_config") is _no_build_config


def _build_on_call(layer) -> None:
    """Makes a layer of the user's save no build config.

    Inside its custom block, a sublayer's build shapes are never saved: the
    block rebuilds it when called, with the tuple shapes of `KerasTensor`s.
    Taken out of the block (inlined), it is a layer of a functional model,
    whose build config Keras saves as JSON and rebuilds from with lists: a
    `build` computing `input_shape[:-1] + (c,)` then fails to load. Without
    a build config it is built, as in its block, when the loaded model
    calls it. Layers that save a build config of their own keep it.
    """
    package = type(layer).__module__.split(".")[0]
    if package in ("keras", "keras_sfp"):
        return
    if type(layer).get_build_config is not keras.layers.Layer.get_build_config:
        return
    layer.get_build_config = _no_build_config


def clone_operation(node: GraphNode):
    """A fresh copy of a node's layer with its weights (ops are reused)."""
    op = node.operation
    if not is_layer(op):
        return op
    config = config_of(node)
    if config is None:  # cannot be copied: used as it is
        return shared(op)
    new = layer_from_config(op, config, node)
    return WeightsOnBuild(new, op.get_weights())


def config_of(node: GraphNode) -> dict | None:
    """The config of a node's layer, with the name it takes once inlined.

    None for a layer whose `get_config` raises `NotImplementedError`.
    """
    config = config_or_none(node.operation)
    if config is not None and node.rename:
        config["name"] = node.rename
    return config


def inline(model) -> keras.Model:
    """`model` itself, or a flat functional copy if `nodes` inlines anything."""
    graph_nodes = nodes(model)
    if not any(node.is_alias for node in graph_nodes):
        return model
    return rebuild(model, graph_nodes, clone_operation, name=model.name)
