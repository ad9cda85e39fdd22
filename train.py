"""Train a model with Soft Filter Pruning, shrink it, measure it and export it.

A thin absl driver over `train_and_evaluate`, which does all the work and can be
called from Python (or a test) with a `TrainConfig`:

1. Load an image-classification dataset (`keras_sfp.training.data.load_dataset`).
2. Build a model from `models`, wrap it with `keras_sfp.prune_filters`, compile
   it (SGD with Nesterov momentum 0.9, the SFP paper's optimizer; He et al.,
   IJCAI 2018) and train it with the `keras_sfp.SoftFilterPrune` callback.
3. Evaluate the soft-masked model (the figure the paper reports) and the model
   `keras_sfp.shrink` builds from it (the one that is deployed).
4. Compare parameters, multiply-accumulates and latency of the original
   architecture and the shrunk model, print a table and write `results.json`.
5. Save the wrapped model (`pruned.keras`), the shrunk model (`shrunk.keras`)
   and, on the TensorFlow backend, a SavedModel of the shrunk model
   (`saved_model/`) and the deployment artifacts (`export/`).

It runs on every Keras backend (`KERAS_BACKEND=jax python train.py`); without
TensorFlow the input pipeline is NumPy (`keras_sfp.training.pipeline.ArrayBatches`)
instead of `tf.data`, and the TensorFlow artifacts are skipped (export the
saved `shrunk.keras` with `keras_sfp.export.measure` where TensorFlow is).

Usage:

    python train.py                                   # ~10 min on 2 CPU cores
    python train.py --model=resnet56 --dataset=cifar10 --epochs=200 \
        --lr_schedule=step --augment --weight_decay=2.5e-4
    python train.py --train_limit=512 --test_limit=256 --epochs=2  # smoke run
    python train.py --export=   # skip the deployment artifacts (export/, metrics.json)
    KERAS_BACKEND=jax python train.py --distribute=data_parallel  # all local devices
    # Two processes (here on one machine; README "Several processes"):
    KERAS_BACKEND=jax python train.py --distribute=multi_process \
        --coordinator_address=localhost:12355 --num_processes=2 --process_id=0 &
    KERAS_BACKEND=jax python train.py --distribute=multi_process \
        --coordinator_address=localhost:12355 --num_processes=2 --process_id=1
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import time
from typing import Any

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sfp  # noqa: E402
import models  # noqa: E402
from keras_sfp import _checks, _tensorflow  # noqa: E402
from keras_sfp.latency import timing as latency  # noqa: E402
from keras_sfp.training import data as data_lib  # noqa: E402
from keras_sfp.training import distributed  # noqa: E402
from keras_sfp.training import pipeline as pipeline_lib  # noqa: E402

LR_SCHEDULES = ("cosine", "step", "constant")
CRITERIA = ("l2", "l1", "fpgm", "l2_bn")
PRUNE_AT_START = {"auto": "auto", "true": True, "false": False}
# Fine-tuning a trained model (`init_from`) starts at a tenth of the
# from-scratch learning rate.
LEARNING_RATE = 0.1
FINE_TUNE_LEARNING_RATE = 0.01
COUPLINGS = ("group", "layer")
PRUNING_SCHEDULES = ("constant", "asymptotic")
DISTRIBUTE = ("none", "mirrored", "data_parallel", "multi_process")
# Which Keras backend each distribution needs.
DISTRIBUTE_BACKEND = {
    "mirrored": "tensorflow",
    "data_parallel": "jax",
    "multi_process": "jax",
}
# Settings of `jax.distributed` (None: from the environment or the cluster).
PROCESS_SETTINGS = ("coordinator_address", "num_processes", "process_id")
DEFAULT_EXPORT = "saved_model,tflite,tflite_int8"

# The paper divides the learning rate by 5 at epochs 60, 120 and 160 of 200.
STEP_FRACTIONS = (0.3, 0.6, 0.8)
STEP_FACTOR = 0.2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `train_and_evaluate` needs; each field is also a flag.

    Attributes:
        model: A name in `models.MODEL_NAMES`. Defaults to `"resnet20"`.
        dataset: `"fashion_mnist"` or a TFDS image-classification dataset name.
            Defaults to `"fashion_mnist"`.
        data_dir: Directory of the data (see `keras_sfp.training.data.load_dataset`);
            `None` for the default location. Defaults to None.
        epochs: Training epochs. Defaults to 4.
        batch_size: Global batch size, also the batch of the latency
            measurement. Defaults to 128.
        learning_rate: Initial learning rate of SGD (Nesterov momentum 0.9);
            None means `LEARNING_RATE` (0.1) from scratch and
            `FINE_TUNE_LEARNING_RATE` (0.01) with `init_from`. Defaults to
            None.
        lr_schedule: `"cosine"` (decay to 0 over training), `"step"` (divide by
            5 at 30, 60 and 80 % of training, the paper's recipe) or
            `"constant"`. Defaults to `"cosine"`.
        weight_decay: Coefficient of the L2 kernel regularizer of the model
            (Keras semantics: half of PyTorch's SGD `weight_decay`). Defaults
            to 2.5e-4 (the paper's 5e-4).
        rate: Fraction of the filters of each channel group to prune; None
            means 0.3 (or the rate that reaches `target_macs`). Defaults to
            None.
        target_macs: Fraction of the model's MACs to keep instead of a
            `rate` (`prune_filters(target_macs=...)`). Defaults to None.
        target_latency: Fraction of the model's predicted latency to keep
            instead of a `rate` (`prune_filters(target_latency=...)`, per-layer
            latencies measured on this device at batch 1). Defaults to None.
        latency_table: The JSON file of the latency table `target_latency`
            reads and extends; None uses the one cached for this device
            (`keras_sfp.LatencyTable.for_device`). Defaults to None.
        criterion: `"l2"`, `"l1"`, `"fpgm"` or `"l2_bn"` (see
            `keras_sfp.criteria`). Defaults to `"l2"`.
        coupling: `"group"` or `"layer"`. Defaults to `"group"`.
        allocation: `prune_filters(allocation=...)`: `"uniform"`,
            `"global"` (one importance ranking across groups under the MACs
            budget; it reads the weights, so it is meant for `init_from`) or
            None: `"global"` with `init_from` and `coupling="group"` (it
            measured best on short fine-tunes, `bench/fine_tune.py`), else
            uniform (or global by latency with `target_latency`). Defaults
            to None.
        schedule: Pruning-rate schedule, `"constant"` or `"asymptotic"` (ASFP;
            it reaches `rate` at the last epoch whose masks are re-scored).
            Defaults to `"constant"`.
        hard_epochs: Final epochs with frozen, enforced masks
            (`SoftFilterPrune(hard_epochs=...)`), at most `epochs`; None means
            1 from scratch and all of them with `init_from` (prune once, then
            fine-tune with frozen masks: on short fine-tuning runs this
            measured 2 to 3.5 points better than soft epochs; README "Soft
            pruning"). Defaults to None.
        prune_at_start: `SoftFilterPrune(prune_at_start=...)`: `"true"` (the
            paper), `"auto"` (prune before training only a trained model) or
            `"false"`. Defaults to `"true"`.
        reset_momentum: `SoftFilterPrune(reset_momentum=...)`: zero the
            optimizer slots of the filters each event prunes. Defaults to
            False.
        sparse_epochs: `SoftFilterPrune(sparse_epochs=...)`: first epochs
            trained with a group lasso and no prune event. Defaults to 0.
        sparsity: `SoftFilterPrune(sparsity=...)`, the group lasso's weight.
            Defaults to 1e-4.
        recalibration_steps: Batches of training data from which
            `SoftFilterPrune` re-estimates the BatchNormalization statistics
            when training ends (`recalibrate_batch_norm`); 0 leaves them to
            the callback's restarted averages alone. Multi-process runs skip
            it (each process would see other data). Defaults to 100.
        distill: With `init_from` (a trained, unwrapped model): train the
            pruned model as the student of a `keras.distillation.Distiller`
            whose teacher is the loaded model (`keras_sfp.distiller`). Off by
            default: on two-epoch fine-tunes it measured below plain
            fine-tuning (`bench/fine_tune.py`). Defaults to False.
        init_from: A `.keras` file to start from instead of a new `model`:
            a trained Keras model (pruned with `prune_filters` here) or a
            `pruned.keras` written by this program (training continues with
            its masks). Its input and output must fit the dataset; its
            architecture and regularizers replace `model` and
            `weight_decay`. None trains from scratch. Defaults to None.
        round_to: Kept channel counts are multiples of this, balanced
            across groups (see `prune_filters`). Defaults to 8.
        augment: Pad-crop-flip augmentation of the training images. Defaults
            to False.
        distribute: `"none"`, `"mirrored"` (`tf.distribute.MirroredStrategy`
            over all local devices; TensorFlow backend) or `"data_parallel"`
            (`keras.distribution.DataParallel` over all local devices; JAX
            backend) or `"multi_process"` (`DataParallel` over the devices
            of several processes joined by `jax.distributed`: each process
            feeds `batch_size / num_processes` examples of every global
            batch, only process 0 writes files; JAX backend). The global
            batch is `batch_size`. Defaults to `"none"`.
        coordinator_address: `host:port` of process 0, for
            `"multi_process"`; None reads `JAX_COORDINATOR_ADDRESS` or lets
            JAX detect the cluster (Slurm, ...). Defaults to None.
        num_processes: Processes of a `"multi_process"` run; None reads
            `JAX_NUM_PROCESSES` or the cluster. Defaults to None.
        process_id: This process's index; None reads `JAX_PROCESS_ID` or
            the cluster. Defaults to None.
        backup_dir: If set, `keras.callbacks.BackupAndRestore` backs the
            run up there at every epoch end (one folder per process), and a
            run restarted with the same settings resumes from the last
            backup and ends with the masks of an uninterrupted run. None
            disables it. Defaults to None.
        input_pipeline: `"auto"`, `"tf.data"` or `"numpy"` (see
            `keras_sfp.training.data.load_dataset`): `"auto"` takes `tf.data` when
            TensorFlow is installed. Defaults to `"auto"`.
        output_dir: Where artifacts go; `None` means `runs/<model>_<dataset>`.
            Defaults to None.
        seed: Seed of Python, NumPy, TensorFlow and the input pipeline.
            Defaults to 0.
        train_limit: Use only the first N training examples; 0 uses all.
            Defaults to 0.
        test_limit: Use only the first N test examples; 0 uses all. Defaults
            to 0.
        latency_runs: Timed calls per model for the latency median; 0 skips
            the measurement. Defaults to 50.
        verbose: Keras `fit` verbosity (1: progress bars), also passed to
            `SoftFilterPrune`. Defaults to 1.
        export: Comma-separated deployment formats (`keras_sfp.export.measure.FORMATS`)
            written to `export/` for the original and the shrunk model, with
            their `metrics.json`; empty exports nothing. They need the
            TensorFlow backend. `None` means `DEFAULT_EXPORT` on the
            TensorFlow backend and nothing on the others. Defaults to None.
    """

    model: str = "resnet20"
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    epochs: int = 4
    batch_size: int = 128
    learning_rate: float | None = None
    lr_schedule: str = "cosine"
    weight_decay: float = 2.5e-4
    rate: float | None = None
    target_macs: float | None = None
    target_latency: float | None = None
    latency_table: str | None = None
    criterion: str = "l2"
    coupling: str = "group"
    allocation: str | None = None
    schedule: str = "constant"
    hard_epochs: int | None = None
    prune_at_start: str = "true"
    reset_momentum: bool = False
    sparse_epochs: int = 0
    sparsity: float = 1e-4
    recalibration_steps: int = 100
    distill: bool = False
    init_from: str | None = None
    round_to: int = 8
    augment: bool = False
    distribute: str = "none"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    backup_dir: str | None = None
    input_pipeline: str = "auto"
    output_dir: str | None = None
    seed: int = 0
    train_limit: int = 0
    test_limit: int = 0
    latency_runs: int = 50
    verbose: int = 1
    export: str | None = None

    def __post_init__(self):
        choices = {
            "model": models.MODEL_NAMES,
            "lr_schedule": LR_SCHEDULES,
            "criterion": CRITERIA,
            "coupling": COUPLINGS,
            "schedule": PRUNING_SCHEDULES,
            "distribute": DISTRIBUTE,
            "input_pipeline": data_lib.PIPELINES,
            "prune_at_start": tuple(PRUNE_AT_START),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"`{name}` must be one of {allowed}. Received: {name}={value!r}"
                )
        minimums = {
            "epochs": 1,
            "batch_size": 1,
            "round_to": 1,
            "train_limit": 0,
            "test_limit": 0,
            "latency_runs": 0,
            "verbose": 0,
        }
        for name, low in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
                )
        if self.hard_epochs is not None and (
            isinstance(self.hard_epochs, bool)
            or not isinstance(self.hard_epochs, int)
            or self.hard_epochs < 0
        ):
            raise ValueError(
                "`hard_epochs` must be an integer >= 0 or None. "
                f"Received: hard_epochs={self.hard_epochs!r}"
            )
        if self.hard_epochs is not None and self.hard_epochs > self.epochs:
            raise ValueError(
                "`hard_epochs` must be at most `epochs`. Received: "
                f"hard_epochs={self.hard_epochs!r} with epochs={self.epochs!r}"
            )
        if self.rate is not None and not 0.0 <= self.rate < 1.0:
            raise ValueError(f"`rate` must be in [0, 1). Received: rate={self.rate!r}")
        keras_sfp.allocation.targets.check_targets(
            self.target_macs, self.target_latency, self.rate, self.coupling
        )
        keras_sfp.allocation.targets.check_allocation(
            self.allocation, self.target_latency, self.coupling
        )
        if self.target_latency is not None and self.distribute == "multi_process":
            raise ValueError(
                "`target_latency` times layers in each process, which could "
                "choose different channels per process; prune with a rate or "
                "`target_macs` across processes. Received: target_latency="
                f"{self.target_latency!r}, distribute='multi_process'"
            )
        if self.latency_table and self.target_latency is None:
            raise ValueError(
                "`latency_table` is read for `target_latency` only. Received: "
                f"latency_table={self.latency_table!r}, target_latency=None"
            )
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(
                "`learning_rate` must be > 0. "
                f"Received: learning_rate={self.learning_rate!r}"
            )
        if not self.weight_decay >= 0:
            raise ValueError(
                "`weight_decay` must be >= 0. "
                f"Received: weight_decay={self.weight_decay!r}"
            )
        given = [n for n in PROCESS_SETTINGS if getattr(self, n) is not None]
        if given and self.distribute != "multi_process":
            raise ValueError(
                f"{', '.join(f'`{n}`' for n in given)} only apply with "
                f"distribute='multi_process'. Received: distribute="
                f"{self.distribute!r}, "
                + ", ".join(f"{n}={getattr(self, n)!r}" for n in given)
            )
        if self.num_processes is not None and self.batch_size % self.num_processes:
            raise ValueError(
                "`batch_size` (the global batch) must be a multiple of "
                f"`num_processes` ({self.num_processes}). Received: "
                f"batch_size={self.batch_size!r}"
            )
        backend = keras.backend.backend()
        needed = DISTRIBUTE_BACKEND.get(self.distribute)
        if needed is not None and backend != needed:
            raise ValueError(
                f"`distribute={self.distribute!r}` needs the {needed} backend "
                f"(KERAS_BACKEND={needed}); Keras runs on {backend!r}. "
                f"Received: distribute={self.distribute!r}"
            )
        if self.export is not None and not isinstance(self.export, str):
            raise ValueError(
                "`export` must be a comma-separated string of formats or None. "
                f"Received: export={self.export!r}"
            )
        if self.export:
            if backend != "tensorflow":
                raise ValueError(
                    "`export` needs the TensorFlow backend (the exporters trace "
                    f"a tf.function); Keras runs on {backend!r}. Export the "
                    "saved shrunk.keras with `KERAS_BACKEND=tensorflow python -m "
                    "keras_sfp.export.measure`, or pass export=''. "
                    f"Received: export={self.export!r}"
                )
            from keras_sfp.export import (
                measure as deploy,
            )  # needs TensorFlow, like the export

            try:
                deploy.parse_formats(self.export)
            except ValueError as error:
                raise ValueError(
                    f"`export` must be a comma-separated subset of "
                    f"{deploy.FORMATS}. Received: export={self.export!r}"
                ) from error
        if not isinstance(self.reset_momentum, bool):
            raise ValueError(
                "`reset_momentum` must be a bool. "
                f"Received: reset_momentum={self.reset_momentum!r}"
            )
        _checks.int_at_least("recalibration_steps", self.recalibration_steps, 0)
        _checks.int_at_least("sparse_epochs", self.sparse_epochs, 0)
        if self.sparse_epochs + self.resolved_hard_epochs() > self.epochs:
            raise ValueError(
                "`sparse_epochs` plus the hard epochs must be at most `epochs`. "
                f"Received: sparse_epochs={self.sparse_epochs!r}, hard_epochs="
                f"{self.resolved_hard_epochs()}, epochs={self.epochs!r}"
            )
        if isinstance(self.sparsity, bool) or not (
            isinstance(self.sparsity, (int, float)) and self.sparsity > 0
        ):
            raise ValueError(
                "`sparsity` must be a positive number. "
                f"Received: sparsity={self.sparsity!r}"
            )
        if not isinstance(self.distill, bool):
            raise ValueError(
                f"`distill` must be a bool. Received: distill={self.distill!r}"
            )
        if self.init_from is not None and not (
            isinstance(self.init_from, (str, os.PathLike))
            and os.fspath(self.init_from).endswith(".keras")
            and os.path.isfile(self.init_from)
        ):
            raise ValueError(
                "`init_from` must be the path of an existing .keras file or "
                f"None. Received: init_from={self.init_from!r}"
            )
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(
                "`dataset` must be a non-empty dataset name. "
                f"Received: dataset={self.dataset!r}"
            )

    def resolved_hard_epochs(self) -> int:
        """`hard_epochs`, or 1 from scratch and all epochs with `init_from`."""
        if self.hard_epochs is not None:
            return self.hard_epochs
        return self.epochs if self.init_from else 1

    def resolved_allocation(self) -> str | None:
        """`allocation`, or "global" with `init_from` and group coupling."""
        if self.allocation is not None:
            return self.allocation
        fine_tune = self.init_from and self.coupling == "group"
        if fine_tune and self.target_latency is None:
            return "global"
        return None

    def resolved_learning_rate(self) -> float:
        """`learning_rate`, or the default for training from scratch or not."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return FINE_TUNE_LEARNING_RATE if self.init_from else LEARNING_RATE

    def resolved_export(self) -> str:
        """`export`, or for None: `DEFAULT_EXPORT` on TensorFlow, else ''."""
        if self.export is not None:
            return self.export
        return DEFAULT_EXPORT if keras.backend.backend() == "tensorflow" else ""

    def resolved_output_dir(self) -> str:
        """`output_dir`, or `runs/<model>_<dataset>` when it is None."""
        if self.output_dir:
            return os.fspath(self.output_dir)
        return os.path.join("runs", f"{self.model}_{self.dataset}")


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


def pruning_schedule(config: TrainConfig) -> str | None:
    """The `schedule` argument of `prune_filters` for `config`.

    `SoftFilterPrune` stretches the asymptotic schedule over the soft epochs,
    so the last re-scoring event already prunes at the target rate.
    """
    return None if config.schedule == "constant" else "asymptotic"


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


def _filters(model: keras.Model) -> dict[str, int]:
    """`{conv layer name: filters}`, unwrapping `FilterPruning`."""
    counts = {}
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, keras_sfp.FilterPruning) else layer
        if isinstance(inner, keras.layers.Conv2D):
            counts[inner.name] = int(inner.filters)
    return counts


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: dict[str, Any]) -> str:
    """The plain-text comparison of the original and the shrunk model."""
    original, shrunk = results["original"], results["shrunk"]
    header = (
        "model",
        "acc soft-masked",
        "acc shrunk",
        "params",
        "MACs",
        "ms/batch",
        "MACs ratio",
        "speedup",
    )
    rows = [header]
    for name, entry, soft in (
        ("original", original, None),
        ("shrunk", shrunk, results["soft_masked"]["accuracy"]),
    ):
        rows.append(
            (
                name,
                _fmt(soft, ".4f"),
                _fmt(entry.get("accuracy"), ".4f"),
                _fmt(entry["params"], ","),
                _fmt(entry["macs"], ","),
                _fmt(entry["ms_per_batch"], ".2f"),
                f"{original['macs'] / entry['macs']:.2f}x",
                "-" if entry["speedup"] is None else f"{entry['speedup']:.2f}x",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        f"kept MACs: {results['kept_mac_fraction']:.1%}  "
        f"kept params: {results['kept_param_fraction']:.1%}  "
        f"(batch {results['config']['batch_size']}, {results['device']})"
    )
    ratio = original["macs"] / shrunk["macs"]
    for artifact, entry in _artifact_speedups(results.get("export")).items():
        lines.append(
            f"{artifact}: speedup "
            + ", ".join(f"{s:.2f}x at batch {b}" for b, s in entry.items())
            + f" for a MACs ratio of {ratio:.2f}x"
        )
    return "\n".join(lines)


def _artifact_speedups(metrics) -> dict[str, dict[str, float]]:
    """`{artifact: {batch: original ms / shrunk ms}}` of exported artifacts
    (`keras_sfp.export.measure` records them; the Keras model is in the table)."""
    artifacts = (metrics or {}).get("models", {}).get("shrunk", {}).get("artifacts")
    return {
        fmt: entry["speedup"]
        for fmt, entry in (artifacts or {}).items()
        if fmt != "keras" and entry.get("speedup")
    }


def _callbacks(
    config: TrainConfig, output_dir: str, train_ds
) -> tuple[list, str | None]:
    """`SoftFilterPrune`, backup, CSV and (where possible) TensorBoard logging.

    Only process 0 of a multi-process run logs to files.
    """
    resuming = False
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
        resuming = os.path.exists(backup._training_metadata_path)
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
    callbacks.append(keras.callbacks.CSVLogger(csv, append=resuming))
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


def _history(history: keras.callbacks.History) -> dict[str, list[float]]:
    return {key: [float(v) for v in values] for key, values in history.history.items()}


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


def _warn_ignored_settings(config: TrainConfig, wrapper) -> None:
    """A wrapped `init_from` keeps its own pruning settings: say which differ."""
    ours = {
        "criterion": config.criterion,
        "coupling": config.coupling,
        "round_to": config.round_to,
        "schedule": pruning_schedule(config),
    }
    differ = {
        name: (value, getattr(wrapper, name))
        for name, value in ours.items()
        if value != getattr(wrapper, name)
    }
    # `rate` and `target_macs` only when given (None: the default rate).
    if config.rate is not None and config.rate != wrapper.rate:
        differ["rate"] = (config.rate, wrapper.rate)
    for name in ("target_macs", "target_latency"):
        if getattr(config, name) is not None:
            differ[name] = (getattr(config, name), f"rate {wrapper.rate}")
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
        loaded = keras.saving.load_model(config.init_from, compile=False)
        _check_fits(loaded, data, config.init_from)
        wrapped = keras_sfp.core.prune.wrappers(loaded)
        if wrapped:
            _warn_ignored_settings(config, wrapped[0])
            return keras_sfp.strip_pruning(loaded), loaded
        model = loaded
    else:
        model = models.get_model(
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

    Raises:
        ValueError: If `config` is invalid (raised by `TrainConfig`).
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
    if chief:
        os.makedirs(output_dir, exist_ok=True)
    keras.utils.set_random_seed(config.seed)

    data, train_ds, test_ds, num_train, num_test, steps_per_epoch = input_data(
        config, **shards
    )

    with distribution_scope(config):
        original, pruned = initial_models(config, data)
        trainer = pruned
        fresh = keras_sfp.core.prune.wrappers(pruned)[0].last_event < -1
        if config.distill and config.init_from and fresh:
            # The loaded network teaches the pruned one (a `pruned.keras`
            # continuing its masks has no unpruned teacher).
            trainer = keras_sfp.distiller(original, pruned)
        _compile(trainer, learning_rate_schedule(config, steps_per_epoch))
        callbacks, tensorboard_dir = _callbacks(config, output_dir, train_ds)
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
        pruned.save(artifacts["pruned"])
        shrunk.save(artifacts["shrunk"])
    if chief and keras.backend.backend() == "tensorflow":
        artifacts["saved_model"] = os.path.join(output_dir, "saved_model")
        with _tensorflow.quiet_info_logs():
            shrunk.export(
                artifacts["saved_model"], format="tf_saved_model", verbose=False
            )
    elif chief:
        logging.warning(
            "Keras runs on %s: no SavedModel or TFLite artifacts (they trace a "
            "tf.function). %s loads on every backend; export it with "
            "`KERAS_BACKEND=tensorflow python -m keras_sfp.export.measure --model=%s`.",
            keras.backend.backend(),
            artifacts["shrunk"],
            artifacts["shrunk"],
        )

    original_macs = keras_sfp.count_flops(original)
    shrunk_macs = keras_sfp.count_flops(shrunk)
    original_filters = _filters(original)
    shrunk_filters = _filters(shrunk)
    speedup = None
    if timings["original"] and timings["shrunk"]:
        speedup = timings["original"] / timings["shrunk"]
    results = {
        "device": latency.device_name(),
        "config": dataclasses.asdict(config)
        | {
            "output_dir": output_dir,
            "export": export,
            "learning_rate": config.resolved_learning_rate(),
            "rate": keras_sfp.core.prune.wrappers(pruned)[0].rate,
            "hard_epochs": config.resolved_hard_epochs(),
            "allocation": config.resolved_allocation(),
            "distill": trainer is not pruned,
            "init_from": config.init_from and os.fspath(config.init_from),
            "backend": keras.backend.backend(),
            "processes": distributed.process_count(),
        },
        "dataset": {
            "name": data.name,
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
            "num_train": num_train,
            "num_test": num_test,
        },
        "soft_masked": {
            "accuracy": float(soft["accuracy"]),
            "loss": float(soft["loss"]),
        },
        "original": {
            "params": original.count_params(),
            "macs": original_macs,
            "ms_per_batch": timings["original"],
            "speedup": 1.0 if speedup is not None else None,
        },
        "shrunk": {
            "accuracy": float(shrunk_eval["accuracy"]),
            "loss": float(shrunk_eval["loss"]),
            "params": shrunk.count_params(),
            "macs": shrunk_macs,
            "ms_per_batch": timings["shrunk"],
            "speedup": speedup,
        },
        "kept_mac_fraction": shrunk_macs / original_macs,
        "kept_param_fraction": shrunk.count_params() / original.count_params(),
        "filters": {
            name: [filters, shrunk_filters.get(name, 0)]
            for name, filters in original_filters.items()
        },
        "history": _history(history),
        "train_seconds": train_seconds,
        "artifacts": artifacts,
    }
    if export and chief:
        artifacts["export"] = os.path.join(output_dir, "export")
        results["export"] = export_artifacts(
            config, data, pruned, shrunk, artifacts["export"]
        )
    results["table"] = format_table(results)
    if chief:
        with open(artifacts["results"], "w") as f:
            json.dump(results, f, indent=2)
        print(results["table"])
    # The others wait for process 0's timing and writing, then all exit.
    distributed.barrier("train_and_evaluate")
    return results


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
        The metrics of `keras_sfp.export.measure.export_and_measure`.
    """
    test_limit = config.test_limit or None
    from keras_sfp.export import (
        measure as deploy,
    )  # TensorFlow, needed for the artifacts

    representative, _ = data_lib.as_arrays(data.train, 200)
    metrics = deploy.export_and_measure(
        {"original": keras_sfp.strip_pruning(pruned), "shrunk": shrunk},
        export_dir,
        config.resolved_export(),
        data_lib.as_arrays(data.test, test_limit),
        representative_data=representative,
        latency_runs=config.latency_runs,
    )
    print(metrics["table"])
    return metrics


