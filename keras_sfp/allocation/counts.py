"""How many channels each group keeps: hardware-friendly multiples, MACs targets.

SFP prunes `floor(channels * rate)` channels of every group (He et al.,
IJCAI 2018). Two things make that a poor deployment choice, and this module
fixes both:

- Channel counts such as 11, 22 or 45 do not fill the vector or tensor-core
  width of the hardware (8 or 16 float lanes on CPUs, multiples of 8 for
  tensor cores), so the shrunk model does not get the speed its MACs
  promise. `round_to=q` keeps multiples of `q`. Rounding every group *up*
  (Torch-Pruning's `round_to`) gives much of the requested reduction away
  (a 16-channel stage keeps 16 of 16 at `q=8`); `balanced_kept` rounds each
  group to a *nearby* multiple and picks up or down across groups so that
  the model's total MACs stay those of the unrounded counts.
- Users think in cost, not in rates: `prune_filters(model, target_macs=0.5)`
  finds, by bisection, the rate whose per-group counts leave that fraction
  of the model's MACs (`rate_for_macs`).

Both rest on `MacModel`: the model's multiply-accumulates as a function of
the channels each group keeps, exact for the model `shrink` builds (every
pruned channel of a group is removed from every tensor holding it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from keras_sfp.core.wrapper import FilterPruning
from keras_sfp.graph import flops
from keras_sfp.graph.channels import ChannelGraph, Group


def pruned_groups(graph: ChannelGraph, is_pruned=None) -> list[Group]:
    """Prunable groups whose every producer is pruned, in `graph.groups()` order.

    The groups a `SoftFilterPrune` event prunes with `coupling="group"`.

    Args:
        graph: A `ChannelGraph`.
        is_pruned: `producer -> bool`; defaults to "is a `FilterPruning`
            wrapper" (a model prepared by `prune_filters`).
    """
    if is_pruned is None:
        is_pruned = lambda layer: isinstance(layer, FilterPruning)  # noqa: E731
    return [
        group
        for group in graph.groups()
        if group.prunable
        and group.members
        and all(is_pruned(m[0]) for m in group.members)
    ]


def num_pruned(channels: int, rate: float) -> int:
    """How many of `channels` to prune: floor(channels * rate), as the reference.

    At least one channel is always kept.

    Example:
    >>> num_pruned(16, 0.3), num_pruned(10, 0.3), num_pruned(2, 0.9)
    (4, 3, 1)
    """
    pruned = int(math.floor(channels * rate + 1e-9))
    return min(pruned, channels - 1)


def channel_form(graph: ChannelGraph, index: dict, tensor) -> tuple[float, dict]:
    """A tensor's channels as `(constant, {group index: multiplier})`.

    `index` maps the root set id of each varying group to its position in
    the `kept` vectors; channels of other groups are constant.
    """
    info = graph.tensors.get(id(tensor))
    if info is None:
        return float(tensor.shape[-1]), {}
    scale = info.spatial or 1
    constant, coefs = 0.0, {}
    for set_id, length in info.segments:
        group = index.get(graph.find(set_id))
        if group is None:
            constant += scale * length
        else:
            coefs[group] = coefs.get(group, 0.0) + scale
    return constant, coefs


class MacModel:
    """A model's MACs as a function of the channels each group keeps.

    Every channel count of every counted layer call (`flops.mac_terms`) is
    written as a constant plus the kept counts of the groups whose channels
    the tensor holds, so `macs(kept)` is a sum of products evaluated with
    NumPy, for many candidate allocations at once.

    Args:
        graph: The `ChannelGraph` of the model.
        groups: The groups whose kept counts vary (prunable groups of
            `graph`), in the order of the `kept` vectors.
    """

    def __init__(self, graph: ChannelGraph, groups: Sequence[Group]):
        self.lengths = np.array([g.length for g in groups], dtype=np.int64)
        self.blocks = np.array([g.blocks for g in groups], dtype=np.int64)
        index = {graph.find(g.sets[0].id): i for i, g in enumerate(groups)}
        rows = []  # (coef, C_in as (const, coefs), C_out likewise, a, b)
        constant = 0
        for node in graph.nodes:
            if node.layer is None or node.is_input:
                continue
            terms = flops.mac_terms(node.layer, node, graph.shape_of)
            if not terms:
                # Nested models (counted through), layers not counted (0).
                constant += flops.node_macs(node.layer, node, graph.shape_of)
                continue
            cin = channel_form(graph, index, node.inputs[0])
            cout = channel_form(graph, index, node.outputs[0])
            for coef, a, b in terms:
                rows.append((coef, cin, cout, a, b))
        n = len(groups)
        self._constant = float(constant)
        self._coef = np.array([r[0] for r in rows], dtype=np.float64)
        self._in = self._linear([r[1] if r[3] else (1.0, {}) for r in rows], n)
        self._out = self._linear([r[2] if r[4] else (1.0, {}) for r in rows], n)

    @staticmethod
    def _linear(counts, n) -> tuple[np.ndarray, np.ndarray]:
        constants = np.array([c for c, _ in counts], dtype=np.float64)
        matrix = np.zeros((len(counts), n), dtype=np.float64)
        for row, (_, coefs) in enumerate(counts):
            for group, value in coefs.items():
                matrix[row, group] = value
        return constants, matrix

    def macs(self, kept) -> np.ndarray | float:
        """MACs with `kept` channels per group; `kept` may be `(..., groups)`."""
        kept = np.asarray(kept, dtype=np.float64)
        cin = self._in[0] + kept @ self._in[1].T
        cout = self._out[0] + kept @ self._out[1].T
        return self._constant + (cin * cout) @ self._coef

    @property
    def total(self) -> float:
        """MACs with every channel kept."""
        return float(self.macs(self.lengths))


def exact_kept(lengths, rate) -> np.ndarray:
    """Channels each group keeps at `rate` (one, or one per group) unrounded."""
    rates = np.broadcast_to(np.asarray(rate, dtype=np.float64), np.shape(lengths))
    return np.array(
        [n - num_pruned(int(n), float(r)) for n, r in zip(lengths, rates)],
        dtype=np.int64,
    )


def _options(length: int, exact: int, round_to: int, blocks: int = 1) -> np.ndarray:
    """The counts a group may keep: multiples of `round_to`, or all channels.

    A group of `blocks` blocks (grouped convolutions) keeps multiples of
    `blocks` too (the same count per block).
    """
    step = round_to
    if blocks > 1:
        step = math.lcm(round_to, blocks)
        if step >= length:
            step = blocks  # too narrow for round_to: only keep blocks even
    elif round_to == 1 or length <= round_to:
        return np.array([exact])  # nothing to round to
    multiples = np.arange(step, length + 1, step)
    return np.unique(np.append(multiples, length))


def fewest_kept(lengths, round_to: int, blocks=None) -> np.ndarray:
    """The fewest channels each group can keep (its smallest option)."""
    blocks = np.ones(len(lengths), np.int64) if blocks is None else blocks
    return np.array(
        [_options(int(n), 1, round_to, int(b))[0] for n, b in zip(lengths, blocks)],
        dtype=np.int64,
    )


def balanced_kept(
    mac_model: MacModel | None,
    lengths,
    rate: float,
    round_to: int,
    target: float | None = None,
    blocks=None,
) -> np.ndarray:
    """Kept counts that are multiples of `round_to`, with the MACs of the request.

    Each group starts at the multiple of `round_to` nearest its unrounded
    count (`exact_kept`; all its channels also count as a multiple, and a
    group of `round_to` channels or fewer is not rounded, unless grouped
    convolutions split it into `blocks`: it then keeps a multiple of
    `lcm(round_to, blocks)`, or of `blocks` if it is too narrow for that). Then, one
    `round_to` step at a time, the group whose step up or down brings the
    model's MACs closest to `target` moves, until no step helps: the
    rounding errors of the groups cancel instead of adding up.

    Args:
        mac_model: The `MacModel` of the groups, or None to round each group
            to its nearest multiple independently.
        lengths: Channels per group.
        rate: The pruning rate, or one per group.
        round_to: The multiple, >= 1.
        target: MACs to approach. Defaults to the MACs of the unrounded
            counts.
        blocks: Blocks per group that must keep equal counts (grouped
            convolutions; counts are then multiples of `blocks` too).
            Defaults to `mac_model.blocks`, or 1 per group.

    Returns:
        An int64 array of kept channels per group.

    Example:
    >>> balanced_kept(None, [16, 64, 10], 0.3, 8).tolist()  # unrounded: 12, 45, 7
    [16, 48, 8]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    exact = exact_kept(lengths, rate)
    if blocks is None:
        blocks = mac_model.blocks if mac_model is not None else np.ones_like(lengths)
    options = [
        _options(int(n), int(e), round_to, int(b))
        for n, e, b in zip(lengths, exact, blocks)
    ]
    # Nearest option; a tie goes to the larger count (less pruned).
    position = np.array(
        [
            len(o) - 1 - int(np.argmin(np.abs(o[::-1] - e)))
            for o, e in zip(options, exact)
        ]
    )
    kept = np.array([o[p] for o, p in zip(options, position)], dtype=np.int64)
    if mac_model is None or all(len(o) == 1 for o in options):
        return kept
    goal = float(mac_model.macs(exact)) if target is None else float(target)
    error = abs(float(mac_model.macs(kept)) - goal)
    while True:
        moves = [
            (g, p)
            for g, o in enumerate(options)
            for p in (position[g] - 1, position[g] + 1)
            if 0 <= p < len(o)
        ]
        if not moves:
            return kept
        candidates = np.repeat(kept[None, :], len(moves), axis=0)
        for row, (g, p) in enumerate(moves):
            candidates[row, g] = options[g][p]
        errors = np.abs(mac_model.macs(candidates) - goal)
        best = int(np.argmin(errors))
        if errors[best] >= error:
            return kept
        g, p = moves[best]
        position[g], kept, error = p, candidates[best], float(errors[best])


