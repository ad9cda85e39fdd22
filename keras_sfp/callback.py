"""The callback that runs Soft Filter Pruning inside `model.fit`."""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_sfp import allocation, distributed
from keras_sfp import criteria as criteria_lib
from keras_sfp import prune as prune_lib
from keras_sfp import schedules as schedules_lib
from keras_sfp.graph import ChannelGraph
from keras_sfp.wrapper import FilterPruning, unwrap


class SoftFilterPrune(keras.callbacks.Callback):
    """Soft Filter Pruning (He et al., IJCAI 2018) as a Keras callback.

    Before training and at the end of every epoch, each channel group of a
    model prepared by `prune_filters` is scored with its criterion (group
    members' scores are summed) and its lowest-scoring channels are recorded
    in the masks and their filters' kernel and bias slices set to zero: about
    `floor(channels * rate)` of them, the kept counts rounded to multiples of
    the wrappers' `round_to` and balanced across groups so that the model's
    MACs stay those of the unrounded counts (`keras_sfp.allocation`).
    Nothing masks the forward pass or the gradients in between: pruned
    filters keep training and can come back. When training
    ends the model is pruned once more, so it is consistent with its masks.

    keras-sfp's defaults differ from the reference code where measurements
    (`bench/accuracy.py`, README "Soft pruning") said so:

    - `hard_epochs=1`: the masks are frozen for the last epoch of each `fit`
      call and enforced in the forward pass (pruned channels output exactly
      zero, BatchNormalization included), so the network adapts to the
      structure `shrink` deploys and the deployed model is the one that was
      trained. Without it the last event removes filters the network was
      still using and leaves every BatchNormalization's statistics stale
      (the reference settings scored 30 to 50 points below these defaults
      on short runs).
      `hard_epochs` equal to the number of epochs prunes once and fine-tunes
      with frozen masks (Li et al., ICLR 2017), which measured best when
      fine-tuning a trained network for a few epochs.
    - `prune_at_start=True` (the paper) remains the default. With
      BatchNormalization, a zeroed filter either gets no gradient (beta <= 0
      before a ReLU, always the case at initialisation) or a gradient
      amplified by `gamma / sqrt(epsilon)` (about 30x in Keras), so the
      filters that come back jump in norm and churn the pruned set.
      `prune_at_start="auto"` (or False) lets an untrained network train one
      epoch first, so that pruned filters do come back; with
      `criterion="l2_bn"` (and `reset_momentum=True`) the churn stays small
      and, over 15 epochs, the deployed model matched the default's (+0.07 +-
      0.22 points over 3 seeds), but on short schedules it measured well
      below it (`bench/accuracy.py`, README).

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
        hard_epochs: Number of final epochs of each `fit` call with frozen,
            enforced masks; 0 is the paper. A `fit` stopped early (e.g. by
            `EarlyStopping`) may end before them: the masks are then applied
            once more at the end, but the network was not trained with them.
            Defaults to 1.
        prune_at_start: Whether to prune before the first epoch of a model
            that was never pruned: True (the paper), False (the first event
            is at the end of the first epoch), or `"auto"`: before training
            only if the model is trained (a BatchNormalization's moving mean
            has left its initial zeros, or the model has no
            BatchNormalization). When the first epoch is already a hard one,
            the model is always pruned first (the hard epoch enforces masks).
            Defaults to True.
        reset_momentum: Also zero the optimizer's slot variables (momentum,
            Adam moments) of the filters each event prunes, so the next steps
            start them from rest instead of the velocity of the weights just
            removed. Defaults to False.
        verbose: 1 prints a line per event. Defaults to 0.

    Raises:
        ValueError: If an argument is invalid, or (when training starts) the
            model was not prepared by `prune_filters`.

    Example:
    >>> inputs = keras.Input((8, 8, 1))
    >>> x = keras.layers.Conv2D(32, 3, activation="relu")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(x))
    >>> pruned = prune_filters(model, rate=0.3)
    >>> pruned.compile("sgd", "mse")
    >>> history = pruned.fit(np.ones((4, 8, 8, 1)), np.ones((4, 2)), epochs=2,
    ...                      verbose=0, callbacks=[SoftFilterPrune()])
    >>> history.history["sfp_pruned"]  # 32 - 23 kept, rounded to 24 (round_to=8)
    [8, 8]
    """

    def __init__(
        self,
        hard_epochs: int = 1,
        *,
        prune_at_start=True,
        reset_momentum: bool = False,
        verbose: int = 0,
    ):
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
        if not (isinstance(prune_at_start, bool) or prune_at_start == "auto"):
            raise ValueError(
                "`prune_at_start` must be 'auto', True or False. "
                f"Received: prune_at_start={prune_at_start!r}"
            )
        if not isinstance(reset_momentum, bool):
            raise ValueError(
                "`reset_momentum` must be a bool. "
                f"Received: reset_momentum={reset_momentum!r}"
            )
        self.hard_epochs = hard_epochs
        self.prune_at_start = prune_at_start
        self.reset_momentum = reset_momentum
        self.verbose = verbose
        self._plan = None
        self._hard = None
        self._last_epoch = None
        self._warned_slots = False
        self._warned_rounding = False

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
        if first.coupling == "layer":
            pairs = [
                ([m], group.blocks)
                for group in graph.groups()
                for m in group.members
                if isinstance(m[0], FilterPruning)
            ]
            units = [unit for unit, _ in pairs]
            blocks = [b for _, b in pairs]
            # Pruned residual channels are not all removable: each unit
            # rounds alone, without a MACs model.
            mac_model = None
        else:
            groups = allocation.pruned_groups(graph)
            units = [list(group.members) for group in groups]
            blocks = [group.blocks for group in groups]
            mac_model = allocation.MacModel(graph, groups) if groups else None
        self._plan = {
            "graph": graph,
            "batch_norms": _batch_norms_after(graph),
            "units": units,
            "lengths": [unit[0][2] for unit in units],
            "blocks": blocks,  # equal-count blocks per unit (grouped convs)
            "mac_model": mac_model,
            "kept": {},  # rate -> kept counts per unit
            "wrappers": wrapped,
            "config": first,
            "schedule": schedules_lib.get(first.schedule, first.rate),
            # Final rates per unit where groups prune at different rates
            # (`prune_filters(target_latency=...)`), else None.
            "unit_rates": None
            if all(w.channel_rates is None for w in wrapped)
            else np.array([unit[0][0].channel_rate(unit[0][1]) for unit in units]),
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
        bn_scale = None
        bn = self._plan["batch_norms"].get(id(wrapper))
        if bn is not None and criteria_lib.is_bn_aware(criterion):
            gamma = bn.gamma if bn.scale else None
            bn_scale = criteria_lib.batch_norm_scale(
                None if gamma is None else keras.ops.convert_to_numpy(gamma),
                keras.ops.convert_to_numpy(bn.moving_variance),
                bn.epsilon,
            )[start : start + length]
        return criteria_lib.score(
            criterion, kernel[..., start : start + length], bn_scale
        )

    def _reset_slots(self, changed: list) -> None:
        """Zeroes the optimizer slots of the pruned filters of `changed`."""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None or not optimizer.built:
            return  # no slots yet: they start at zero
        found = 0
        for wrapper, mask in changed:
            for weight in (wrapper.kernel, wrapper.bias):
                if weight is None:
                    continue
                for slot in _slots(optimizer, weight):
                    slot.assign(keras.ops.convert_to_numpy(slot) * mask)
                    found += 1
        if not found and not self._warned_slots:
            self._warned_slots = True
            warnings.warn(
                "SoftFilterPrune(reset_momentum=True) found no optimizer slot "
                f"for the pruned kernels in {type(optimizer).__name__} "
                "(plain SGD has none): nothing was reset.",
                stacklevel=2,
            )

    def _kept(self, rate: float, round_to: int) -> np.ndarray:
        """Channels each unit keeps at `rate` (`allocation.balanced_kept`)."""
        cache = self._plan["kept"]
        if rate not in cache:
            rates = self._plan["unit_rates"]
            final = self._plan["config"].rate
            if rates is not None:  # each unit's final rate, scaled like `rate`
                rates = rates * (rate / final) if final > 0 else rates * 0.0
            cache[rate] = allocation.balanced_kept(
                self._plan["mac_model"],
                self._plan["lengths"],
                rate if rates is None else rates,
                round_to,
                blocks=self._plan["blocks"],
            )
        return cache[rate]

    def prune(self, epoch: int, rescore: bool = True) -> dict:
        """Runs one prune event and returns its log entries."""
        if self._plan is None:
            self._prepare()
        config = self._plan["config"]
        rate = self._rate(epoch)
        pruned = revived = 0
        masks = {}  # id(wrapper) -> (wrapper, new full mask)
        kept = self._kept(rate, config.round_to)
        for unit, unit_kept, blocks in zip(
            self._plan["units"], kept, self._plan["blocks"]
        ):
            wrapper, start, length = unit[0]
            stop = start + length
            previous = wrapper.mask[start:stop]
            first_event = wrapper.last_event < -1
            if rescore:
                scores = sum(self._score(m, config.criterion) for m in unit)
                mask = _lowest_masked(scores, len(scores) - int(unit_kept), blocks)
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
        if rescore and rate > 0 and pruned == 0 and not self._warned_rounding:
            self._warned_rounding = True
            warnings.warn(
                f"SoftFilterPrune pruned nothing at rate {rate:.3f}: with "
                f"round_to={config.round_to} every group keeps all its channels "
                f"(widths {sorted(set(self._plan['lengths']))}). Pass a smaller "
                "`round_to` to prune_filters.",
                stacklevel=2,
            )
        if self.reset_momentum:
            self._reset_slots(list(masks.values()))
        if changed and self._plan["wrappers"][0].hard:
            # The hard forward pass was traced with the old masks.
            prune_lib.set_hard(self.model, True, self._plan["graph"])
        return {"sfp_rate": rate, "sfp_pruned": pruned, "sfp_revived": revived}

    def _is_hard_epoch(self, epoch: int) -> bool:
        epochs = (self.params or {}).get("epochs")
        return bool(self.hard_epochs and epochs and epoch >= epochs - self.hard_epochs)

    def on_train_begin(self, logs=None):
        distributed.check_strategy()
        self._prepare()
        self._hard = None
        self._last_epoch = None
        wrapped = self._plan["wrappers"]
        if wrapped[0].last_event >= -1 and self._is_hard_epoch(0):
            epochs = (self.params or {}).get("epochs")
            warnings.warn(
                f"SoftFilterPrune: every epoch of this fit call is hard (epochs="
                f"{epochs}, hard_epochs={self.hard_epochs}) on a model pruned "
                "before, so its masks are not re-scored. To train epoch by epoch "
                "with SFP, use SoftFilterPrune(hard_epochs=0) until the last call.",
                stacklevel=2,
            )
        if wrapped[0].last_event < -1 and self._prunes_at_start():  # never pruned
            self.prune(0)
            for w in wrapped:
                w.last_event = -1.0

    def _prunes_at_start(self) -> bool:
        if self._is_hard_epoch(0):
            return True  # the hard epoch needs masks to enforce
        if self.prune_at_start != "auto":
            return self.prune_at_start
        layers = [unwrap(layer) for layer in self.model.layers]
        batch_norms = [
            layer
            for layer in layers
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        return not batch_norms or any(
            np.any(keras.ops.convert_to_numpy(bn.moving_mean) != 0)
            for bn in batch_norms
        )

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


def _lowest_masked(scores, n: int, blocks: int = 1) -> np.ndarray:
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


def _batch_norms_after(graph: ChannelGraph) -> dict:
    """`id(wrapper)` -> the BatchNormalization that normalises its output.

    Only a channels-last BatchNormalization called directly on the output of
    a `FilterPruning` layer counts: its scale then applies to exactly the
    filters of that layer.
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
        producer = history.operation if history else None
        if isinstance(producer, FilterPruning):
            found[id(producer)] = layer
    return found