def _define_flags() -> None:
    d = TrainConfig()
    flags.DEFINE_enum("model", d.model, models.MODEL_NAMES, "Model to train.")
    flags.DEFINE_string(
        "dataset", d.dataset, "fashion_mnist or a TFDS image-classification name."
    )
    flags.DEFINE_string("data_dir", d.data_dir, "Data directory (None: default).")
    flags.DEFINE_integer("epochs", d.epochs, "Training epochs.", lower_bound=1)
    flags.DEFINE_integer("batch_size", d.batch_size, "Batch size.", lower_bound=1)
    flags.DEFINE_float(
        "learning_rate",
        d.learning_rate,
        f"Initial learning rate (default {LEARNING_RATE}, "
        f"{FINE_TUNE_LEARNING_RATE} with --init_from).",
    )
    flags.DEFINE_enum(
        "lr_schedule", d.lr_schedule, LR_SCHEDULES, "Learning-rate schedule."
    )
    flags.DEFINE_float(
        "weight_decay", d.weight_decay, "L2 kernel regularizer (Keras semantics)."
    )
    flags.DEFINE_float(
        "rate", d.rate, "Fraction of filters pruned per group (default 0.3)."
    )
    flags.DEFINE_float(
        "target_macs", d.target_macs, "Fraction of MACs to keep, instead of --rate."
    )
    flags.DEFINE_float(
        "target_latency",
        d.target_latency,
        "Fraction of the predicted latency to keep (per-layer table of this "
        "device), instead of --rate.",
    )
    flags.DEFINE_string(
        "latency_table",
        d.latency_table,
        "JSON latency table for --target_latency (default: this device's cache).",
    )
    flags.DEFINE_enum("criterion", d.criterion, CRITERIA, "Filter criterion.")
    flags.DEFINE_enum("coupling", d.coupling, COUPLINGS, "Residual coupling.")
    flags.DEFINE_enum(
        "allocation",
        d.allocation,
        list(keras_sfp.allocation.targets.ALLOCATIONS),
        "Channels per group: uniform rate, or global importance ranking.",
    )
    flags.DEFINE_integer(
        "sparse_epochs",
        d.sparse_epochs,
        "First epochs trained with a group lasso, before pruning.",
        lower_bound=0,
    )
    flags.DEFINE_float("sparsity", d.sparsity, "Weight of the group lasso.")
    flags.DEFINE_enum(
        "schedule", d.schedule, PRUNING_SCHEDULES, "Pruning-rate schedule."
    )
    flags.DEFINE_integer(
        "hard_epochs",
        d.hard_epochs,
        "Final epochs with enforced masks (default 1, all with --init_from).",
        lower_bound=0,
    )
    flags.DEFINE_enum(
        "prune_at_start",
        d.prune_at_start,
        list(PRUNE_AT_START),
        "Prune before the first epoch (auto: only a trained model).",
    )
    flags.DEFINE_bool(
        "reset_momentum", d.reset_momentum, "Zero optimizer slots of pruned filters."
    )
    flags.DEFINE_integer(
        "recalibration_steps",
        d.recalibration_steps,
        "Batches to re-estimate BatchNormalization statistics on at the end (0: off).",
        lower_bound=0,
    )
    flags.DEFINE_bool(
        "distill",
        d.distill,
        "Distill from the --init_from model while fine-tuning it.",
    )
    flags.DEFINE_string(
        "init_from", d.init_from, "A trained .keras model to fine-tune with SFP."
    )
    flags.DEFINE_integer(
        "round_to", d.round_to, "Kept channels are multiples of this.", lower_bound=1
    )
    flags.DEFINE_bool("augment", d.augment, "Pad-crop-flip augmentation.")
    flags.DEFINE_enum("distribute", d.distribute, DISTRIBUTE, "Distribution strategy.")
    flags.DEFINE_string(
        "coordinator_address",
        d.coordinator_address,
        "multi_process: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS "
        "or the cluster's).",
    )
    flags.DEFINE_integer(
        "num_processes",
        d.num_processes,
        "multi_process: number of processes (default: $JAX_NUM_PROCESSES or "
        "the cluster's).",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "process_id",
        d.process_id,
        "multi_process: this process's index (default: $JAX_PROCESS_ID or the "
        "cluster's).",
        lower_bound=0,
    )
    flags.DEFINE_string(
        "backup_dir",
        d.backup_dir,
        "BackupAndRestore folder: a restarted run resumes from its last epoch.",
    )
    flags.DEFINE_enum(
        "input_pipeline",
        d.input_pipeline,
        data_lib.PIPELINES,
        "Input pipeline (auto: tf.data when TensorFlow is installed).",
    )
    flags.DEFINE_string(
        "output_dir", d.output_dir, "Output directory (default runs/<model>_<dataset>)."
    )
    flags.DEFINE_integer("seed", d.seed, "Random seed.")
    flags.DEFINE_integer(
        "train_limit", d.train_limit, "Training examples (0: all).", lower_bound=0
    )
    flags.DEFINE_integer(
        "test_limit", d.test_limit, "Test examples (0: all).", lower_bound=0
    )
    flags.DEFINE_integer(
        "latency_runs", d.latency_runs, "Timed calls (0: skip).", lower_bound=0
    )
    flags.DEFINE_integer("verbose", d.verbose, "Keras fit verbosity.", lower_bound=0)
    flags.DEFINE_string(
        "export",
        d.export,
        "Comma-separated formats of keras_sfp.export.measure.FORMATS (default: "
        f"{DEFAULT_EXPORT} on the TensorFlow backend, none on the others).",
    )


_define_flags()
FLAGS = flags.FLAGS


def config_from_flags() -> TrainConfig:
    """A `TrainConfig` from the parsed command-line flags."""
    return TrainConfig(
        **{
            field.name: FLAGS[field.name].value
            for field in dataclasses.fields(TrainConfig)
        }
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train_and_evaluate(config_from_flags())


def run_main() -> None:
    """Console-script entry point (`keras-sfp-train`)."""
    app.run(main)


if __name__ == "__main__":
    run_main()
