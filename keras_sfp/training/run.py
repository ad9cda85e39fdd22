"""`train_and_evaluate`: train with Soft Filter Pruning, shrink, measure, save.

Why one module of over 400 lines: the steps below share the run's folder,
distribution scope and chief-only writes; the configuration is
`training.config`, the inputs `training.inputs`, the report
`training.report`, the file writes `training.files`.

1. Load an image-classification dataset (`keras_sfp.training.data.load_dataset`).
2. Build a model from `models`, wrap it with `keras_sfp.prune_filters`, compile
   it (SGD with Nesterov momentum 0.9, the SFP paper's optimizer; He et al.,
   IJCAI 2018) and train it with the `keras_sfp.SoftFilterPrune` callback.
3. Evaluate the soft-masked model (the figure the paper reports) and the model
   `keras_sfp.shrink` builds from it (the one that is deployed).
4. Compare parameters, multiply-accumulates and latency of the original
   architecture and the shrunk model, print a table and write `results.json`
   (`keras_sfp.training.report`).
5. Save the wrapped model (`pruned.keras`), the shrunk model (`shrunk.keras`)
   and, on the TensorFlow backend, a SavedModel of the shrunk model
   (`saved_model/`) and the deployment artifacts (`export/`).

It runs on every Keras backend; without TensorFlow the input pipeline is
NumPy (`keras_sfp.training.pipeline.ArrayBatches`) instead of `tf.data`, and
the TensorFlow artifacts are skipped (export the saved `shrunk.keras` with
`keras_sfp.export.measure` where TensorFlow is). `keras-sfp-train`
(`train.py`) is its command line.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import time
from typing import Any

import keras
import numpy as np
from absl import logging

import keras_sfp
from keras_sfp import _tensorflow
from keras_sfp.latency import timing as latency
from keras_sfp.training import data as data_lib
from keras_sfp.training import distributed, files, inputs, report
from keras_sfp.training import pipeline as pipeline_lib
from keras_sfp.training.config import (
    PRUNE_AT_START,
    STEP_FACTOR,
    STEP_FRACTIONS,
    TrainConfig,
)


def learning_rate_schedule(
    config: TrainConfig, steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate (or its schedule over optimizer steps) for `config`."""
    total = config.epochs * steps_per_epoch
    learning_rate = config.resolved_learning_rate()
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(learning_rate, total)
    if config.lr_schedule == "step":
        boundaries = [int(f * total) for f in STEP_FRACTIONS]
        values = [learning_rate * STEP_FACTOR**i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    return learning_rate


@functools.cache
def _mirrored_strategy():
    # One per process: two MirroredStrategy objects can reuse collective
    # instance keys and abort each other's all-reduces.
    tf = _tensorflow.import_tensorflow("distribute='mirrored'")
    return tf.distribute.MirroredStrategy()


def distribution_scope(config: TrainConfig):
    """A context for building, compiling and training under `config.distribute`.

    `"mirrored"`: the `tf.distribute.MirroredStrategy`'s scope (the model and
    its optimizer are created in it; `fit` then runs under the strategy).
    `"data_parallel"`: a `keras.distribution.DataParallel` over all local
    devices (JAX), kept for the whole run so that `fit` shards each global
    batch across them. `"multi_process"`: the same over every process's
    devices (`keras_sfp.training.distributed.data_parallel`). `"none"`: nothing.
    """
    if config.distribute == "mirrored":
        return _mirrored_strategy().scope()
    if config.distribute == "data_parallel":
        devices = keras.distribution.list_devices()
        return keras.distribution.DataParallel(devices=devices).scope()
    if config.distribute == "multi_process":
        return distributed.data_parallel().scope()
    return contextlib.nullcontext()


def _compile(model: keras.Model, learning_rate=None) -> keras.Model:
    optimizer = None
    if learning_rate is not None:
        optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    model.compile(
        optimizer=optimizer or "sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def measure_latency(
    named_models: dict[str, keras.Model], batch: np.ndarray, runs: int, warmup: int = 5
) -> dict[str, float]:
    """Median milliseconds of one inference call on `batch`, per model.

    `keras_sfp.latency.timing.measure_keras`: every model compiled for the current
    backend, timed in alternation after `warmup` untimed calls each.
    """
    return latency.measure_keras(named_models, batch, runs, warmup)


def _callbacks(
    config: TrainConfig, output_dir: str, train_ds, resuming: bool = False
) -> tuple[list, str | None]:
    """`SoftFilterPrune`, backup, CSV and (where possible) TensorBoard logging.

    Only process 0 of a multi-process run logs to files; `resuming`: the run
    continues from a backup, so `history.csv` keeps its earlier rows.
    """
    recalibration_data = None
    if config.recalibration_steps and distributed.process_count() == 1:
        recalibration_data = train_ds
    # SoftFilterPrune first: the sfp_* entries it adds to the epoch logs must
    # exist when CSVLogger and TensorBoard read them, its epoch-end event is
    # part of what the backup saves (and it waits for the epoch's steps
    # before anything is written), and the backup's restore at the start
    # comes after it.
    callbacks = [
        keras_sfp.SoftFilterPrune(
            hard_epochs=config.resolved_hard_epochs(),
            prune_at_start=PRUNE_AT_START[config.prune_at_start],
            reset_momentum=config.reset_momentum,
            recalibration_data=recalibration_data,
            recalibration_steps=max(config.recalibration_steps, 1),
            sparse_epochs=config.sparse_epochs,
            sparsity=config.sparsity,
            verbose=int(config.verbose > 0 and distributed.is_chief()),
        )
    ]
    if config.backup_dir:
        backup = distributed.BackupAndRestore(config.backup_dir)
        callbacks.append(backup)
        if not isinstance(train_ds, pipeline_lib.ArrayBatches):
            logging.warning(
                "backup_dir with a tf.data pipeline: a resumed run reshuffles "
                "from its first epoch (pass --input_pipeline=numpy to resume "
                "with the uninterrupted run's batches)."
            )
    if isinstance(train_ds, pipeline_lib.ArrayBatches):
        callbacks.append(pipeline_lib.EpochSync(train_ds))  # order of each epoch
    if not distributed.is_chief():
        return callbacks, None
    csv = os.path.join(output_dir, "history.csv")
    callbacks.append(files.CSVLogger(csv, append=resuming))
    # Keras writes TensorBoard logs with tf.summary, on any backend.
    if not _tensorflow.available() or importlib.util.find_spec("tensorboard") is None:
        logging.warning(
            "TensorFlow or the tensorboard package is not installed: no "
            "TensorBoard logs (history.csv has the same entries)."
        )
        return callbacks, None
    tensorboard_dir = os.path.join(output_dir, "logs")
    callbacks.append(keras.callbacks.TensorBoard(log_dir=tensorboard_dir))
    return callbacks, tensorboard_dir


def train_and_evaluate(config: TrainConfig | None = None) -> dict[str, Any]:
    """Trains with Soft Filter Pruning, shrinks, evaluates, measures and saves.

    Writes to `config.resolved_output_dir()`: `pruned.keras` (the trained model
    with its `FilterPruning` wrappers; load it after importing `keras_sfp`),
    `shrunk.keras`, `saved_model/` (the shrunk model as a TensorFlow
    SavedModel with a `serve` endpoint), `history.csv` (per-epoch logs with the
    `sfp_*` entries), `logs/` (TensorBoard, when the `tensorboard` package is
    installed) and `results.json`. Prints the
    comparison table.

    Args:
        config: The run's configuration. Defaults to `TrainConfig()`.

    Returns:
        The results also written to `results.json`: `config`, `dataset`
        (shapes and sizes), `soft_masked` (test loss and accuracy of the
        trained wrapped model), `original` and `shrunk` (params, MACs,
        milliseconds per batch, speedup; the shrunk model's accuracy),
        `kept_mac_fraction`, `kept_param_fraction`, `filters` (per
        convolution: `[original, kept]`), per-epoch `history`, `train_seconds`,
        `artifacts` (paths) and `table`.

    Every file is written atomically (`keras_sfp.training.files`): a failed
    or interrupted run keeps the earlier run's files. An existing non-empty
    output folder is refused (before anything is loaded or written) unless
    `config.overwrite` or the run resumes from `config.backup_dir`.

    Raises:
        ValueError: If `config` is invalid (raised by `TrainConfig`).
        keras_sfp.training.files.OutputDirError: A `ValueError`, if the output
            folder holds an earlier run's files and the run neither
            overwrites nor resumes.
        TypeError: If `config` is not a `TrainConfig`.

    Example:
    >>> results = train_and_evaluate(  # doctest: +SKIP
    ...     TrainConfig(epochs=1, train_limit=256, test_limit=128, verbose=0)
    ... )
    >>> results["kept_mac_fraction"] < 1  # doctest: +SKIP
    True
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(
            f"`config` must be a TrainConfig. Received: config={config!r} of type "
            f"{type(config).__name__}"
        )
    if config.distribute == "multi_process":  # before anything runs on JAX
        distributed.initialize(
            config.coordinator_address, config.num_processes, config.process_id
        )
    chief = distributed.is_chief()
    shards = {
        "num_shards": distributed.process_count(),
        "shard_index": distributed.process_index(),
    }
    output_dir = config.resolved_output_dir()
    resuming = prepare_output_dir(config, output_dir)
    keras.utils.set_random_seed(config.seed)

    data, train_ds, test_ds, num_train, num_test, steps_per_epoch = inputs.input_data(
        config, **shards
    )

    with distribution_scope(config):
        original, pruned = inputs.initial_models(config, data)
        trainer = pruned
        fresh = keras_sfp.core.state.never_pruned(pruned)
        if config.distill and config.init_from and fresh:
            # The loaded network teaches the pruned one (a `pruned.keras`
            # continuing its masks has no unpruned teacher).
            trainer = keras_sfp.distiller(original, pruned)
        _compile(trainer, learning_rate_schedule(config, steps_per_epoch))
        if chief:  # created once the data and the models are ready
            os.makedirs(output_dir, exist_ok=True)
        callbacks, tensorboard_dir = _callbacks(config, output_dir, train_ds, resuming)
        logging.info(
            "Training %s on %s (%d examples, %d steps/epoch) for %d epochs in %s "
            "(Keras backend %s)",
            config.model,
            config.dataset,
            num_train,
            steps_per_epoch,
            config.epochs,
            output_dir,
            keras.backend.backend(),
        )
        start = time.perf_counter()
        history = trainer.fit(
            train_ds,
            epochs=config.epochs,
            callbacks=callbacks,
            verbose=config.verbose if chief else 0,
            shuffle=False,  # the pipeline shuffles
        )
        train_seconds = time.perf_counter() - start
        if trainer is not pruned:
            _compile(pruned)  # its own loss and accuracy, not the distiller's
        soft = pruned.evaluate(test_ds, verbose=0, return_dict=True)

    shrunk = _compile(keras_sfp.shrink(pruned))
    shrunk_eval = shrunk.evaluate(test_ds, verbose=0, return_dict=True)

    # Only the original's architecture is timed and counted: a copy made
    # outside any distribution scope, like the shrunk model.
    original = keras.models.clone_model(original)
    timings = {"original": None, "shrunk": None}
    if config.latency_runs and chief:
        batch = np.random.default_rng(config.seed).random(
            (config.batch_size, *data.input_shape), dtype=np.float32
        )
        timings = measure_latency(
            {"original": original, "shrunk": shrunk}, batch, config.latency_runs
        )

    artifacts = {
        "pruned": os.path.join(output_dir, "pruned.keras"),
        "shrunk": os.path.join(output_dir, "shrunk.keras"),
        "saved_model": None,
        "history_csv": os.path.join(output_dir, "history.csv"),
        "tensorboard": tensorboard_dir,
        "results": os.path.join(output_dir, "results.json"),
    }
    export = config.resolved_export()
    if chief:  # the other processes hold the same models: one writes
        files.save_model(pruned, artifacts["pruned"])
        files.save_model(shrunk, artifacts["shrunk"])
    if chief and keras.backend.backend() == "tensorflow":
        artifacts["saved_model"] = os.path.join(output_dir, "saved_model")
        with (
            _tensorflow.quiet_info_logs(),
            files.atomic_path(artifacts["saved_model"]) as staging,
        ):
            shrunk.export(staging, format="tf_saved_model", verbose=False)
    elif chief:
        logging.warning(
            "Keras runs on %s: no SavedModel or TFLite artifacts (they trace a "
            "tf.function). %s loads on every backend; export it with "
            "`KERAS_BACKEND=tensorflow keras-sfp-export --model=%s`.",
            keras.backend.backend(),
            artifacts["shrunk"],
            artifacts["shrunk"],
        )

    results = report.collect(
        config,
        data,
        models={"original": original, "pruned": pruned, "shrunk": shrunk},
        evaluations={"soft_masked": soft, "shrunk": shrunk_eval},
        timings=timings,
        history=history,
        distilled=trainer is not pruned,
        train_seconds=train_seconds,
        sizes=(num_train, num_test),
        artifacts=artifacts,
    )
    if export and chief:
        artifacts["export"] = os.path.join(output_dir, "export")
        results["export"] = export_artifacts(
            config, data, pruned, shrunk, artifacts["export"]
        )
    results["table"] = report.format_table(results)
    if chief:
        files.write_json(artifacts["results"], results)
        print(results["table"])
    # The others wait for process 0's timing and writing, then all exit.
    distributed.barrier("train_and_evaluate")
    return results


def prepare_output_dir(config: TrainConfig, output_dir: str) -> bool:
    """Applies the rule of run folders (`keras_sfp.training.files.check_output_dir`).

    Process 0 decides, for every process: the run resumes if its backup
    (`config.backup_dir`) holds one, else an existing non-empty `output_dir`
    is refused unless `config.overwrite`. Nothing is created here.

    Returns:
        Whether the run resumes from a backup.

    Raises:
        keras_sfp.training.files.OutputDirError: If the run may not write to
            `output_dir` (in every process).
    """
    refused, resumes, error = 2, 1, None
    decision = 0
    if distributed.is_chief():
        resuming = distributed.has_backup(config.backup_dir)
        try:
            files.check_output_dir(output_dir, config.overwrite, resuming)
        except files.OutputDirError as raised:
            error, decision = raised, refused
        else:
            decision = resumes if resuming else 0
    decision = distributed.chief_value(decision)
    if decision == refused:
        raise error or files.OutputDirError(
            "Process 0 refused the run's `output_dir` (see its error). "
            f"Received: output_dir={output_dir!r}"
        )
    return decision == resumes


def export_artifacts(
    config: TrainConfig,
    data: data_lib.ImageDataset,
    pruned: keras.Model,
    shrunk: keras.Model,
    export_dir: str,
) -> dict[str, Any]:
    """Writes `config.resolved_export()`'s formats and `metrics.json` to `export_dir`.

    The original architecture is the trained model with its pruned filters
    zeroed (`strip_pruning`), the model one would deploy without shrinking;
    the shrunk one is `shrink`'s. Accuracy is measured on the test split
    (`config.test_limit` applies) and int8 is calibrated on the first 200
    training images.

    Returns:
        The metrics of `keras_sfp.export.measure.export_and_measure`, with
        the artifacts' paths in `export_dir`.
    """
    test_limit = config.test_limit or None
    from keras_sfp.export import (
        measure as deploy,
    )  # TensorFlow, needed for the artifacts

    representative, _ = data_lib.as_arrays(data.train, 200)
    # Written to a staging folder swapped in when complete: a failed export
    # leaves the previous `export_dir` as it was.
    with files.atomic_path(export_dir) as staging:
        metrics = deploy.export_and_measure(
            {"original": keras_sfp.strip_pruning(pruned), "shrunk": shrunk},
            staging,
            config.resolved_export(),
            data_lib.as_arrays(data.test, test_limit),
            representative_data=representative,
            latency_runs=config.latency_runs,
        )
        metrics = _relocated(metrics, staging, os.fspath(export_dir))
        files.write_json(os.path.join(staging, "metrics.json"), metrics)
    print(metrics["table"])
    return metrics


def _relocated(value, staging: str, final: str):
    """`value` with the paths under `staging` moved to `final`."""
    if isinstance(value, dict):
        return {k: _relocated(v, staging, final) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocated(v, staging, final) for v in value]
    if isinstance(value, str) and (value + os.sep).startswith(staging + os.sep):
        return final + value[len(staging) :]
    return value
