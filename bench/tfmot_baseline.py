"""`tensorflow-model-optimization`'s `prune_low_magnitude` as an accuracy baseline.

Why one module of over 400 lines: the whole baseline (a `tf_keras` copy
of the model, the tfmot schedule matched to ours, its export and
measurement) is kept apart from keras-sfp's own code on purpose.

The tool users of the TensorFlow ecosystem reach for: unstructured magnitude
pruning (Zhu & Gupta, "To prune, or not to prune", 2017) of a `tf_keras`
model. `bench/accuracy.py` runs it on a `tf_keras` copy of the benchmark's
ResNet-20 (`tf_keras_copy`: same layers, names, BatchNormalization settings
and weight decay, with the Keras 3 model's weights copied layer by layer and
its outputs reproduced), at the number of non-zero kernel weights that the
SFP reference configuration's deployed (shrunk) model has in the layers
`prune_low_magnitude` prunes (the convolutions and the dense layer), with
the training recipe of `keras_sfp.training.run.train_and_evaluate`: the same
data pipeline (subset, order), SGD with Nesterov momentum 0.9, cosine learning rate,
epochs, batch size and evaluation subset.

Schedules (tfmot's documented recipes):
- from scratch, `PolynomialDecay` (cubic, tfmot's default) from 0 to the
  target sparsity over the first `RAMP_FRACTION` of the training steps, in 16
  mask updates (`frequency` = a sixteenth of the ramp), then fixed masks;
- from a trained network, `ConstantSparsity`: the target at the first step
  (one-shot magnitude pruning, like `hard_once`), the masks re-derived at the
  same `frequency` (pruned weights stay zero, so they barely move).

`UpdatePruningStep` drives the schedule and `strip_pruning` removes the
wrappers. The stripped model is a full-width ResNet-20 whose pruned weights
are zeros: it keeps every dense MAC, and its float TFLite file has the same
size before compression as the unpruned network's; only gzip sees the zeros.

`prune_low_magnitude` keeps `round(n * (1 - sparsity))` weights of a layer of
`n`; `layer_sparsities` chooses one sparsity per layer (within `1 / n` of a
uniform one) so that the kept counts add up to the target exactly.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import time
from collections.abc import Mapping

import keras
import numpy as np

from keras_sfp.latency import timing as latency
from keras_sfp.recovery import batch_norm as batch_norm_lib
from keras_sfp.training import inputs
from keras_sfp.training.config import TrainConfig
from models import resnet

NAME = "tfmot_plm"
"""The configuration's name in the benchmark's keys (`scratch/tfmot_plm/...`)."""

RAMP_FRACTION = 0.75
"""From scratch, the share of the training steps over which sparsity grows."""

LATENCY_RUNS = 300
"""Timed batch-1 TFLite calls per model."""

_RTOL = 1e-4


def missing() -> str | None:
    """What this process lacks for the tfmot baseline, or None."""
    import importlib.util

    for module in ("tensorflow", "tf_keras", "tensorflow_model_optimization"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


def _tf_keras():
    import tf_keras

    return tf_keras


def _tfmot_sparsity():
    # Importing tfmot sets TF_USE_LEGACY_KERAS=1 for the whole process (it
    # has already bound `tf_keras` by then): put the variable back so that
    # the rest of the process (other tests, TensorFlow's own `tf.keras`)
    # keeps Keras 3.
    previous = os.environ.get("TF_USE_LEGACY_KERAS")
    import tensorflow_model_optimization as tfmot

    if previous is None:
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    else:
        os.environ["TF_USE_LEGACY_KERAS"] = previous
    return tfmot.sparsity.keras


def _stage_filters(model: keras.Model, stages: int = 3) -> list[int]:
    return [
        model.get_layer(f"stage{s}_block0_conv1").filters for s in range(1, stages + 1)
    ]


def tf_keras_resnet(
    blocks_per_stage: int,
    stage_filters,
    input_shape,
    num_classes: int,
    weight_decay: float,
    bn_momentum: float,
    bn_epsilon: float,
):
    """A `tf_keras` twin of `models.cifar_resnet` (same layers and names).

    Args:
        blocks_per_stage: Basic blocks per stage (`(depth - 2) / 6`).
        stage_filters: Filters of the three stages.
        input_shape: Image shape `(height, width, channels)`.
        num_classes: Logits.
        weight_decay: `L2` coefficient of every kernel (Keras semantics, as
            `models.cifar_resnet`); 0 adds none.
        bn_momentum: BatchNormalization momentum.
        bn_epsilon: BatchNormalization epsilon.

    Returns:
        A functional `tf_keras.Model`.
    """
    k = _tf_keras()
    return resnet.resnet_graph(
        k,
        blocks_per_stage,
        stage_filters,
        input_shape,
        num_classes,
        k.regularizers.L2(weight_decay) if weight_decay > 0 else None,
        dict(momentum=bn_momentum, epsilon=bn_epsilon),
    )


def tf_keras_copy(model: keras.Model, check_batch: np.ndarray | None = None):
    """A `tf_keras` copy of a `models.cifar_resnet` model, weights included.

    The architecture (blocks, stage widths, weight decay, BatchNormalization
    momentum and epsilon) is read from `model`; the weights are copied layer
    by layer, and the copy's inference outputs are checked against
    `model`'s.

    Args:
        model: A full-width-structured `models.cifar_resnet` (unwrapped).
        check_batch: Inputs of the output check; None draws 8 random images.
            Defaults to None.

    Returns:
        The `tf_keras.Model`.

    Raises:
        ValueError: If `model` is not a `models.cifar_resnet`.
        RuntimeError: If the copy's outputs differ from `model`'s by more
            than a relative 1e-4.
    """
    names = {layer.name for layer in model.layers}
    if not {"stem_conv", "stem_bn", "logits", "stage1_block0_conv1"} <= names:
        raise ValueError(
            "`model` must be a models.cifar_resnet (layers stem_conv, stem_bn, "
            f"stage1_block0_conv1, logits). Received: model={model.name!r} with "
            f"layers {sorted(names)[:8]}..."
        )
    blocks = sum(1 for n in names if n.startswith("stage1_block") and "conv1" in n)
    regularizer = model.get_layer("stem_conv").kernel_regularizer
    weight_decay = float(regularizer.l2) if regularizer is not None else 0.0
    bn = model.get_layer("stem_bn")
    copy = tf_keras_resnet(
        blocks,
        _stage_filters(model),
        model.input_shape[1:],
        model.get_layer("logits").units,
        weight_decay,
        float(bn.momentum),
        float(bn.epsilon),
    )
    copied = set()
    for layer in model.layers:
        if layer.weights:
            copy.get_layer(layer.name).set_weights(layer.get_weights())
            copied.add(layer.name)
    missing = {layer.name for layer in copy.layers if layer.weights} - copied
    if missing:
        raise ValueError(
            "`model` lacks weights for layers of its tf_keras copy: "
            f"{sorted(missing)}. Received: model={model.name!r}"
        )
    if check_batch is None:
        check_batch = (
            np.random.default_rng(0)
            .random((8, *model.input_shape[1:]))
            .astype(np.float32)
        )
    expected = keras.ops.convert_to_numpy(model(check_batch, training=False))
    got = np.asarray(copy(check_batch, training=False))
    error = float(np.max(np.abs(got - expected)))
    scale = float(np.max(np.abs(expected))) or 1.0
    if error > _RTOL * scale:
        raise RuntimeError(
            f"The tf_keras copy of {model.name!r} does not reproduce its outputs: "
            f"max |difference| {error:.3g} > {_RTOL} * max |output| {scale:.3g}"
        )
    return copy


def prunable_sizes(model) -> dict[str, int]:
    """`{layer name: kernel size}` of the layers `prune_low_magnitude` prunes.

    The convolutions and dense layers (their kernels; biases, BatchNormalization
    and the rest are never pruned). Works on Keras 3 and `tf_keras` models.
    """
    return {
        layer.name: int(np.prod(layer.kernel.shape))
        for layer in model.layers
        if type(layer).__name__ in ("Conv2D", "Dense")
    }


def nonzero_kernel_weights(model) -> int:
    """Non-zero kernel weights of the convolutions and dense layers of `model`."""
    return sum(
        int(np.count_nonzero(np.asarray(model.get_layer(name).kernel)))
        for name in prunable_sizes(model)
    )


def layer_sparsities(sizes: Mapping[str, int], target_nonzero: int) -> dict:
    """Per-layer sparsities that keep exactly `target_nonzero` weights in all.

    Every layer keeps `floor(n * (1 - s))` of its `n` weights at the uniform
    sparsity `s = 1 - target / total`, and the remainder goes one weight at
    a time to the layers with the largest fractional parts (largest remainder
    rounding), so each layer's sparsity is within `1 / n` of `s` and
    `prune_low_magnitude`'s `round(n * (1 - sparsity))` per layer adds up to
    `target_nonzero`.

    Args:
        sizes: `{layer name: prunable weights}` (`prunable_sizes`).
        target_nonzero: Weights to keep over all layers, at least one per
            layer and at most their total.

    Returns:
        `{layer name: sparsity in [0, 1)}`.

    Raises:
        ValueError: If `sizes` is empty or `target_nonzero` is out of range.

    Example:
    >>> layer_sparsities({"a": 100, "b": 300}, 200)
    {'a': 0.5, 'b': 0.5}
    """
    if not sizes or any(int(n) < 1 for n in sizes.values()):
        raise ValueError(
            f"`sizes` must map layer names to positive sizes. Received: sizes={sizes!r}"
        )
    total = sum(sizes.values())
    if (
        isinstance(target_nonzero, bool)
        or not isinstance(target_nonzero, (int, np.integer))
        or not len(sizes) <= target_nonzero <= total
    ):
        raise ValueError(
            f"`target_nonzero` must be an integer in [{len(sizes)}, {total}] (one "
            "weight per layer to all of them). "
            f"Received: target_nonzero={target_nonzero!r}"
        )
    keep = target_nonzero / total
    kept = {name: max(1, math.floor(n * keep)) for name, n in sizes.items()}
    order = sorted(
        sizes, key=lambda name: sizes[name] * keep - kept[name], reverse=True
    )
    remainder = target_nonzero - sum(kept.values())
    for name in order:
        if remainder == 0:
            break
        step = 1 if remainder > 0 else -1
        if 1 <= kept[name] + step <= sizes[name]:
            kept[name] += step
            remainder -= step
    return {name: 1.0 - kept[name] / sizes[name] for name in sizes}


def prune(model, sparsities: Mapping[str, float], schedule: str, steps: int):
    """`prune_low_magnitude` on the layers of `sparsities`, one schedule each.

    Args:
        model: A `tf_keras` model.
        sparsities: `{layer name: final sparsity}` (`layer_sparsities`).
        schedule: `"polynomial"` (0 to the sparsity over `RAMP_FRACTION` of
            `steps`, from scratch) or `"constant"` (from the first step,
            fine-tuning a trained network).
        steps: Training steps of the run.

    Returns:
        The model with `PruneLowMagnitude` wrappers.

    Raises:
        ValueError: If `schedule` is unknown, `steps` < 1, or a layer of
            `sparsities` is not in `model`.
    """
    if schedule not in ("polynomial", "constant"):
        raise ValueError(
            "`schedule` must be 'polynomial' or 'constant'. "
            f"Received: schedule={schedule!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1. Received: steps={steps!r}")
    names = {layer.name for layer in model.layers}
    if not set(sparsities) <= names:
        raise ValueError(
            "`sparsities` names layers that `model` lacks: "
            f"{sorted(set(sparsities) - names)}. Received: sparsities={sparsities!r}"
        )
    sparsity = _tfmot_sparsity()
    frequency = max(1, int(steps * RAMP_FRACTION) // 16)
    # The last mask update falls on `end_step`, at the final sparsity.
    end_step = frequency * max(1, int(steps * RAMP_FRACTION) // frequency)

    def schedule_for(final: float):
        if schedule == "constant":
            return sparsity.ConstantSparsity(final, begin_step=0, frequency=frequency)
        return sparsity.PolynomialDecay(
            initial_sparsity=0.0,
            final_sparsity=final,
            begin_step=0,
            end_step=end_step,
            frequency=frequency,
        )

    def wrap(layer):
        if layer.name in sparsities:
            return sparsity.prune_low_magnitude(
                layer, pruning_schedule=schedule_for(sparsities[layer.name])
            )
        return layer

    return _tf_keras().models.clone_model(model, clone_function=wrap)


def recalibrate_batch_norm(model, data, steps: int) -> int:
    """`keras_sfp.recalibrate_batch_norm` for a `tf_keras` model.

    Every BatchNormalization's moving mean and variance become the average
    of the batch statistics of up to `steps` training-mode forward passes
    over `data` (the forms `keras_sfp.recalibrate_batch_norm` reads), as
    the SFP runs of the same setting get at the end of training
    (`recalibration_steps`): the baseline is measured with the same fix.

    Returns:
        The number of batches used.
    """
    k = _tf_keras()
    layers = [
        layer
        for layer in model.layers
        if isinstance(layer, k.layers.BatchNormalization) and layer.trainable
    ]
    batches = itertools.islice(batch_norm_lib._batches(data, 32), steps)
    return batch_norm_lib.average_batch_statistics(model, layers, batches)


def _compile(model, learning_rate):
    k = _tf_keras()
    model.compile(
        optimizer=k.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
        loss=k.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _gzipped_bytes(path: str) -> int:
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=9))


def _tflite_from_tf_keras(model, path: str) -> str:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with open(path, "wb") as f:
        f.write(converter.convert())
    return path


def train_and_evaluate(
    init_from: str,
    reference_shrunk: str,
    start: str,
    config: TrainConfig,
    output_dir: str,
) -> dict:
    """Prunes a `tf_keras` copy of `init_from` with tfmot and compares it to SFP.

    Args:
        init_from: The Keras 3 `models.cifar_resnet` to copy (its weights are
            the starting point: initial or trained).
        reference_shrunk: The SFP reference's deployed `shrunk.keras`, whose
            non-zero kernel weights set the target, and whose TFLite file is
            timed and gzipped alongside.
        start: `"scratch"` (polynomial ramp) or `"trained"` (constant
            sparsity).
        config: The recipe (`epochs`, `batch_size`, `learning_rate`,
            `lr_schedule` "cosine", `seed`, `train_limit`, `test_limit`,
            `augment`, `dataset`, `input_pipeline`), as for the other
            configurations.
        output_dir: Where the stripped model and both TFLite files go.

    Returns:
        A dict: `deployed` (stripped model's test accuracy), `soft_masked`
        (the wrapped model's), `nonzero`, `target_nonzero`, `prunable`,
        `sparsity`, `gzip_bytes`/`ref_gzip_bytes` and
        `tflite_bytes`/`ref_tflite_bytes` (float TFLite files),
        `tflite_ms`/`ref_tflite_ms` (median batch-1 latency, timed
        alternately), `train_loss`, `seconds`.

    Raises:
        ValueError: If `start` is unknown or `config.lr_schedule` is not
            "cosine".
    """
    if start not in ("scratch", "trained"):
        raise ValueError(
            f"`start` must be 'scratch' or 'trained'. Received: start={start!r}"
        )
    if config.lr_schedule != "cosine":
        raise ValueError(
            "Only the cosine learning rate is reproduced in tf_keras. "
            f"Received: config.lr_schedule={config.lr_schedule!r}"
        )
    # TensorFlow-only modules, imported here so that the benchmark imports
    # this module on a backend without TensorFlow (`missing()` says why not).
    from keras_sfp import export
    from keras_sfp.export import runners as runners_lib

    k = _tf_keras()
    sparsity = _tfmot_sparsity()
    os.makedirs(output_dir, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    k.utils.set_random_seed(config.seed)

    # The pipeline of `keras_sfp.training.run.train_and_evaluate` (same subset,
    # same order).
    data, train_ds, test_ds, _, _, steps_per_epoch = inputs.input_data(config)
    steps = config.epochs * steps_per_epoch

    source = keras.saving.load_model(init_from, compile=False)
    copy = tf_keras_copy(source)
    reference = keras.saving.load_model(reference_shrunk, compile=False)
    target = nonzero_kernel_weights(reference)
    sizes = prunable_sizes(copy)
    pruned = prune(
        copy,
        layer_sparsities(sizes, target),
        "constant" if start == "trained" else "polynomial",
        steps,
    )
    schedule = k.optimizers.schedules.CosineDecay(
        config.resolved_learning_rate(), steps
    )
    _compile(pruned, schedule)
    began = time.perf_counter()
    history = pruned.fit(
        train_ds,
        epochs=config.epochs,
        callbacks=[sparsity.UpdatePruningStep()],
        verbose=config.verbose,
    )
    seconds = time.perf_counter() - began
    soft = pruned.evaluate(test_ds, verbose=0, return_dict=True)
    stripped = sparsity.strip_pruning(pruned)
    if config.recalibration_steps:
        recalibrate_batch_norm(stripped, train_ds, config.recalibration_steps)
    stripped.compile(
        loss=k.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    deployed = stripped.evaluate(test_ds, verbose=0, return_dict=True)
    stripped.save(os.path.join(output_dir, "stripped.keras"))

    tflite = _tflite_from_tf_keras(stripped, os.path.join(output_dir, "tfmot.tflite"))
    ref_tflite = export.export_tflite(
        reference, os.path.join(output_dir, "sfp_shrunk.tflite"), overwrite=True
    )
    batch = np.random.default_rng(config.seed).random(
        (1, *data.input_shape), dtype=np.float32
    )
    runners = {
        "tfmot": runners_lib.tflite_runner(tflite),
        "sfp": runners_lib.tflite_runner(ref_tflite),
    }
    times = latency.time_alternately(
        {key: (lambda run=run: run(batch)) for key, run in runners.items()},
        LATENCY_RUNS,
        warmup=20,
    )
    nonzero = nonzero_kernel_weights(stripped)
    return {
        "deployed": float(deployed["accuracy"]),
        "soft_masked": float(soft["accuracy"]),
        "nonzero": nonzero,
        "target_nonzero": target,
        "prunable": sum(sizes.values()),
        "sparsity": 1.0 - nonzero / sum(sizes.values()),
        "tflite_bytes": os.path.getsize(tflite),
        "ref_tflite_bytes": os.path.getsize(ref_tflite),
        "gzip_bytes": _gzipped_bytes(tflite),
        "ref_gzip_bytes": _gzipped_bytes(ref_tflite),
        "tflite_ms": times["tfmot"],
        "ref_tflite_ms": times["sfp"],
        "train_loss": float(history.history["loss"][-1]),
        "seconds": seconds,
    }
