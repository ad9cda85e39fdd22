"""The callback that runs Soft Filter Pruning inside `model.fit`."""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_sfp import _checks
from keras_sfp.allocation import counts as allocation
from keras_sfp.core import importance
from keras_sfp.core import prune as prune_lib
from keras_sfp.core import schedules as schedules_lib
from keras_sfp.core.wrapper import FilterPruning, unwrap
from keras_sfp.graph.channels import ChannelGraph
from keras_sfp.recovery import batch_norm as batch_norm_lib
from keras_sfp.recovery import sparsity as sparsity_lib
from keras_sfp.training import distributed


class SoftFilterPrune(keras.callbacks.Callback):
    """Soft Filter Pruning (He et al., IJCAI 2018) as a Keras callback.

    Before training and at the end of every epoch, each channel group of a
    model prepared by `prune_filters` is scored with its criterion (group
    members' scores are summed) and its lowest-scoring channels are recorded
    in the masks and their filters' kernel and bias slices set to zero: about
    `floor(channels * rate)` of them, the kept counts rounded to multiples of
    the wrappers' `round_to` and balanced across groups so that the model's
    MACs stay those of the unrounded counts (`keras_sfp.allocation.counts`).
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

    BatchNormalization statistics follow the network that is deployed. Its
    moving averages would otherwise still hold statistics of the network
    before the last event: with Keras's default momentum (0.99), 21 % of them
    remain 157 steps later, enough to turn a fine-tune at 85 % training
    accuracy into a deployed model at 50 %. With `reset_batch_norm=True` the
    moving statistics restart from zero at the first hard epoch, average
    with a momentum of at most `batch_norm_momentum` (PyTorch's default
    window: the weights still move during a fine-tune, and Keras's 0.99
    averages over the last hundred or so steps) and are read with their bias
    corrected (`keras_sfp.recovery.batch_norm.FreshStatistics`): they describe only
    recent steps taken with the final masks, and validation, the end
    of training and the epoch-end callbacks after this one (checkpoints,
    backups) see them corrected; callbacks that read the model in the
    middle of an epoch see the raw average. With
    `recalibration_data`, they are also re-estimated from that data when
    training ends (`keras_sfp.recalibrate_batch_norm`), on the final weights.
    When the last event is not followed by a hard epoch (`hard_epochs=0`, or
    a `fit` stopped before them) and no data is given, a warning says that
    the statistics predate it.

    With `sparse_epochs`, the first epochs of a model never pruned train with
    a group lasso on every channel group (`keras_sfp.recovery.sparsity`: the L2 norm
    of each channel's filters across all the layers that share it, weighted
    by `sparsity`) and without prune events; the first event, at the end of
    the last sparse epoch, then removes channels the penalty drove toward
    zero (DepGraph; Fang et al., CVPR 2023).

    The model may be the student of a `keras.distillation.Distiller` (its
    `student` prepared by `prune_filters`): the callback prunes the student
    and the distiller trains it.

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
        reset_batch_norm: Restart the BatchNormalization moving statistics at
            the first hard epoch and correct their bias (see above). Defaults
            to True.
        batch_norm_momentum: With `reset_batch_norm`, the largest momentum
            of the moving statistics during the hard epochs (each layer's own
            is restored at every epoch end, so saved models keep it); None
            keeps the layers' own. Defaults to 0.9.
        recalibration_data: Data to re-estimate the BatchNormalization
            statistics from when training ends (`recalibrate_batch_norm`):
            training inputs as arrays, an `(x, y)` tuple, a `PyDataset`, a
            `tf.data.Dataset` or an iterable of batches. Defaults to None.
        recalibration_steps: Batches of `recalibration_data` to use at most.
            Defaults to 100.
        sparse_epochs: First epochs of a never-pruned model trained with the
            group lasso and no prune event; `sparse_epochs + hard_epochs` must
            not exceed the epochs of the `fit` call. Defaults to 0.
        sparsity: Weight of the group lasso in the loss. Defaults to 1e-4.
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
        reset_batch_norm: bool = True,
        batch_norm_momentum: float | None = 0.9,
        recalibration_data=None,
        recalibration_steps: int = 100,
        sparse_epochs: int = 0,
        sparsity: float = 1e-4,
        verbose: int = 0,
    ):
        super().__init__()
        hard_epochs = _checks.int_at_least("hard_epochs", hard_epochs, 0)
        recalibration_steps = _checks.positive_int(
            "recalibration_steps", recalibration_steps
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
        sparse_epochs = _checks.int_at_least("sparse_epochs", sparse_epochs, 0)
        if isinstance(sparsity, bool) or not (
            isinstance(sparsity, (int, float, np.floating)) and sparsity > 0
        ):
            raise ValueError(
                f"`sparsity` must be a positive number. Received: sparsity={sparsity!r}"
            )
        if not isinstance(reset_batch_norm, bool):
            raise ValueError(
                "`reset_batch_norm` must be a bool. "
                f"Received: reset_batch_norm={reset_batch_norm!r}"
            )
        self.hard_epochs = hard_epochs
        self.prune_at_start = prune_at_start
        self.reset_momentum = reset_momentum
        if batch_norm_momentum is not None and (
            isinstance(batch_norm_momentum, bool)
            or not isinstance(batch_norm_momentum, (int, float, np.floating))
            or not 0.0 <= batch_norm_momentum < 1.0
        ):
            raise ValueError(
                "`batch_norm_momentum` must be in [0, 1) or None. "
                f"Received: batch_norm_momentum={batch_norm_momentum!r}"
            )
        if recalibration_data is not None:
            batch_norm_lib.check_data(recalibration_data, "recalibration_data")
        self.reset_batch_norm = reset_batch_norm
        self.batch_norm_momentum = batch_norm_momentum
        self.recalibration_data = recalibration_data
        self.recalibration_steps = recalibration_steps
        self.sparse_epochs = sparse_epochs
        self.sparsity = float(sparsity)
        self._lasso = None
        self._statistics = None
        self._stale_statistics = False
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

    @property
    def pruned(self) -> keras.Model:
        """The model prepared by `prune_filters`: the model, or its student."""
        model = prune_lib.pruned_model(self.model)
        if model is None:
            raise ValueError(
                "SoftFilterPrune needs a model prepared by "
                "keras_sfp.prune_filters, or a keras.distillation.Distiller "
                "whose student is one (no FilterPruning layer found). "
                f"Received: model {self.model.name!r}"
            )
        return model

    def _prepare(self):
        model = self.pruned
        wrapped = prune_lib.wrappers(model)
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
            "batch_norms": importance.batch_norms_after(graph),
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
                scores = importance.group_scores(
                    unit, config.criterion, self._plan["batch_norms"]
                )
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
            prune_lib.set_hard(self.pruned, True, self._plan["graph"], self.model)
        if rescore:
            self._stale_statistics = True
        return {"sfp_rate": rate, "sfp_pruned": pruned, "sfp_revived": revived}

    def _first_hard_epoch(self) -> int:
        epochs = (self.params or {}).get("epochs") or 0
        return max(epochs - self.hard_epochs, 0)

    def _is_hard_epoch(self, epoch: int) -> bool:
        epochs = (self.params or {}).get("epochs")
        return bool(self.hard_epochs and epochs and epoch >= epochs - self.hard_epochs)

    def on_train_begin(self, logs=None):
        distributed.check_strategy()
        self._prepare()
        self._hard = None
        self._last_epoch = None
        self._statistics = None
        self._stale_statistics = False
        wrapped = self._plan["wrappers"]
        epochs = (self.params or {}).get("epochs")
        _check_loss_keeps_regularizers(self.model, self.sparse_epochs)
        if (
            self.sparse_epochs
            and wrapped[0].last_event < -1
            and epochs is not None
            and self.sparse_epochs + self.hard_epochs > epochs
        ):
            raise ValueError(
                "`sparse_epochs + hard_epochs` must be at most the epochs of "
                f"the fit call. Received: sparse_epochs={self.sparse_epochs}, "
                f"hard_epochs={self.hard_epochs}, epochs={epochs}"
            )
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

    def _is_sparse_epoch(self, epoch: int) -> bool:
        """Whether `epoch` trains with the group lasso (before any event)."""
        return epoch < self.sparse_epochs and self._plan["wrappers"][0].last_event < -1

    def _set_lasso(self, on: bool) -> None:
        if on == (self._lasso is not None):
            return
        if on:
            self._lasso = sparsity_lib.attach(self._plan["units"], self.sparsity)
        else:
            sparsity_lib.detach(self._lasso)
            self._lasso = None
        if getattr(self.model, "train_function", None) is not None:
            self.model.make_train_function(force=True)  # the loss changed

    def _prunes_at_start(self) -> bool:
        if self._is_hard_epoch(0):
            return True  # the hard epoch needs masks to enforce
        if self.sparse_epochs:
            return False  # the sparse epochs come first
        if self.prune_at_start != "auto":
            return self.prune_at_start
        layers = [unwrap(layer) for layer in self.pruned.layers]
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
        self._set_lasso(self._is_sparse_epoch(epoch))
        hard = self._is_hard_epoch(epoch)
        if hard != self._hard:
            if not prune_lib.has_state(self.pruned, hard, self.model):
                prune_lib.set_hard(self.pruned, hard, self._plan["graph"], self.model)
            self._hard = hard
        if not hard:
            return
        # From here on the masks are final: training steps update the
        # statistics of the deployed network (which `reset_batch_norm=False`
        # leaves mixed with older ones, as Keras would).
        self._stale_statistics = False
        if not self.reset_batch_norm:
            return
        if self._statistics is None:
            self._statistics = batch_norm_lib.FreshStatistics(
                batch_norm_lib.batch_norm_layers(self.pruned),
                self.model.optimizer,
                self.batch_norm_momentum,
            )
            first = self._first_hard_epoch()
            steps = (self.params or {}).get("steps")
            if epoch > first and steps:
                # Resumed after hard epochs whose corrected statistics were
                # saved at their end: continue their average.
                self._statistics.resume((epoch - first) * steps)
            else:
                self._statistics.start()
            if self._statistics.changes_momentum and getattr(
                self.model, "train_function", None
            ):
                # The momentum is read when the training step is traced.
                self.model.make_train_function(force=True)
        else:
            self._statistics.rebias()

    def on_test_begin(self, logs=None):
        # Validation inside `fit` runs after the epoch's training steps.
        if self._statistics is not None:
            self._statistics.unbias()

    def on_epoch_end(self, epoch, logs=None):
        # The event after the last soft epoch fixes the masks that the hard
        # epochs then enforce.
        if self._is_sparse_epoch(epoch) and epoch < self.sparse_epochs - 1:
            entries = {"sfp_rate": 0.0, "sfp_pruned": 0, "sfp_revived": 0}
        else:
            entries = self.prune(epoch, rescore=not self._is_hard_epoch(epoch))
        self._last_epoch = epoch
        if self._statistics is not None:
            # Before checkpoints and backups (callbacks after this one) read them.
            self._statistics.unbias()
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
        if self._lasso is not None:
            sparsity_lib.detach(self._lasso)
            self._lasso = None
            self.model.train_function = None  # rebuilt without it by a next fit
        hard = self._plan["wrappers"][0].hard
        if self._last_epoch is None:
            self.prune(0, rescore=False)
        else:
            self.prune(self._last_epoch, rescore=not hard)
        if self._statistics is not None:
            self._statistics.finish()
            if self._statistics.changes_momentum:
                self.model.train_function = None  # traced with the hard momentum
            self._statistics = None
        if self.recalibration_data is not None:
            batch_norm_lib.recalibrate_batch_norm(
                self.pruned, self.recalibration_data, self.recalibration_steps
            )
        elif self._stale_statistics and batch_norm_lib.batch_norm_layers(self.pruned):
            warnings.warn(
                "SoftFilterPrune: the last pruning event was not followed by a "
                "hard epoch, so the BatchNormalization statistics describe the "
                "network before it and the deployed model may score well below "
                "its training accuracy. Pass `recalibration_data` (or call "
                "keras_sfp.recalibrate_batch_norm), or use hard_epochs >= 1.",
                stacklevel=2,
            )


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


def _check_loss_keeps_regularizers(model, sparse_epochs: int) -> None:
    """Keras's Distiller leaves regularization losses out of its loss."""
    distillation = getattr(keras, "distillation", None)
    if not sparse_epochs or distillation is None:
        return
    if type(model).compute_loss is distillation.Distiller.compute_loss:
        raise ValueError(
            "`sparse_epochs` adds its group lasso as a regularization loss, which "
            "keras.distillation.Distiller leaves out of its loss: build the "
            "distiller with keras_sfp.distiller (or add `self.losses` in "
            f"compute_loss). Received: model of type {type(model).__name__}"
        )
