"""Read access to a Keras 3 functional graph.

Keras has no public API to walk a model's nodes; this module is the one place
that touches `keras.src` internals (the same ones `keras.models.clone_model`
uses), so a Keras upgrade that moves them breaks here and nowhere else.
"""

from __future__ import annotations

import dataclasses

import keras
from keras.src.models.functional import Functional
from keras.src.ops.function import map_graph


@dataclasses.dataclass
class GraphNode:
    """One call of an operation in the graph, in topological order."""

    operation: object
    inputs: list  # flattened KerasTensor inputs
    outputs: list  # flattened KerasTensor outputs
    node: object  # the Keras node (for `arguments.fill_in`)

    @property
    def layer(self):
        return self.operation

    @property
    def name(self) -> str:
        return getattr(self.operation, "name", type(self.operation).__name__)

    @property
    def is_input(self) -> bool:
        return bool(self.node.is_input)


def is_graph_model(model) -> bool:
    """True for Sequential and functional models (graphs we can read)."""
    return isinstance(model, (keras.Sequential, Functional))


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


def nodes(model) -> list[GraphNode]:
    """The model's nodes, inputs first, each after all nodes it depends on."""
    inputs, outputs = list(model.inputs), list(model.outputs)
    _, nodes_by_depth, _, _ = map_graph(inputs, outputs)
    result = []
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if node.operation is None:
                continue
            result.append(
                GraphNode(
                    operation=node.operation,
                    inputs=list(node.input_tensors),
                    outputs=list(node.outputs),
                    node=node,
                )
            )
    return result


def fill_in(graph_node: GraphNode, tensor_map: dict):
    """The node's call arguments with tensors replaced via `tensor_map[id(t)]`."""
    return graph_node.node.arguments.fill_in(tensor_map)
