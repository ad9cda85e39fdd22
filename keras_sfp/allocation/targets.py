"""Per-group pruning rates from a model-wide target.

`prune_filters` turns `target_macs`, `target_latency` or
`allocation="global"` into one rate per channel group here: the checks of
those arguments (shared with the command line), and the greedy allocation
of `counts.latency_kept` under a MACs cost (`counts.MacModel`) or a latency
cost (`latency_model.LatencyModel`).
"""

from __future__ import annotations

import numbers

import numpy as np

from keras_sfp.allocation import counts as allocation_lib
from keras_sfp.allocation import latency_model
from keras_sfp.core import importance
from keras_sfp.core.wrapper import num_outputs, unwrap


def check_target(name: str, value, rate, coupling) -> None:
    """Validates `target_macs` or `target_latency` with `rate` and `coupling`."""
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 < value <= 1.0
    ):
        raise ValueError(
            f"`{name}` must be a fraction in (0, 1]. Received: {name}={value!r}"
        )
    if rate is not None:
        raise ValueError(
            f"Pass `rate` or `{name}`, not both. "
            f"Received: rate={rate!r}, {name}={value!r}"
        )
    if coupling != "group":
        raise ValueError(
            f"`{name}` needs coupling='group' (with 'layer', pruned residual "
            f"channels are not removed). Received: coupling={coupling!r}"
        )


def check_targets(target_macs, target_latency, rate, coupling) -> None:
    """Validates `target_macs` and `target_latency` (`prune_filters`, train.py)."""
    check_target("target_macs", target_macs, rate, coupling)
    check_target("target_latency", target_latency, rate, coupling)
    if target_macs is not None and target_latency is not None:
        raise ValueError(
            "Pass `target_macs` or `target_latency`, not both. Received: "
            f"target_macs={target_macs!r}, target_latency={target_latency!r}"
        )
    if target_latency == 1.0:
        raise ValueError(
            "`target_latency` must be below 1 (1 keeps every channel: nothing "
            "to prune). Received: target_latency=1.0"
        )


def latency_rates(graph, groups, table, target_latency, round_to, criterion):
    """Per-group rates reaching `target_latency` of the predicted latency."""
    lengths = np.array([g.length for g in groups], dtype=np.int64)
    blocks = np.array([g.blocks for g in groups], dtype=np.int64)
    fewest = [
        allocation_lib.count_options(n, round_to, b)[0] for n, b in zip(lengths, blocks)
    ]
    cost = latency_model.LatencyModel(graph, groups, table, fewest, round_to)
    full = float(cost(lengths))
    if not full > 0.0:
        raise ValueError(
            f"`latency_table` predicts {full} ms for the whole model, so it "
            "cannot tell channel counts apart (every measured entry is 0: a "
            "timer that measures nothing, or layers too small to time on this "
            f"device). Received: latency_table at {table.path!r}"
        )
    try:
        kept = allocation_lib.latency_kept(
            cost,
            lengths,
            target_latency * full,
            round_to,
            blocks,
            importance.importance_lost(
                groups, criterion, importance.batch_norms_after(graph)
            ),
        )
    except ValueError as error:
        raise ValueError(
            f"`target_latency` is below what pruning can reach ({error}). "
            f"Received: target_latency={target_latency!r}"
        ) from None
    return (lengths - kept) / lengths


# Global allocation keeps, in every group, at least this fraction of the
# channels the uniform allocation at the same MACs keeps it (`global_rates`).
KEEP_FLOOR = 0.5


def keep_floor(mac_model, uniform, goal: float, round_to: int) -> np.ndarray:
    """Per group, the fewest channels global allocation keeps (see
    `global_rates`): `KEEP_FLOOR` of `uniform`'s counts, rounded up, and
    lowered (the fraction bisected) where the counts it leaves could not
    meet `goal` (a `target_macs` whose uniform counts are rounded up to
    multiples that the wide groups no longer offset)."""
    options = [
        allocation_lib.count_options(n, round_to, b)
        for n, b in zip(mac_model.lengths, mac_model.blocks)
    ]

    def fits(fraction):
        fewest = np.ceil(fraction * uniform)
        least = [o[0] for o in allocation_lib.at_least(options, fewest)]
        return float(mac_model.macs(least)) <= goal

    fraction = KEEP_FLOOR
    if not fits(fraction):  # fits(0): the fewest counts, which `goal` allows
        low, high = 0.0, KEEP_FLOOR
        for _ in range(30):
            middle = (low + high) / 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        fraction = low
    return np.ceil(fraction * uniform).astype(np.int64)


