"""The callback that runs Soft Filter Pruning inside `model.fit`.

Why one module of over 400 lines: most of it is the class docstring (the
defaults and what they were measured against); the `fit` hooks sequence
the prune events and the BatchNormalization bookkeeping, which must be
read in one order. The events themselves are `core.engine`'s.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_sfp import _checks
from keras_sfp.core import engine, state
from keras_sfp.core import prune as prune_lib
from keras_sfp.core.wrapper import unwrap
from keras_sfp.recovery import batch_norm as batch_norm_lib
from keras_sfp.recovery import sparsity as sparsity_lib


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
    said so (the figures are in docs/benchmarks.md, from `bench/`):

    - `hard_epochs=1`: the masks are frozen for the last epoch of each `fit`
      call and enforced in the forward pass (pruned channels output exactly
      zero, BatchNormalization included), so the network adapts to the
      structure `shrink` deploys and the deployed model is the one that was
      trained. Without it the last event removes filters the network was
      still using and leaves every BatchNormalization's statistics stale
      (the reference settings scored far below these defaults on short
      runs).
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
      and on long schedules the deployed model matched the default's, but on
      short schedules it measured below it.

    The callback only acts between epochs (no batch-level hooks), so Keras
    keeps dispatching training steps asynchronously, and the soft epochs run
    the wrapped layers at exactly their own cost. It works on every Keras
    backend (TensorFlow, JAX, PyTorch) and with `keras.distribution` or a
    `tf.distribute` strategy: masks are computed on the host from the
    weights, so every replica receives the same ones.

    BatchNormalization statistics follow the network that is deployed. Its
    moving averages would otherwise still hold statistics of the network
    before the last event: with Keras's default momentum (0.99), 21 % of them
    remain 157 steps later, enough to take tens of points off a short
    fine-tune's deployed accuracy. With `reset_batch_norm=True` the
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
    >>> pruned = prune_filters(model, rate=0.3, round_to=8)
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
        _checks.boolean("reset_momentum", reset_momentum)
        sparse_epochs = _checks.int_at_least("sparse_epochs", sparse_epochs, 0)
        _checks.positive_number("sparsity", sparsity)
        _checks.boolean("reset_batch_norm", reset_batch_norm)
        self.hard_epochs = hard_epochs
        self.prune_at_start = prune_at_start
        self.reset_momentum = reset_momentum
        if batch_norm_momentum is not None:
            _checks.number_in("batch_norm_momentum", batch_norm_momentum, 0, 1)
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
        self._pruner = None
        self._warned = set()
        self._last_epoch = None

    # -- set-up --------------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        self._pruner = None

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
        _ = self.pruned  # raises this callback's ValueError without wrappers
        self._pruner = engine.FilterPruner(self.model)
        self._pruner.warned = self._warned  # once per callback, not per fit

    def _soft_epochs(self) -> int | None:
        """Epochs of the current `fit` call whose end re-scores the masks."""
        epochs = (self.params or {}).get("epochs")
        return None if epochs is None else max(epochs - self.hard_epochs, 1)

    def prune(self, epoch: int, rescore: bool = True) -> dict:
        """Runs one prune event (`FilterPruner.prune`) and returns its log
        entries; the schedule spans the soft epochs of the `fit` call."""
        if self._pruner is None:
            self._prepare()
        optimizer = getattr(self.model, "optimizer", None)
        entries = self._pruner.prune(
            epoch,
            rescore=rescore,
            epochs=self._soft_epochs(),
            optimizer=optimizer if self.reset_momentum else None,
        )
        if rescore:
            self._stale_statistics = True
        return entries

    def _first_hard_epoch(self) -> int:
        epochs = (self.params or {}).get("epochs") or 0
        return max(epochs - self.hard_epochs, 0)

    def _is_hard_epoch(self, epoch: int) -> bool:
        epochs = (self.params or {}).get("epochs")
        return bool(self.hard_epochs and epochs and epoch >= epochs - self.hard_epochs)

    def on_train_begin(self, logs=None):
        _checks.check_strategy()
        self._prepare()
        self._last_epoch = None
        self._statistics = None
        self._stale_statistics = False
        epochs = (self.params or {}).get("epochs")
        _check_loss_keeps_regularizers(self.model, self.sparse_epochs)
        if (
            self.sparse_epochs
            and self._pruner.never_pruned
            and epochs is not None
            and self.sparse_epochs + self.hard_epochs > epochs
        ):
            raise ValueError(
                "`sparse_epochs + hard_epochs` must be at most the epochs of "
                f"the fit call. Received: sparse_epochs={self.sparse_epochs}, "
                f"hard_epochs={self.hard_epochs}, epochs={epochs}"
            )
        if not self._pruner.never_pruned and self._is_hard_epoch(0):
            epochs = (self.params or {}).get("epochs")
            warnings.warn(
                f"SoftFilterPrune: every epoch of this fit call is hard (epochs="
                f"{epochs}, hard_epochs={self.hard_epochs}) on a model pruned "
                "before, so its masks are not re-scored. To train epoch by epoch "
                "with SFP, use SoftFilterPrune(hard_epochs=0) until the last call.",
                stacklevel=2,
            )
        if self._pruner.never_pruned and self._prunes_at_start():  # never pruned
            self.prune(0)
            for w in self._pruner.wrappers:
                w.last_event = -1.0

    def _is_sparse_epoch(self, epoch: int) -> bool:
        """Whether `epoch` trains with the group lasso (before any event)."""
        return epoch < self.sparse_epochs and self._pruner.never_pruned

    def _set_lasso(self, on: bool) -> None:
        if on == (self._lasso is not None):
            return
        if on:
            self._lasso = sparsity_lib.attach(self._pruner.units, self.sparsity)
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
        if not state.has_state(self.pruned, hard, self.model):
            state.set_hard(self.pruned, hard, self._pruner.graph, self.model)
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
        hard = self._pruner.wrappers[0].hard
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