def rate_for_macs(mac_model: MacModel, target_macs: float, round_to: int = 1) -> float:
    """The smallest rate whose unrounded counts keep at most `target_macs` MACs.

    With `round_to > 1` the counts are then balanced to multiples
    (`balanced_kept`), which keeps the MACs of the unrounded counts to within
    about one `round_to` step of one group.

    Args:
        mac_model: The `MacModel` of the prunable groups.
        target_macs: Fraction of the model's MACs to keep, in (0, 1].
        round_to: The multiple the counts will be rounded to. Defaults to 1.

    Returns:
        The rate, in [0, 1).

    Raises:
        ValueError: If the fewest channels each group can keep (one, or
            `round_to` for a group wider than that) leave more than
            `target_macs` of the MACs (the rest is in layers that cannot be
            pruned).
    """
    total = mac_model.total
    goal = target_macs * total
    fewest = fewest_kept(mac_model.lengths, round_to, mac_model.blocks)
    floor = float(mac_model.macs(fewest)) / total
    if floor > target_macs:
        raise ValueError(
            f"`target_macs` is below what pruning can reach: keeping the fewest "
            f"channels per prunable group (round_to={round_to}) still leaves "
            f"{floor:.3f} of the MACs. Received: target_macs={target_macs!r}"
        )
    low, high = 0.0, 1.0 - 1e-9
    if float(mac_model.macs(exact_kept(mac_model.lengths, low))) <= goal:
        return low
    for _ in range(50):
        middle = (low + high) / 2
        if float(mac_model.macs(exact_kept(mac_model.lengths, middle))) <= goal:
            high = middle
        else:
            low = middle
    return float(high)


