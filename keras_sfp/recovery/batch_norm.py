"""BatchNormalization statistics that match the pruned network they serve.

A pruning event changes the distribution of every channel downstream of the
filters it removes, but a BatchNormalization's moving mean and variance are
exponential averages over past training steps: with Keras's default momentum
(0.99), `0.99 ** n` of the statistics from before the event are still there
`n` steps later (21 % after 157 steps). A short fine-tune of a trained network
then deploys statistics of a network that no longer exists. Two remedies live
here, both used by `SoftFilterPrune`:

- `recalibrate_batch_norm`: re-estimate the statistics from data with forward
  passes in training mode (adaptive BN; Li et al., EagleEye, ECCV 2020).
- `FreshStatistics`: restart the moving averages from zero when the masks are
  frozen and correct their bias the way Adam corrects its moments
  (`ema / (1 - momentum ** steps)`), so the statistics describe only steps
  taken with the final masks. It needs no data.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import keras
import numpy as np

from keras_sfp import _checks as checks


def batch_norm_layers(model) -> list:
    """Every `BatchNormalization` of `model` that training updates.

    Nested models and wrappers included. Left out: layers with
    `trainable=False`, which run in inference mode and never update their
    statistics, and layers with `renorm=True`, which correct their
    training-mode output with statistics of their own that these functions
    do not maintain.
    """
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if (
            isinstance(layer, keras.layers.BatchNormalization)
            and layer.trainable
            and not layer.renorm
            and id(layer) not in seen
        ):
            seen.add(id(layer))
            found.append(layer)
    return found


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "__getitem__")


def _in_memory(data) -> bool:
    """Arrays, or a list or dict of them (a multi-input model's inputs)."""
    leaves = keras.tree.flatten(data) if isinstance(data, (list, dict)) else [data]
    return bool(leaves) and all(_is_array(leaf) for leaf in leaves)


def check_data(data, name: str = "data") -> None:
    """Raises a ValueError if `data` is not a form `recalibrate_batch_norm` reads."""
    if isinstance(data, tuple) and 1 <= len(data) <= 3:
        data = data[0]
    if _in_memory(data) or isinstance(data, keras.utils.PyDataset):
        return
    if isinstance(data, (str, bytes, list, dict)) or not hasattr(data, "__iter__"):
        raise ValueError(
            f"`{name}` must be input arrays (a list or dict of them for several "
            "inputs), an `(x, y[, sample_weight])` tuple of them, a "
            "keras.utils.PyDataset, a tf.data.Dataset or an iterable of "
            f"batches. Received: {name} of type {type(data).__name__}"
        )


def _batches(data, batch_size: int) -> Iterable:
    """Model inputs, batch by batch, from any form `check_data` accepts."""
    if isinstance(data, tuple) and 1 <= len(data) <= 3:
        data = data[0]  # (x, y[, sample_weight]) in memory: x
    if _in_memory(data):
        rows = len(keras.tree.flatten(data)[0])
        return (
            keras.tree.map_structure(lambda a, i=i: a[i : i + batch_size], data)
            for i in range(0, rows, batch_size)
        )
    if isinstance(data, keras.utils.PyDataset):
        batches = (data[i] for i in range(len(data)))
    else:
        batches = iter(data)
    # As `fit` reads them: a tuple is `(x, y[, sample_weight])`.
    return (keras.utils.unpack_x_y_sample_weight(b)[0] for b in batches)


def recalibrate_batch_norm(
    model: keras.Model, data, steps: int = 100, *, batch_size: int = 32
) -> int:
    """Re-estimates every BatchNormalization's moving statistics from data.

    Runs up to `steps` forward passes of `model` in training mode on batches
    of `data` (nothing is trained: no gradient, no optimizer) and sets each
    BatchNormalization's moving mean and variance to the average of the batch
    means and variances it saw, as PyTorch does with `momentum=None`. Call it
    after pruning, or after `shrink`, before evaluating or exporting: the
    statistics then describe the network as it is, not the one it was
    trained as (adaptive BN; Li et al., EagleEye, ECCV 2020).

    Layers that update other state in training mode do so (as in `fit`), and
    dropout is active, as it was when the statistics were first estimated.

    Args:
        model: A Keras model; its BatchNormalization layers are updated in
            place. Layers with `trainable=False` (which run in inference mode)
            or `renorm=True` are left alone.
        data: Training inputs, in the forms `fit` reads: an array (or a list
            or dict of arrays for a model with several inputs), an
            `(x, y[, sample_weight])` tuple of those, a
            `keras.utils.PyDataset`, a `tf.data.Dataset` or any iterable of
            batches (`x`, or `(x, y[, sample_weight])` tuples). Use data like
            the training data (augmented or not, as training saw it).
        steps: The number of batches to use at most. Defaults to 100.
        batch_size: Rows per batch when `data` is an array. Defaults to 32.

    Returns:
        The number of batches used.

    Raises:
        ValueError: If `steps` or `batch_size` is not a positive integer,
            `data` is of no form above, `model` has no BatchNormalization to
            recalibrate, or `data` yields no batch (nothing is changed then).

    Example:
    >>> inputs = keras.Input((8, 8, 1))
    >>> x = keras.layers.Conv2D(4, 3)(inputs)
    >>> x = keras.layers.BatchNormalization()(x)
    >>> model = keras.Model(inputs, x)
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (64, 8, 8, 1))
    >>> recalibrate_batch_norm(model, x, steps=4, batch_size=16)
    4
    >>> bn = model.layers[-1]
    >>> conv_out = keras.ops.convert_to_numpy(model.layers[1](x))
    >>> expected = conv_out.mean(axis=(0, 1, 2))  # 4 batches of 16: the mean
    >>> bool(np.allclose(bn.moving_mean.numpy(), expected, atol=1e-4))
    True
    """
    checks.positive_int("steps", steps)
    checks.positive_int("batch_size", batch_size)
    check_data(data)
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(
            "recalibrate_batch_norm found no trainable BatchNormalization layer "
            "(without renorm) to recalibrate in model "
            f"{getattr(model, 'name', model)!r}."
        )
    batches = itertools.islice(_batches(data, batch_size), steps)
    saved = [
        (
            keras.ops.convert_to_numpy(layer.moving_mean),
            keras.ops.convert_to_numpy(layer.moving_variance),
        )
        for layer in layers
    ]
    try:
        used = average_batch_statistics(model, layers, batches)
    except BaseException:
        _restore(layers, saved)
        raise
    if not used:
        raise ValueError(
            "recalibrate_batch_norm got no batch from `data`: nothing was "
            f"changed. Received: data={type(data).__name__}"
        )
    return used


def average_batch_statistics(model, layers, batches) -> int:
    """Runs `model` in training mode on `batches`; `layers` end averaged.

    Before each forward pass every layer of `layers` (BatchNormalization
    layers of `model`, of Keras 3 or of `tf_keras`) gets the momentum that
    makes its moving mean and variance the average of the batch statistics
    seen so far (batch k, from 0, weighs 1 / (k + 1)); the momenta are
    restored at the end. Returns the number of batches.
    """
    momenta = [layer.momentum for layer in layers]
    used = 0
    try:
        for batch in batches:
            for layer in layers:
                layer.momentum = used / (used + 1)
            model(batch, training=True)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return used


def _restore(layers, saved) -> None:
    for layer, (mean, variance) in zip(layers, saved):
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)