def global_rates(graph, groups, rate, target_macs, round_to, criterion):
    """Per-group rates of `allocation="global"` (see `prune_filters`).

    The MACs budget is `target_macs` of the model's MACs, or what `rate`'s
    uniform allocation keeps with the same `round_to` (so the two deploy the
    same MACs, and global allocation is possible wherever uniform is).

    No group keeps fewer than `KEEP_FLOOR` of the channels the uniform
    allocation keeps it (at `rate`, or at the rate of `target_macs`, where
    the floor is lowered if the budget needs it: `keep_floor`): without a
    floor one ranking empties whole layers (layer collapse: a trained
    ResNet-20 at rate 0.5 with `round_to=1` kept 1 to 3 channels in the
    inner convolution of 7 of its 9 residual blocks, and deployed 2.5
    points below one rate everywhere in `bench.accuracy`).
    """
    mac_model = allocation_lib.MacModel(graph, groups)
    total, lengths = mac_model.total, mac_model.lengths
    if target_macs is not None:
        rate = allocation_lib.rate_for_macs(mac_model, target_macs, round_to)
    uniform = allocation_lib.balanced_kept(mac_model, lengths, rate, round_to)
    if target_macs is None:
        goal = float(mac_model.macs(uniform))
    else:
        goal = target_macs * total
    lost = importance.importance_lost(
        groups, criterion, importance.batch_norms_after(graph)
    )
    try:
        kept = allocation_lib.latency_kept(
            mac_model.macs,
            lengths,
            goal,
            round_to,
            mac_model.blocks,
            lost,
            keep_floor(mac_model, uniform, goal, round_to),
        )
    except ValueError:  # only `target_macs`: uniform's counts meet a rate's
        fewest = allocation_lib.fewest_kept(lengths, round_to, mac_model.blocks)
        raise ValueError(
            "`target_macs` asks for fewer MACs than pruning can reach: keeping "
            f"the fewest channels per prunable group (round_to={round_to}) "
            f"still leaves {float(mac_model.macs(fewest)) / total:.3f} of the "
            f"MACs. Received: target_macs={target_macs!r}"
        ) from None
    return (lengths - kept) / lengths


def per_channel(channel_rates: dict, groups, rates) -> float:
    """Fills `channel_rates` (`id(layer)` -> per-channel rates) from per-group
    `rates`; returns the largest, the wrappers' (and schedule's) final rate."""
    rate = float(np.max(rates))
    for group, group_rate in zip(groups, rates):
        for layer, start, length in group.members:
            values = channel_rates.setdefault(
                id(layer), np.full(num_outputs(unwrap(layer)), rate)
            )
            values[start : start + length] = group_rate
    return rate


ALLOCATIONS = ("uniform", "global")
"""The values of `prune_filters(allocation=...)`."""


def check_allocation(allocation, target_latency, coupling) -> str:
    """Validates `allocation` (`prune_filters`, train.py); returns the mode used."""
    if allocation is not None and allocation not in ALLOCATIONS:
        raise ValueError(
            f"`allocation` must be one of {ALLOCATIONS} or None. "
            f"Received: allocation={allocation!r}"
        )
    if target_latency is not None:
        if allocation == "uniform":
            raise ValueError(
                "`target_latency` allocates channels globally by latency: "
                "allocation='uniform' cannot be combined with it. Received: "
                f"allocation={allocation!r}, target_latency={target_latency!r}"
            )
        return "global"
    if allocation == "global" and coupling != "group":
        raise ValueError(
            "allocation='global' needs coupling='group' (with 'layer', pruned "
            f"residual channels are not removed). Received: coupling={coupling!r}"
        )
    return allocation or "uniform"