def count_options(length: int, round_to: int, blocks: int = 1) -> np.ndarray:
    """Every count a group may keep: `_options`'s multiples, or any count
    where the group is not rounded (`round_to=1`, or at most `round_to`
    channels)."""
    options = _options(int(length), int(length), round_to, int(blocks))
    if len(options) == 1:
        options = np.arange(int(blocks), int(length) + 1, int(blocks))
    return options


def at_least(options, fewest) -> list[np.ndarray]:
    """Each group's options from `fewest` channels up (its largest if none)."""
    return [o[o >= f] if o[-1] >= f else o[-1:] for o, f in zip(options, fewest)]


def latency_kept(
    cost, lengths, target: float, round_to: int, blocks=None, lost=None, fewest=None
) -> np.ndarray:
    """Kept counts that reach a latency `target` removing the least importance.

    HALP's greedy allocation (Shen et al., NeurIPS 2022): from every channel,
    one option at a time (`count_options`: one multiple of `round_to`), the
    group whose next smaller count saves the most predicted latency per unit
    of importance removed gives it up, until the prediction is at most
    `target`. Groups where a step saves no time are cut only when no other
    step saves any. The last cut can overshoot by a whole option of a wide
    group (with `round_to=8`, a ResNet-20 at half its channels went from a
    25 % budget to 21 %), so the steps that still fit under `target` are
    then given back, and one-up-one-down swaps that fit and remove less
    importance are made (`_refine`).

    Args:
        cost: `kept (..., groups) -> latency`, such as a
            `keras_sfp.allocation.latency_model.LatencyModel`.
        lengths: Channels per group.
        target: The latency to reach, in `cost`'s unit.
        round_to: The multiple kept counts are made of.
        blocks: Blocks per group that keep equal counts. Defaults to 1 each.
        lost: Per group, an array whose entry `k` is the importance removed
            when the group keeps `k` channels (`k = 0..length`, falling as
            `k` grows, 0 at `length`). Defaults to the fraction of the
            group's channels removed.
        fewest: Per group, the fewest channels it may keep (its options
            below are left out; all its channels if none is as large).
            Defaults to none: any option.

    Returns:
        An int64 array of kept channels per group.

    Raises:
        ValueError: If even the fewest counts predict more than `target`.

    Example:
    >>> cost = lambda kept: np.asarray(kept, float) @ [1.0, 3.0]  # ms per channel
    >>> latency_kept(cost, [16, 16], 40.0, round_to=8).tolist()
    [16, 8]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    blocks = np.ones_like(lengths) if blocks is None else np.asarray(blocks)
    if lost is None:
        lost = [1.0 - np.arange(n + 1) / n for n in lengths]
    options = [count_options(n, round_to, b) for n, b in zip(lengths, blocks)]
    if fewest is not None:
        options = at_least(options, fewest)
    position = np.array([len(o) - 1 for o in options])
    kept = lengths.copy()
    current = float(cost(kept))
    while current > target:
        moves = [g for g in range(len(kept)) if position[g] > 0]
        if not moves:
            least = float(cost(np.array([o[0] for o in options])))
            raise ValueError(
                f"The latency target is below what pruning can reach: the fewest "
                f"channels per group (round_to={round_to}) still predict "
                f"{least:.4g}. Received: target={target:.4g}"
            )
        candidates = np.repeat(kept[None, :], len(moves), axis=0)
        for row, g in enumerate(moves):
            candidates[row, g] = options[g][position[g] - 1]
        costs = np.asarray(cost(candidates), dtype=np.float64)
        saved = current - costs
        removed = np.array(
            [
                lost[g][candidates[row, g]] - lost[g][kept[g]]
                for row, g in enumerate(moves)
            ]
        )
        if np.any(saved > 0):
            ratio = np.where(saved > 0, saved / np.maximum(removed, 1e-12), -np.inf)
            best = int(np.argmax(ratio))
        else:
            best = int(np.argmax(saved))
        g = moves[best]
        position[g] -= 1
        kept, current = candidates[best], float(costs[best])
    return _refine(cost, target, options, position, lost)


def _refine(cost, target, options, position, lost, chunk: int = 1024) -> np.ndarray:
    """`latency_kept`'s second phase: from the greedy counts (`options[g]
    [position[g]]`, predicted at most `target`), give back the steps that
    still fit, most importance per unit of cost first; when none fits,
    make the swap (one group one option up, another one down) that fits and
    removes the least importance, if it removes less than now; repeat.
    It ends: no move removes more importance, a swap removes strictly less,
    and a give-back raises the sum of the groups' option positions, which a
    swap keeps.

    Swaps are ranked by the importance they remove before any is costed,
    and costed `chunk` at a time in that order until one fits, so that a
    step costs far fewer than the `groups**2` predictions of every swap.
    The counts are those of costing every swap at once wherever `cost`
    predicts a row the same in any batch (`MacModel` and `LatencyModel`,
    whose coefficients are integers, do; a float matrix product may round
    a row differently in another batch).
    """
    position = position.copy()
    last = np.array([len(o) - 1 for o in options])
    kept = np.array([o[p] for o, p in zip(options, position)], dtype=np.int64)
    current = float(cost(kept))

    def step(groups, offset):  # counts one option away, importance lost there
        counts = np.array([options[g][position[g] + offset] for g in groups])
        there = np.array([lost[g][c] for g, c in zip(groups, counts)])
        here = np.array([lost[g][kept[g]] for g in groups])
        return counts.astype(np.int64), there, here

    while True:
        up = np.flatnonzero(position < last)
        if not up.size:
            return kept
        up_counts, up_there, up_here = step(up, 1)
        regained = up_there - up_here  # <= 0: importance given back
        candidates = np.repeat(kept[None, :], len(up), axis=0)
        candidates[np.arange(len(up)), up] = up_counts
        costs = np.asarray(cost(candidates), dtype=np.float64).reshape(-1)
        if np.any(costs <= target):
            added = np.maximum(costs - current, 1e-12)
            ratio = np.where(costs <= target, -regained / added, -np.inf)
            best = int(np.argmax(ratio))
            position[up[best]] += 1
            kept, current = candidates[best], float(costs[best])
            continue
        down = np.flatnonzero(position > 0)
        down_counts, down_there, down_here = step(down, -1)
        # Summed as ((a2 - a) + b2) - b, as the exhaustive search of the tests
        # sums it, so that ties and the threshold fall alike.
        change = (regained[:, None] + down_there[None, :]) - down_here[None, :]
        change[up[:, None] == down[None, :]] = np.inf  # not a swap
        flat = change.reshape(-1)
        order = np.argsort(flat, kind="stable")  # ties keep (up, down) order
        order = order[flat[order] < -1e-12]
        for first in range(0, len(order), chunk):
            rows = order[first : first + chunk]
            a, b = np.divmod(rows, len(down))
            candidates = np.repeat(kept[None, :], len(rows), axis=0)
            candidates[np.arange(len(rows)), up[a]] = up_counts[a]
            candidates[np.arange(len(rows)), down[b]] = down_counts[b]
            costs = np.asarray(cost(candidates), dtype=np.float64).reshape(-1)
            fits = np.flatnonzero(costs <= target)
            if fits.size:
                best = int(fits[0])
                position[up[a[best]]] += 1
                position[down[b[best]]] -= 1
                kept, current = candidates[best], float(costs[best])
                break
        else:
            return kept
