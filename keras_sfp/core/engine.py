"""The pruning engine: score the filters, choose the masks, apply them.

`FilterPruner` is what one prune event does, with nothing about *when*:
`SoftFilterPrune` calls it at epoch ends during `fit`; code that prunes
outside `fit` (tests, benchmarks, a one-shot prune of a trained network)
calls it directly. The split follows tfmot's sparsity package (wrapper,
callback, and the `Pruning` object the callback drives) and Torch-Pruning's
(dependency graph, importance, pruner).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_sfp.allocation import counts as allocation
from keras_sfp.core import importance, state
from keras_sfp.core import prune as prune_lib
from keras_sfp.core import schedules as schedules_lib
from keras_sfp.core.spec import spec_of
from keras_sfp.core.wrapper import FilterPruning
from keras_sfp.graph.channels import ChannelGraph


class FilterPruner:
    """Runs prune events on a model prepared by `prune_filters`.

    A prune event scores every channel group with the model's criterion
    (summed over the group's members), keeps the highest-scoring channels
    (as many as the schedule's rate and `round_to` allow, per group), sets
    the wrappers' masks and zeroes the pruned filters. In soft SFP the
    zeroed filters keep training and may come back at the next event.

    Args:
        model: A model prepared by `prune_filters`, or a
            `keras.distillation.Distiller` whose student is one (whose
            compiled functions then are rebuilt when masks change in the
            hard state).

    Raises:
        ValueError: If `model` holds no `FilterPruning` wrapper, or its
            wrappers disagree on a model-wide setting (`spec_of`).

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> pruned = prune_filters(keras.Model(inputs, keras.layers.Dense(2)(x)),
    ...                        rate=0.5)
    >>> FilterPruner(pruned).prune(epoch=0)
    {'sfp_rate': 0.5, 'sfp_pruned': 8, 'sfp_revived': 0}
    >>> [int(layer.mask.sum()) for layer in pruned.layers if hasattr(layer, "mask")]
    [8]
    """

    def __init__(self, model: keras.Model):
        self.spec = spec_of(model)  # raises for a model without wrappers
        self.model = model
        self.pruned = prune_lib.pruned_model(model)
        self.wrappers = prune_lib.wrappers(self.pruned)
        self.graph = ChannelGraph(self.pruned, input_shape=self.spec.reference_shape)
        # Units: lists of (wrapper, start, length) slices of output channels
        # pruned with the same indices (a wrapper's whole output, unless a
        # merge split it between groups).
        if self.spec.coupling == "layer":
            pairs = [
                ([m], group.blocks)
                for group in self.graph.groups()
                for m in group.members
                if isinstance(m[0], FilterPruning)
            ]
            self.units = [unit for unit, _ in pairs]
            self.blocks = [b for _, b in pairs]
            # Pruned residual channels are not all removable: each unit
            # rounds alone, without a MACs model.
            self._mac_model = None
        else:
            groups = allocation.pruned_groups(self.graph)
            self.units = [list(group.members) for group in groups]
            self.blocks = [group.blocks for group in groups]
            self._mac_model = None
            if groups:
                self._mac_model = allocation.MacModel(self.graph, groups)
        self.lengths = [unit[0][2] for unit in self.units]
        self._batch_norms = importance.batch_norms_after(self.graph)
        self._schedule = schedules_lib.get(self.spec.schedule, self.spec.rate)
        # Final rates per unit where groups prune at different rates
        # (`prune_filters(target_latency=...)`, allocation="global"), else None.
        self._unit_rates = (
            None
            if all(w.channel_rates is None for w in self.wrappers)
            else np.array([unit[0][0].channel_rate(unit[0][1]) for unit in self.units])
        )
        self._kept_cache = {}  # rate -> kept counts per unit
        self.warned = set()  # the warnings given once: "slots", "rounding"

    @property
    def never_pruned(self) -> bool:
        """True before the model's first prune event (`last_event` -2)."""
        return state.never_pruned(self.pruned)

    def rate(self, epoch: int, epochs: int | None = None) -> float:
        """The schedule's rate for the event after `epoch` (0 before training).

        Args:
            epoch: The epoch that just ended (0-based).
            epochs: The epochs the schedule spans (the soft epochs of a
                `fit` call), for schedules that take it; later epochs get the
                last one's rate. None: the schedule's own length.

        Raises:
            ValueError: If the schedule returns a rate outside [0, 1).
        """
        if epochs is not None:
            epoch = min(epoch, epochs - 1)
        if isinstance(self._schedule, schedules_lib.PruningSchedule):
            rate = self._schedule(epoch, epochs if epochs and epochs > 1 else None)
        else:
            rate = self._schedule(epoch)
        rate = float(rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(
                f"The pruning schedule must return rates in [0, 1). "
                f"Received: {rate!r} for epoch {epoch}"
            )
        return rate

    def kept(self, rate: float) -> np.ndarray:
        """Channels each unit keeps at `rate` (`allocation.balanced_kept`)."""
        if rate not in self._kept_cache:
            rates = self._unit_rates
            final = self.spec.rate
            if rates is not None:  # each unit's final rate, scaled like `rate`
                rates = rates * (rate / final) if final > 0 else rates * 0.0
            self._kept_cache[rate] = allocation.balanced_kept(
                self._mac_model,
                self.lengths,
                rate if rates is None else rates,
                self.spec.round_to,
                blocks=self.blocks,
            )
        return self._kept_cache[rate]

    def prune(
        self,
        epoch: int = 0,
        rescore: bool = True,
        epochs: int | None = None,
        optimizer=None,
    ) -> dict:
        """Runs one prune event; returns its log entries.

        Args:
            epoch: The epoch that just ended (0 also before training). The
                wrappers record it as their `last_event`.
            rescore: Score the filters and choose new masks (soft SFP). False
                re-applies the current masks (the hard epochs' events).
            epochs: The epochs the schedule spans (see `rate`).
            optimizer: An optimizer whose state (momentum, moments) for the
                pruned filters is zeroed with them. None: left alone.

        Returns:
            `{"sfp_rate": rate, "sfp_pruned": filters masked, "sfp_revived":
            filters unmasked since the last event}`, filters counted per
            wrapper.
        """
        rate = self.rate(epoch, epochs)
        pruned = revived = 0
        masks = {}  # id(wrapper) -> (wrapper, new full mask)
        kept = self.kept(rate)
        for unit, unit_kept, blocks in zip(self.units, kept, self.blocks):
            wrapper, start, length = unit[0]
            previous = wrapper.mask[start : start + length]
            first_event = wrapper.last_event < -1
            if rescore:
                scores = importance.group_scores(
                    unit, self.spec.criterion, self._batch_norms
                )
                mask = lowest_masked(scores, len(scores) - int(unit_kept), blocks)
            else:
                mask = previous.astype("float32")
            # Counted in filters: every member of a group loses its own.
            if not first_event:
                revived += len(unit) * int(np.sum((previous == 0) & (mask == 1)))
            pruned += len(unit) * int(np.sum(mask == 0))
            for member, begin, size in unit:
                if id(member) not in masks:
                    current = member.mask.astype("float32")  # a writable copy
                    start_from = current if not rescore else np.ones_like(current)
                    masks[id(member)] = (member, start_from)
                masks[id(member)][1][begin : begin + size] = mask
        changed = False
        for member, mask in masks.values():
            changed = changed or not np.array_equal(member.mask, mask)
            member.mask = mask
            member.last_event = float(epoch)
            member.kernel.assign(keras.ops.convert_to_numpy(member.kernel) * mask)
            if member.bias is not None:
                member.bias.assign(keras.ops.convert_to_numpy(member.bias) * mask)
        if rescore and rate > 0 and pruned == 0 and "rounding" not in self.warned:
            self.warned.add("rounding")
            warnings.warn(
                f"keras-sfp pruned nothing at rate {rate:.3f}: with "
                f"round_to={self.spec.round_to} every group keeps all its channels "
                f"(widths {sorted(set(self.lengths))}). Pass a smaller "
                "`round_to` to prune_filters.",
                stacklevel=2,
            )
        if optimizer is not None:
            self._reset_slots(optimizer, list(masks.values()))
        if changed and self.wrappers[0].hard:
            # The hard forward pass was traced with the old masks.
            state.set_hard(self.pruned, True, self.graph, self.model)
        return {"sfp_rate": rate, "sfp_pruned": pruned, "sfp_revived": revived}

    def _reset_slots(self, optimizer, changed: list) -> None:
        """Zeroes the optimizer slots of the pruned filters of `changed`."""
        if not optimizer.built:
            return  # no slots yet: they start at zero
        found = 0
        for wrapper, mask in changed:
            for weight in (wrapper.kernel, wrapper.bias):
                if weight is None:
                    continue
                for slot in _slots(optimizer, weight):
                    slot.assign(keras.ops.convert_to_numpy(slot) * mask)
                    found += 1
        if not found and "slots" not in self.warned:
            self.warned.add("slots")
            warnings.warn(
                "keras-sfp (reset_momentum=True) found no optimizer slot "
                f"for the pruned kernels in {type(optimizer).__name__} "
                "(plain SGD has none): nothing was reset.",
                stacklevel=2,
            )


def lowest_masked(scores, n: int, blocks: int = 1) -> np.ndarray:
    """A mask zeroing the `n` lowest `scores`, `n / blocks` in every block."""
    mask = np.ones((blocks, len(scores) // blocks), dtype="float32")
    per_block = np.reshape(scores, mask.shape)
    for row, block_scores in zip(mask, per_block):
        row[np.argsort(block_scores, kind="stable")[: n // blocks]] = 0.0
    return mask.reshape(-1)


def _slots(optimizer, weight) -> list:
    """The optimizer's state variables for `weight` (momentum, moments, ...).

    Keras names them `{weight.path with "/" -> "_"}_{slot}`; the exponential
    moving average of the weights (`_average`) and gradient accumulators are
    not optimizer state and are left alone.
    """
    prefix = weight.path.replace("/", "_") + "_"
    return [
        slot
        for slot in optimizer.variables
        if slot.name.startswith(prefix)
        and slot.shape == weight.shape
        and slot.name[len(prefix) :] not in ("average", "gradient_accumulator")
    ]
