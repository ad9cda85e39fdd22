"""How much each channel of a group matters: one scoring rule for the library.

Used by the pruning events (which channels a group loses) and by the
allocations (how many channels each group keeps: `target_latency` and
`allocation="global"` in `prune_filters`). A member layer's filters are
scored with the criterion (`keras_sfp.criteria`); for the BatchNormalization-
aware criteria (`"l2_bn"`) each score is multiplied by the scale of the
BatchNormalization called directly on the layer's output, if any.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_sfp.core import criteria
from keras_sfp.core.wrapper import output_kernel, unwrap
from keras_sfp.graph.channels import ChannelGraph


def batch_norms_after(graph: ChannelGraph) -> dict:
    """`id(layer)` -> the BatchNormalization that normalises its output.

    Only a channels-last BatchNormalization called directly on the output of
    a layer counts: its scale then applies to exactly that layer's filters.
    Keys are the layers of `graph`'s model (wrapped or not); values are the
    unwrapped BatchNormalization layers.
    """
    found = {}
    for node in graph.nodes:
        layer = unwrap(node.layer) if node.layer is not None else None
        if not isinstance(layer, keras.layers.BatchNormalization) or not node.inputs:
            continue
        axis = layer.axis if isinstance(layer.axis, int) else None
        rank = len(node.inputs[0].shape)
        if axis not in (-1, rank - 1):
            continue
        history = getattr(node.inputs[0], "_keras_history", None)
        if history is not None:
            found[id(history.operation)] = layer
    return found


def member_scores(member, criterion, batch_norms: dict) -> np.ndarray:
    """Criterion scores of a group member's channels `(layer, start, length)`."""
    layer, start, length = member
    kernel = keras.ops.convert_to_numpy(output_kernel(unwrap(layer)))
    bn_scale = None
    bn = batch_norms.get(id(layer))
    if bn is not None and criteria.is_bn_aware(criterion):
        gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else None
        bn_scale = criteria.batch_norm_scale(
            gamma, keras.ops.convert_to_numpy(bn.moving_variance), bn.epsilon
        )[start : start + length]
    return criteria.score(criterion, kernel[..., start : start + length], bn_scale)


def group_scores(members, criterion, batch_norms: dict) -> np.ndarray:
    """A group's channel scores: its members' scores summed (a pruning event)."""
    return sum(member_scores(m, criterion, batch_norms) for m in members)


def importance_lost(groups, criterion, batch_norms: dict) -> list[np.ndarray]:
    """Per group, the importance removed when it keeps `k` channels (`k` = 0..n).

    Each member layer's scores are normalised to sum to 1, so every layer
    weighs the same wherever it is (filter norms are not comparable across
    layers), and summed over the group's members: a channel shared by more
    layers matters more. Keeping `k` channels removes the lowest `n - k`.
    """
    lost = []
    for group in groups:
        total = np.zeros(group.length)
        for member in group.members:
            scores = member_scores(member, criterion, batch_norms)
            norm = float(np.sum(scores))
            length = member[2]
            total += scores / norm if norm > 0 else np.full(length, 1.0 / length)
        removed = np.concatenate([[0.0], np.cumsum(np.sort(total))])
        lost.append(removed[::-1])  # entry k: the lowest n - k removed
    return lost
