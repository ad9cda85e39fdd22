"""What a run starts from: its data and its models.

`input_data` loads and batches the dataset; `initial_models` builds (or
loads) the network and wraps it for pruning with the run's settings.
"""

from __future__ import annotations

import math
import os

import keras
from absl import logging

import keras_sfp
from keras_sfp.core import prune as prune_lib
from keras_sfp.training import config as config_lib
from keras_sfp.training import data as data_lib
from keras_sfp.training import files
from keras_sfp.training import pipeline as pipeline_lib
from keras_sfp.training.config import TrainConfig


def pruning_schedule(config: TrainConfig) -> str | None:
    """The `schedule` argument of `prune_filters` for `config`.

    `SoftFilterPrune` stretches the asymptotic schedule over the soft epochs,
    so the last re-scoring event already prunes at the target rate.
    """
    return None if config.schedule == "constant" else "asymptotic"


def _ends_in_softmax(model: keras.Model) -> bool:
    last = model.outputs[0]._keras_history.operation
    activation = getattr(last, "activation", None)
    return isinstance(last, keras.layers.Softmax) or (
        getattr(activation, "__name__", None) == "softmax"
    )


def _check_fits(model: keras.Model, data, path: str) -> None:
    inputs, outputs = model.inputs, model.outputs
    if len(outputs) == 1 and _ends_in_softmax(model):
        raise ValueError(
            "`init_from` must hold a model that outputs logits (train.py "
            "trains with a from_logits loss); its last layer applies a "
            "softmax. Rebuild it without the final activation (for "
            "keras.applications: classifier_activation=None). Received: "
            f"init_from={path!r}"
        )
    if (
        len(inputs) != 1
        or len(outputs) != 1
        or tuple(inputs[0].shape[1:]) != tuple(data.input_shape)
        or outputs[0].shape[-1] != data.num_classes
    ):
        raise ValueError(
            f"`init_from` must hold a model with one input of shape "
            f"{tuple(data.input_shape)} and {data.num_classes} logits for "
            f"{data.name}. Received: init_from={path!r} with inputs "
            f"{[tuple(t.shape) for t in inputs]} and outputs "
            f"{[tuple(t.shape) for t in outputs]}"
        )


def _warn_ignored_settings(config: TrainConfig, spec) -> None:
    """A wrapped `init_from` keeps its own pruning settings: say which differ."""
    ours = {
        "criterion": config.criterion,
        "coupling": config.coupling,
        "round_to": prune_lib.resolve_round_to(config.round_to, config.coupling),
        "schedule": pruning_schedule(config),
    }
    differ = {
        name: (value, getattr(spec, name))
        for name, value in ours.items()
        if value != getattr(spec, name)
    }
    # `rate` and `target_macs` only when given (None: the default rate).
    if config.rate is not None and config.rate != spec.rate:
        differ["rate"] = (config.rate, spec.rate)
    for name in ("target_macs", "target_latency"):
        if getattr(config, name) is not None:
            differ[name] = (getattr(config, name), f"rate {spec.rate}")
    logging.warning(
        "%s is already wrapped for pruning: training continues with its masks "
        "and its own pruning settings%s",
        config.init_from,
        (
            "; ignored: "
            + ", ".join(
                f"{k}={a!r} (the file's: {b!r})" for k, (a, b) in differ.items()
            )
        )
        if differ
        else ".",
    )


def initial_models(config: TrainConfig, data) -> tuple[keras.Model, keras.Model]:
    """The unpruned architecture and the wrapped model that `fit` trains.

    From scratch: `config.model` built for `data`, and `prune_filters` of it.
    With `config.init_from`: the loaded model and `prune_filters` of it, or,
    for a model already wrapped (a `pruned.keras`), `strip_pruning`'s
    full-width architecture and the loaded model itself, whose masks
    `SoftFilterPrune` continues from. Only the original's architecture is
    used (for MACs and latency), not its weights.
    """
    if config.init_from:
        loaded = files.load_model(config.init_from, "init_from")
        _check_fits(loaded, data, config.init_from)
        if keras_sfp.core.prune.wrappers(loaded):
            _warn_ignored_settings(config, keras_sfp.spec_of(loaded))
            return keras_sfp.strip_pruning(loaded), loaded
        model = loaded
    else:
        model = config_lib.models.get_model(
            config.model, data.input_shape, data.num_classes, config.weight_decay
        )
    table = None
    if config.latency_table:
        path = config.latency_table
        table = (
            keras_sfp.LatencyTable.load(path)
            if os.path.exists(path)
            else keras_sfp.LatencyTable(path)
        )
    pruned = keras_sfp.prune_filters(
        model,
        rate=config.rate,
        target_macs=config.target_macs,
        target_latency=config.target_latency,
        latency_table=table,
        criterion=config.criterion,
        schedule=pruning_schedule(config),
        coupling=config.coupling,
        round_to=config.round_to,
        allocation=config.resolved_allocation(),
    )
    return model, pruned


def input_data(config: TrainConfig, num_shards: int = 1, shard_index: int = 0):
    """The data `train_and_evaluate` trains and tests on, for `config`.

    Returns:
        `(data, train_ds, test_ds, num_train, num_test, steps_per_epoch)`:
        the loaded dataset, the training and test pipelines (`limit`ed,
        shuffled with `config.seed`, this process's shard of each batch), the
        numbers of training and test examples used and the training steps per
        epoch.
    """
    input_pipeline = config.input_pipeline
    if config.distribute == "multi_process" and input_pipeline == "auto":
        input_pipeline = "numpy"  # each process slices its part of a batch
    data = data_lib.load_dataset(
        config.dataset, data_dir=config.data_dir, pipeline=input_pipeline
    )
    train_limit = config.train_limit or None
    test_limit = config.test_limit or None
    num_train = min(data.num_train, train_limit or data.num_train)
    num_test = min(data.num_test, test_limit or data.num_test)
    train_ds = pipeline_lib.make_pipeline(
        data.train,
        config.batch_size,
        training=True,
        augment=config.augment,
        seed=config.seed,
        limit=train_limit,
        num_shards=num_shards,
        shard_index=shard_index,
    )
    test_ds = pipeline_lib.make_pipeline(
        data.test, config.batch_size, training=False, limit=test_limit
    )
    if isinstance(train_ds, pipeline_lib.ArrayBatches):
        steps_per_epoch = len(train_ds)  # whole batches only when sharded
    else:
        steps_per_epoch = math.ceil(num_train / config.batch_size)
    return data, train_ds, test_ds, num_train, num_test, steps_per_epoch
