"""A readable report of a model's channel groups: what can be pruned, and why not."""

from __future__ import annotations

import dataclasses

import keras

from keras_sfp.graph.channels import ChannelGraph

_ROW = "{:>5}  {:>8}  {:<8}  {:<40}  {}"


@dataclasses.dataclass
class GroupReport:
    """One channel group: its size, the layers producing it, and its status."""

    id: int
    channels: int
    producers: list  # layer names
    prunable: bool
    reasons: list  # why it is not prunable (empty if it is)


@dataclasses.dataclass
class GraphReport:
    """What `describe` found. `str(report)` is a table."""

    model: str
    groups: list  # GroupReport
    boundaries: list  # (layer name, reason) for layers the graph stops at

    @property
    def prunable_groups(self) -> list:
        return [g for g in self.groups if g.prunable]

    def __str__(self) -> str:
        producers = sum(len(g.producers) for g in self.prunable_groups)
        lines = [
            f"Channel graph of {self.model!r}: {len(self.groups)} groups, "
            f"{len(self.prunable_groups)} prunable ({producers} layers to prune), "
            f"{len(self.boundaries)} boundaries",
            _ROW.format("group", "channels", "prunable", "producers", "why not"),
        ]
        for g in self.groups:
            names = ", ".join(g.producers[:2]) or "-"
            if len(g.producers) > 2:
                names += f" (+{len(g.producers) - 2})"
            why = "" if g.prunable else "; ".join(g.reasons)
            prunable = "yes" if g.prunable else "no"
            lines.append(_ROW.format(g.id, g.channels, prunable, names, why).rstrip())
        if self.boundaries:
            lines.append("Boundaries (channels crossing them are never pruned):")
            lines.extend(f"  {reason}" for _, reason in self.boundaries)
        return "\n".join(lines)


def describe(model: keras.Model, skip=None) -> GraphReport:
    """Lists a model's channel groups, which are prunable, and why the others are not.

    A group is a set of channels that must be pruned with the same indices
    (the outputs of convolutions joined by residual sums, say). Groups that
    reach a model output, cross a layer the channel graph does not understand
    (a *boundary*, such as a `Lambda` or an unregistered custom layer), or
    would not be zero where they are consumed are not prunable; the report
    says which layer is responsible. Register custom layers with
    `keras_sfp.register_layer` to let channels through them.

    Args:
        model: A built Sequential or functional model. Not modified.
        skip: Layer names to leave alone, as for `prune_filters`. Defaults to
            None.

    Returns:
        A `GraphReport`; print it for a table.

    Raises:
        ValueError: If `model` is not a built Sequential or functional model.

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> report = describe(keras.Model(inputs, keras.layers.Dense(2, name="fc")(x)))
    >>> [(g.producers, g.prunable) for g in report.groups]
    [([], False), (['conv'], True), (['fc'], False)]
    """
    graph = ChannelGraph(model, skip=skip)
    groups = [
        GroupReport(
            id=g.id,
            channels=g.length,
            producers=[graph.names.get(id(p), p.name) for p in g.producers],
            prunable=g.prunable,
            reasons=list(g.blocked) or ([] if g.producers else ["no producer"]),
        )
        for g in graph.groups()
    ]
    return GraphReport(model.name, groups, list(graph.boundaries))
