"""The callback that runs Soft Filter Pruning inside `model.fit`."""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_sfp import criteria as criteria_lib
from keras_sfp import prune as prune_lib
from keras_sfp import schedules as schedules_lib
from keras_sfp.graph import ChannelGraph
from keras_sfp.wrapper import FilterPruning


def num_pruned(channels: int, rate: float, round_to: int = 1) -> int:
    """How many of `channels` to prune: floor(channels * rate), as the reference.

    At least one channel is always kept, and with `round_to > 1` the kept count
    is rounded up to a multiple of `round_to` (or to all channels).

    Example:
    >>> num_pruned(16, 0.3), num_pruned(10, 0.3), num_pruned(16, 0.3, round_to=8)
    (4, 3, 0)
    """
    pruned = int(math.floor(channels * rate + 1e-9))
    pruned = min(pruned, channels - 1)
    kept = channels - pruned
    if round_to > 1:
        kept = min(channels, int(math.ceil(kept / round_to)) * round_to)
    return channels - kept


class SoftFilterPrune(keras.callbacks.Callback):
    """Soft Filter Pruning (He et al., IJCAI 2018) as a Keras callback.

    Before training and at the end of every epoch, each channel group of a
    model prepared by `prune_filters` is scored with its criterion (group
    members' scores are summed) and the lowest `floor(channels * rate)`
    channels are recorded in the masks and their filters' kernel and bias
    slices set to zero. Nothing masks the forward pass or the gradients in
    between: pruned filters keep training and can come back. When training
    ends the model is pruned once more, so it is consistent with its masks.

    The short schedules practitioners run expose SFP's weak point: the last
    event removes filters the network was still using. `hard_epochs=N` freezes
    the masks for the last N epochs of each `fit` call and enforces them in the
    forward pass (pruned channels output exactly zero, BatchNormalization
    included), so the network adapts to the structure `shrink` deploys.

    The callback only acts between epochs (no batch-level hooks), so Keras
    keeps dispatching training steps asynchronously, and the soft epochs run
    the wrapped layers at exactly their own cost. It works on every Keras
    backend (TensorFlow, JAX, PyTorch) and with `keras.distribution` or a
    `tf.distribute` strategy: masks are computed on the host from the
    weights, so every replica receives the same ones.

    Each event adds to the epoch `logs` (History, CSVLogger and TensorBoard see
    them when this callback comes before them in the list):
    `sfp_rate`, `sfp_pruned` (filters pruned) and `sfp_revived` (filters
    pruned at the previous event that are kept at this one).

    Args:
        hard_epochs: Number of final epochs with frozen, enforced masks.
            Defaults to 0 (the paper).
        verbose: 1 prints a line per event. Defaults to 0.

    Raises:
        ValueError: If `hard_epochs` is not a non-negative integer, or (when
            training starts) the model was not prepared by `prune_filters`.

    Example:
    >>> inputs = keras.Input((8, 8, 1))
    >>> x = keras.layers.Conv2D(10, 3, activation="relu")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(x))
    >>> pruned = prune_filters(model, rate=0.3)
    >>> pruned.compile("sgd", "mse")
    >>> history = pruned.fit(np.ones((4, 8, 8, 1)), np.ones((4, 2)), epochs=2,
    ...                      verbose=0, callbacks=[SoftFilterPrune()])
    >>> history.history["sfp_pruned"]
    [3, 3]
    """

    def __init__(self, hard_epochs: int = 0, verbose: int = 0):
        super().__init__()
        if (
            isinstance(hard_epochs, bool)
            or not isinstance(hard_epochs, int)
            or hard_epochs < 0
        ):
            raise ValueError(
                "`hard_epochs` must be an integer >= 0. "
                f"Received: hard_epochs={hard_epochs!r}"
            )
        self.hard_epochs = hard_epochs
        self.verbose = verbose
        self._plan = None
        self._hard = None
        self._last_epoch = None

    # -- set-up --------------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        self._plan = None

    def _prepare(self):
        model = self.model
        wrapped = prune_lib.wrappers(model)
        if not wrapped:
            raise ValueError(
                "SoftFilterPrune needs a model prepared by "
                "keras_sfp.prune_filters (no FilterPruning layer found). "
                f"Received: model {model.name!r}"
            )
        graph = ChannelGraph(model)
        first = wrapped[0]
        # Units: lists of (wrapper, start, length) slices of output channels
        # pruned with the same indices (a wrapper's whole output, unless a
        # merge split it between groups).
        units = []
        for group in graph.groups():
            members = [m for m in group.members if isinstance(m[0], FilterPruning)]
            if not members:
                continue
            if first.coupling == "layer":
                units.extend([m] for m in members)
            elif group.prunable and len(members) == len(group.members):
                units.append(members)
        self._plan = {
            "graph": graph,
            "units": units,
            "wrappers": wrapped,
            "config": first,
            "schedule": schedules_lib.get(first.schedule, first.rate),
        }

    def _soft_epochs(self) -> int | None:
        """Epochs of the current `fit` call whose end re-scores the masks."""
        epochs = (self.params or {}).get("epochs")
        return None if epochs is None else max(epochs - self.hard_epochs, 1)

    def _rate(self, epoch: int) -> float:
        """The schedule's rate for the event after `epoch` (0 before training).

        Schedules that take the number of epochs span the soft epochs only: the
        last re-scoring event, after epoch `epochs - hard_epochs - 1`, already
        prunes at the target rate, which the hard epochs then keep.
        """
        schedule = self._plan["schedule"]
        soft = self._soft_epochs()
        if soft is not None:
            epoch = min(epoch, soft - 1)
        if isinstance(schedule, schedules_lib.PruningSchedule):
            rate = schedule(epoch, soft if soft and soft > 1 else None)
        else:
            rate = schedule(epoch)
        rate = float(rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(
                f"The pruning schedule must return rates in [0, 1). "
                f"Received: {rate!r} for epoch {epoch}"
            )
        return rate

    # -- events ------------------------------------------------------------
    def _score(self, member, criterion) -> np.ndarray:
        wrapper, start, length = member
        kernel = keras.ops.convert_to_numpy(wrapper.kernel)
        return criteria_lib.score(criterion, kernel[..., start : start + length])

    def prune(self, epoch: int, rescore: bool = True) -> dict:
        """Runs one prune event and returns its log entries."""
        if self._plan is None:
            self._prepare()
        config = self._plan["config"]
        rate = self._rate(epoch)
        pruned = revived = 0
        masks = {}  # id(wrapper) -> (wrapper, new full mask)
        for unit in self._plan["units"]:
            wrapper, start, length = unit[0]
            stop = start + length
            previous = wrapper.mask[start:stop]
            first_event = wrapper.last_event < -1
            if rescore:
                scores = sum(self._score(m, config.criterion) for m in unit)
                n = num_pruned(len(scores), rate, config.round_to)
                mask = np.ones(len(scores), dtype="float32")
                mask[np.argsort(scores, kind="stable")[:n]] = 0.0
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
        if changed and self._plan["wrappers"][0].hard:
            # The hard forward pass was traced with the old masks.
            prune_lib.set_hard(self.model, True, self._plan["graph"])
        return {"sfp_rate": rate, "sfp_pruned": pruned, "sfp_revived": revived}

    def _is_hard_epoch(self, epoch: int) -> bool:
        epochs = (self.params or {}).get("epochs")
        return bool(self.hard_epochs and epochs and epoch >= epochs - self.hard_epochs)

    def on_train_begin(self, logs=None):
        self._prepare()
        self._hard = None
        self._last_epoch = None
        wrapped = self._plan["wrappers"]
        if wrapped[0].last_event < -1:  # never pruned
            self.prune(0)
            for w in wrapped:
                w.last_event = -1.0

    def on_epoch_begin(self, epoch, logs=None):
        # The state is part of the traced forward pass. `set_hard` rebuilds
        # the compiled functions, so it is called only when the model's
        # functions may have been traced with another state.
        hard = self._is_hard_epoch(epoch)
        if hard != self._hard:
            if not prune_lib.has_state(self.model, hard):
                prune_lib.set_hard(self.model, hard, self._plan["graph"])
            self._hard = hard

    def on_epoch_end(self, epoch, logs=None):
        # The event after the last soft epoch fixes the masks that the hard
        # epochs then enforce.
        entries = self.prune(epoch, rescore=not self._is_hard_epoch(epoch))
        self._last_epoch = epoch
        if logs is not None:
            logs.update(entries)
        if self.verbose:
            print(
                f"SoftFilterPrune epoch {epoch + 1}: rate {entries['sfp_rate']:.3f}, "
                f"pruned {entries['sfp_pruned']}, revived {entries['sfp_revived']}"
            )

    def on_train_end(self, logs=None):
        # Steps may have run since the last epoch-end event (training stopped
        # mid-epoch): prune once more so the model ends consistent with masks.
        # Frozen (hard) masks, or a fit that ended no epoch, are re-applied
        # as they are rather than re-scored.
        hard = self._plan["wrappers"][0].hard
        if self._last_epoch is None:
            self.prune(0, rescore=False)
        else:
            self.prune(self._last_epoch, rescore=not hard)