def _steps(optimizer) -> int:
    """Training steps taken by `optimizer` (each gradient accumulation too).

    A `LossScaleOptimizer` (mixed precision) counts in its inner optimizer.
    """
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    counter = getattr(optimizer, "_iterations", None)
    if counter is None:
        counter = optimizer.iterations
    return int(keras.ops.convert_to_numpy(counter))


class FreshStatistics:
    """Moving statistics restarted from zero and read without their bias.

    `start` zeroes each layer's moving mean and variance. Keras then updates
    them as `ema = m * ema + (1 - m) * batch` for every training step, so
    after `n` steps `ema / (1 - m ** n)` is a weighted average of the batch
    statistics of those `n` steps alone (the bias correction of Adam's
    moments; Kingma and Ba, 2015). The layers hold that corrected value
    whenever something outside the training steps reads them (validation,
    epoch-end callbacks, the end of training) and the raw average while
    training steps run; `unbias` and `rebias` switch.

    With `momentum`, each layer averages with `min(its momentum, momentum)`
    while the raw average is in place (the layers hold their own momentum
    otherwise, so saved configurations do not change): a shorter window
    follows weights that still move, where Keras's default 0.99 averages
    over the last hundred or so steps. Compiled training functions must be
    rebuilt to use it (`changes_momentum`).

    Args:
        layers: The BatchNormalization layers (`batch_norm_layers`).
        optimizer: The optimizer whose step counter counts the updates (the
            inner optimizer's, for a `LossScaleOptimizer`: the rare steps
            that loss scaling skips update the statistics but are not
            counted).
        momentum: The largest momentum to average with, or None for the
            layers' own. Defaults to None.
    """

    def __init__(self, layers: list, optimizer, momentum: float | None = None):
        self.layers = layers
        self.optimizer = optimizer
        self._own = [float(layer.momentum) for layer in layers]
        self._momenta = [
            m if momentum is None else min(m, float(momentum)) for m in self._own
        ]
        self._start = None
        self._raw = False
        self._saved = None

    @property
    def changes_momentum(self) -> bool:
        """Whether some layer averages with another momentum than its own."""
        return self._momenta != self._own

    def _set_momenta(self, raw: bool) -> None:
        for layer, momentum in zip(self.layers, self._momenta if raw else self._own):
            layer.momentum = momentum

    @property
    def active(self) -> bool:
        """Whether the statistics were restarted (and not yet finished)."""
        return self._start is not None

    def start(self) -> None:
        """Zeroes the statistics; training steps now accumulate from zero."""
        self._saved = [
            (
                keras.ops.convert_to_numpy(layer.moving_mean),
                keras.ops.convert_to_numpy(layer.moving_variance),
            )
            for layer in self.layers
        ]
        for layer in self.layers:
            layer.moving_mean.assign(np.zeros(layer.moving_mean.shape))
            layer.moving_variance.assign(np.zeros(layer.moving_variance.shape))
        self._start = _steps(self.optimizer)
        self._raw = True
        self._set_momenta(raw=True)

    def resume(self, steps: int) -> None:
        """Continues from corrected statistics that `steps` steps produced.

        For a run resumed (from `BackupAndRestore`, or a file saved at an
        epoch end) in the middle of the steps that accumulate: the layers
        hold the corrected average of those steps, so the next steps
        continue it as an uninterrupted run would.
        """
        self._saved = [
            (
                keras.ops.convert_to_numpy(layer.moving_mean),
                keras.ops.convert_to_numpy(layer.moving_variance),
            )
            for layer in self.layers
        ]
        self._start = _steps(self.optimizer) - int(steps)
        self._raw = False
        self.rebias()

    def _scale(self, inverse: bool) -> None:
        steps = _steps(self.optimizer) - self._start
        if steps <= 0:
            # Nothing was accumulated: the statistics from before stay.
            if self._raw and inverse:
                _restore(self.layers, self._saved)
            return
        for layer, momentum in zip(self.layers, self._momenta):
            weight = 1.0 - momentum**steps
            factor = 1.0 / weight if inverse else weight
            for variable in (layer.moving_mean, layer.moving_variance):
                variable.assign(keras.ops.convert_to_numpy(variable) * factor)

    def unbias(self) -> None:
        """Writes the bias-corrected statistics (for readers outside steps)."""
        if self.active and self._raw:
            self._scale(inverse=True)
            self._raw = False
            self._set_momenta(raw=False)

    def rebias(self) -> None:
        """Writes back the raw average, before more training steps run."""
        if self.active and not self._raw:
            steps = _steps(self.optimizer) - self._start
            if steps <= 0:
                self.start()  # restored earlier statistics: start again
            else:
                self._scale(inverse=False)
            self._raw = True
            self._set_momenta(raw=True)

    def finish(self) -> None:
        """Leaves the corrected statistics in the layers and stops."""
        self.unbias()
        self._set_momenta(raw=False)
        self._start = None
        self._saved = None
