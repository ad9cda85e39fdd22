"""A model's latency predicted from a `LatencyTable`, for channel counts.

HALP's cost model (Shen et al., NeurIPS 2022): the latency of a pruned
model is the sum of its convolution and dense layers' table entries,
interpolated between measured channel counts. `allocation.targets` uses it
for `prune_filters(target_latency=...)`; `keras_sfp.latency.table` measures
and caches the entries.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_sfp.allocation import counts as allocation
from keras_sfp.graph import flops
from keras_sfp.graph.channels import ChannelGraph
from keras_sfp.latency.table import LatencyTable, LayerSpec


def _grid(low: float, high: float, step: int, points: int) -> np.ndarray:
    """Up to `points` counts from `low` to `high`, inner ones multiples of `step`."""
    low, high = int(round(low)), int(round(high))
    if high <= low:
        return np.array([high])
    inner = np.round(np.linspace(low, high, points)[1:-1] / step) * step
    inner = inner[(inner > low) & (inner < high)]
    return np.unique(np.concatenate([[low], inner, [high]])).astype(np.int64)


def _weights(grid: np.ndarray, x: np.ndarray):
    """Linear interpolation indices and weights of `x` on `grid`."""
    if len(grid) == 1:
        zero = np.zeros(x.shape, np.int64)
        return zero, zero, np.zeros(x.shape)
    x = np.clip(x, grid[0], grid[-1])
    upper = np.clip(np.searchsorted(grid, x, side="right"), 1, len(grid) - 1)
    lower = upper - 1
    w = (x - grid[lower]) / (grid[upper] - grid[lower])
    return lower, upper, w


class LatencyModel:
    """A model's predicted latency as a function of the channels groups keep.

    Every convolution or dense call whose input or output channels belong to
    a varying group gets a grid of `points` counts per free axis (between the
    counts of the fewest channels and all channels), measured through
    `table`; other counts are interpolated bilinearly. Layers whose channels
    do not vary are looked up once: they add the same time to every
    candidate. Other layers (normalization, activations, merges) are not
    counted, as in HALP.

    Args:
        graph: The model's `ChannelGraph`.
        groups: The varying groups, in the order of the `kept` vectors.
        table: A `LatencyTable`.
        fewest: The fewest channels each group may keep.
        round_to: Inner grid points are multiples of this (the counts an
            allocation keeps). Defaults to 1.
        points: Grid points per axis (>= 2). Defaults to 5.
    """

    def __init__(
        self, graph, groups, table: LatencyTable, fewest, round_to=1, points=5
    ):
        index = {graph.find(g.sets[0].id): i for i, g in enumerate(groups)}
        lengths = np.array([g.length for g in groups], dtype=np.float64)
        fewest = np.asarray(fewest, dtype=np.float64)
        self.terms = []
        self.constant = 0.0  # layers whose channels do not vary
        for node in graph.nodes:
            if node.layer is None or node.is_input:
                continue
            if not flops.mac_terms(node.layer, node, graph.shape_of):
                continue
            cin = allocation.channel_form(graph, index, node.inputs[0])
            cout = allocation.channel_form(graph, index, node.outputs[0])
            spec = LayerSpec(node.layer, graph.shape_of(node.inputs[0]))
            if not cin[1] and not cout[1]:
                self.constant += table.lookup(spec, round(cin[0]), round(cout[0]))
                continue
            forms = []
            for form in (cin, cout):
                constant, coefs = form
                vector = np.zeros(len(groups))
                for g, value in coefs.items():
                    vector[g] = value
                forms.append((constant, vector))
            axes = [
                _grid(
                    c + v @ fewest,
                    c + v @ lengths,
                    math.lcm(round_to, spec.step),
                    points,
                )
                for c, v in forms
            ]
            if spec.tied:
                axes[1] = np.array([0])
            values = np.array(
                [[table.lookup(spec, i, o) for o in axes[1]] for i in axes[0]]
            )
            self.terms.append((forms, axes, values))

    def __call__(self, kept) -> np.ndarray | float:
        """Predicted milliseconds with `kept` channels per group, `(..., groups)`."""
        kept = np.asarray(kept, dtype=np.float64)
        total = np.full(kept.shape[:-1], self.constant)
        for forms, axes, values in self.terms:
            counts = [c + kept @ v for c, v in forms]
            i0, i1, wi = _weights(axes[0], counts[0])
            o0, o1, wo = _weights(axes[1], counts[1])
            total = total + (
                (1 - wi) * (1 - wo) * values[i0, o0]
                + (1 - wi) * wo * values[i0, o1]
                + wi * (1 - wo) * values[i1, o0]
                + wi * wo * values[i1, o1]
            )
        return total if total.shape else float(total)


def predicted_ms(model: keras.Model, table: LatencyTable) -> float:
    """A model's predicted latency: its convolution and dense layers' entries.

    Example:
    >>> inputs = keras.Input((8, 8, 4))
    >>> model = keras.Model(inputs, keras.layers.Conv2D(8, 3)(inputs))
    >>> predicted_ms(model, LatencyTable(timer=lambda layer, shape: 0.25))
    0.25
    """
    return float(LatencyModel(ChannelGraph(model), [], table, [])(np.zeros(0)))
