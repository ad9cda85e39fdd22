"""Read access to a Keras 3 functional graph, and rebuilding one.

Keras has no public API to walk a model's nodes; this module is the one place
that touches `keras.src` internals (the same ones `keras.models.clone_model`
uses), so a Keras upgrade that moves them breaks here and nowhere else.

Nested Sequential or functional models called once are seen through: their
nodes are listed in place, joined to the outer graph by *alias* nodes (an
outer tensor that is the nested model's input or output). A nested model
called more than once shares its weights between calls and stays one node.
"""

from __future__ import annotations

import collections
import dataclasses

import keras
from keras.src.models.functional import Functional
from keras.src.ops.function import map_graph

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

    @property
    def layer(self):
        return self.operation

    @property
    def name(self) -> str:
        if self.is_alias:
            return f"alias of {self.outputs[0].name}"
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


def _ordered(model) -> list:
    _, nodes_by_depth, _, _ = map_graph(list(model.inputs), list(model.outputs))
    return [
        node
        for depth in sorted(nodes_by_depth, reverse=True)
        for node in nodes_by_depth[depth]
        if node.operation is not None
    ]


def _inlinable(node, calls, names) -> bool:
    """A nested model called once whose layer names are free in the outer one."""
    op = node.operation
    if node.is_input or not is_graph_model(op) or calls[id(op)] != 1:
        return False
    try:
        check_graph_model(op)
    except ValueError:
        return False
    if len(keras.tree.flatten(op.inputs)) != len(node.input_tensors):
        return False
    inner = collections.Counter(layer.name for layer in all_layers(op))
    outer = names - inner - collections.Counter([op.name])
    return not set(inner) & set(outer)


def nodes(model) -> list[GraphNode]:
    """The model's nodes, inputs first, each after all nodes it depends on.

    Nested graph models called once are replaced by their own nodes between
    alias nodes.
    """
    ordered = _ordered(model)
    calls = collections.Counter(id(node.operation) for node in ordered)
    names = collections.Counter(layer.name for layer in all_layers(model))
    result = []
    for node in ordered:
        op = node.operation
        ins, outs = list(node.input_tensors), list(node.outputs)
        if not _inlinable(node, calls, names):
            result.append(GraphNode(op, ins, outs, node))
            continue
        inner_ins = keras.tree.flatten(op.inputs)
        inner_outs = keras.tree.flatten(op.outputs)
        result.extend(GraphNode(None, [o], [i], None) for o, i in zip(ins, inner_ins))
        result.extend(n for n in nodes(op) if not n.is_input)
        result.extend(GraphNode(None, [i], [o], None) for i, o in zip(inner_outs, outs))
    return result


def has_nested_models(model) -> bool:
    """True if `model` calls a Sequential or functional model as a layer."""
    return any(is_graph_model(node.operation) for node in _ordered(model))


def all_layers(model) -> list:
    """The layers of `model` and, recursively, of the models nested in it."""
    result = []
    for layer in model.layers:
        result.append(layer)
        if is_graph_model(layer):
            result.extend(all_layers(layer))
    return result


def fill_in(graph_node: GraphNode, tensor_map: dict):
    """The node's call arguments with tensors replaced via `tensor_map[id(t)]`."""
    return graph_node.node.arguments.fill_in(tensor_map)


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
    for node in graph_nodes:
        if node.is_input:
            continue
        if node.is_alias:
            tensor_map[id(node.outputs[0])] = tensor_map[id(node.inputs[0])]
            continue
        key = id(node.operation)
        if key not in made:
            made[key] = make_operation(node)
        args, kwargs = fill_in(node, tensor_map)
        outputs = made[key](*args, **kwargs)
        for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
            tensor_map[id(old)] = new
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


def layer_from_config(layer, config=None):
    """A new layer like `layer` from `config` (default: its own config).

    The config comes from a live object, not a file, so a `Lambda`'s Python
    function may be restored (Keras refuses that by default, for files).
    """
    config = layer.get_config() if config is None else config
    if isinstance(layer, keras.layers.Lambda):
        return layer.__class__.from_config(config, safe_mode=False)
    return layer.__class__.from_config(config)


def clone_operation(node: GraphNode):
    """A fresh copy of a node's layer with its weights (ops are reused)."""
    op = node.operation
    if not is_layer(op):
        return op
    return WeightsOnBuild(layer_from_config(op), op.get_weights())


def inline(model) -> keras.Model:
    """`model` itself, or a flat functional copy if it nests graph models."""
    if not has_nested_models(model):
        return model
    return rebuild(model, nodes(model), clone_operation, name=model.name)
