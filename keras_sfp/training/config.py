"""`TrainConfig`: every setting of a training run, each described once.

Each field's `metadata` holds its `help` (the one description of the option:
the command line's `--help` and this class's docstring are made from it), its
`choices` (lists that come from the library where it has one) and its
`minimum`. `keras_sfp.cli.train` generates the flags from the fields; nothing
here registers a flag.

The model zoo `models` is a top-level package of the repository checkout, not
installed with `keras_sfp`: without it (an installed `keras-sfp-train` run
outside the checkout) only `init_from` runs, which need no model from the zoo.

Over 400 lines for one reason: the help of the 40 options lives here, once,
next to the field it describes, and the checks of their combinations with it.
"""

from __future__ import annotations

import dataclasses
import os

import keras

from keras_sfp import _checks
from keras_sfp.allocation import targets
from keras_sfp.core import criteria, schedules, wrapper
from keras_sfp.training import data as data_lib
from keras_sfp.training import files

try:  # the repository's model zoo (see the module docstring)
    import models
except ImportError:  # pragma: no cover - only outside a checkout
    models = None

MODEL_NAMES = models.MODEL_NAMES if models is not None else ()
LR_SCHEDULES = ("cosine", "step", "constant")
CRITERIA = criteria.CRITERIA
COUPLINGS = wrapper.COUPLINGS
ALLOCATIONS = targets.ALLOCATIONS
PRUNE_AT_START = {"auto": "auto", "true": True, "false": False}
# Fine-tuning a trained model (`init_from`) starts at a tenth of the
# from-scratch learning rate.
LEARNING_RATE = 0.1
FINE_TUNE_LEARNING_RATE = 0.01
PRUNING_SCHEDULES = schedules.NAMES
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


def option(default, help: str, choices=None, minimum=None):  # noqa: A002
    """A `TrainConfig` field with its help, choices and lower bound."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if minimum is not None:
        metadata["minimum"] = minimum
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `keras_sfp.training.run.train_and_evaluate` needs.

    Each field is also a flag of `keras-sfp-train` (`train.py`); the
    attributes and their help are listed below.
    """

    model: str = option(
        "resnet20", "A name in `models.MODEL_NAMES`.", choices=MODEL_NAMES or None
    )
    dataset: str = option(
        "fashion_mnist", "fashion_mnist or a TFDS image-classification name."
    )
    data_dir: str | None = option(
        None,
        "Directory of the data (see keras_sfp.training.data.load_dataset); "
        "None for the default location.",
    )
    epochs: int = option(4, "Training epochs.", minimum=1)
    batch_size: int = option(
        128, "Global batch size, also the batch of the latency measurement.", minimum=1
    )
    learning_rate: float | None = option(
        None,
        "Initial learning rate of SGD (Nesterov momentum 0.9); None means "
        f"{LEARNING_RATE} from scratch and {FINE_TUNE_LEARNING_RATE} with "
        "init_from.",
    )
    lr_schedule: str = option(
        "cosine",
        "cosine (decay to 0 over training), step (divide by 5 at 30, 60 and "
        "80 % of training, the paper's recipe) or constant.",
        choices=LR_SCHEDULES,
    )
    weight_decay: float = option(
        2.5e-4,
        "Coefficient of the L2 kernel regularizer of the model (Keras "
        "semantics: half of PyTorch's SGD weight_decay; 2.5e-4 is the paper's "
        "5e-4).",
    )
    rate: float | None = option(
        None,
        "Fraction of the filters of each channel group to prune; None means "
        "0.3 (or the rate that reaches target_macs).",
    )
    target_macs: float | None = option(
        None,
        "Fraction of the model's MACs to keep instead of a rate "
        "(prune_filters(target_macs=...)).",
    )
    target_latency: float | None = option(
        None,
        "Fraction of the model's predicted latency to keep instead of a rate "
        "(prune_filters(target_latency=...), per-layer latencies measured on "
        "this device at batch 1).",
    )
    latency_table: str | None = option(
        None,
        "The JSON file of the latency table target_latency reads and extends; "
        "None uses the one cached for this device "
        "(keras_sfp.LatencyTable.for_device).",
    )
    criterion: str = option(
        "l2", "Filter criterion (see keras_sfp.criteria).", choices=CRITERIA
    )
    coupling: str = option("group", "Residual coupling.", choices=COUPLINGS)
    allocation: str | None = option(
        None,
        "prune_filters(allocation=...): uniform, global (one importance "
        "ranking across groups under the MACs budget; it reads the weights, "
        "so it is meant for init_from) or None: global with init_from and "
        "coupling=group (from trained networks it measured as accurate as "
        "uniform at half and a quarter of the MACs, and 6 points more "
        "accurate at a tenth, bench/accuracy.py), else uniform (or global "
        "by latency with target_latency).",
        choices=ALLOCATIONS,
    )
    schedule: str = option(
        "constant",
        "Pruning-rate schedule: constant or asymptotic (ASFP; it reaches rate "
        "at the last epoch whose masks are re-scored).",
        choices=PRUNING_SCHEDULES,
    )
    hard_epochs: int | None = option(
        None,
        "Final epochs with frozen, enforced masks (SoftFilterPrune("
        "hard_epochs=...)), at most epochs; None means 1 from scratch and all "
        "of them with init_from (prune once, then fine-tune with frozen "
        "masks: on short fine-tuning runs this measured better than soft "
        "epochs; docs/benchmarks.md, Fine-tuning a trained network).",
        minimum=0,
    )
    prune_at_start: str = option(
        "true",
        "SoftFilterPrune(prune_at_start=...): true (the paper), auto (prune "
        "before training only a trained model) or false.",
        choices=PRUNE_AT_START,
    )
    reset_momentum: bool = option(
        False,
        "SoftFilterPrune(reset_momentum=...): zero the optimizer slots of the "
        "filters each event prunes.",
    )
    sparse_epochs: int = option(
        0,
        "SoftFilterPrune(sparse_epochs=...): first epochs trained with a "
        "group lasso and no prune event.",
        minimum=0,
    )
    sparsity: float = option(
        1e-4, "SoftFilterPrune(sparsity=...), the group lasso's weight."
    )
    recalibration_steps: int = option(
        100,
        "Batches of training data from which SoftFilterPrune re-estimates the "
        "BatchNormalization statistics when training ends "
        "(recalibrate_batch_norm); 0 leaves them to the callback's restarted "
        "averages alone. Multi-process runs skip it (each process would see "
        "other data).",
        minimum=0,
    )
    distill: bool = option(
        False,
        "With init_from (a trained, unwrapped model): train the pruned model "
        "as the student of a keras.distillation.Distiller whose teacher is "
        "the loaded model (keras_sfp.distiller). Off by default: on two-epoch "
        "fine-tunes it measured 2.1 points below plain fine-tuning "
        "(bench/fine_tune.py).",
    )
    init_from: str | None = option(
        None,
        "A .keras file to start from instead of a new model: a trained Keras "
        "model (pruned with prune_filters here) or a pruned.keras written by "
        "this program (training continues with its masks). Its input and "
        "output must fit the dataset; its architecture and regularizers "
        "replace model and weight_decay. None trains from scratch.",
    )
    round_to: str = option(
        "auto",
        "Kept channel counts are multiples of this, balanced across groups "
        "(see prune_filters); auto: the multiple this machine's kernels run "
        "fastest at (16 on a CPU with AVX-512, 8 with AVX2 or on a GPU, 4 "
        "with NEON).",
    )
    augment: bool = option(False, "Pad-crop-flip augmentation of the training images.")
    distribute: str = option(
        "none",
        "none, mirrored (tf.distribute.MirroredStrategy over all local "
        "devices; TensorFlow backend), data_parallel "
        "(keras.distribution.DataParallel over all local devices; JAX "
        "backend) or multi_process (DataParallel over the devices of several "
        "processes joined by jax.distributed: each process feeds "
        "batch_size / num_processes examples of every global batch, only "
        "process 0 writes files; JAX backend). The global batch is "
        "batch_size.",
        choices=DISTRIBUTE,
    )
    coordinator_address: str | None = option(
        None,
        "multi_process: host:port of process 0; None reads "
        "$JAX_COORDINATOR_ADDRESS or lets JAX detect the cluster (Slurm, ...).",
    )
    num_processes: int | None = option(
        None,
        "multi_process: number of processes; None reads $JAX_NUM_PROCESSES or "
        "the cluster.",
        minimum=1,
    )
    process_id: int | None = option(
        None,
        "multi_process: this process's index; None reads $JAX_PROCESS_ID or "
        "the cluster.",
        minimum=0,
    )
    backup_dir: str | None = option(
        None,
        "If set, keras.callbacks.BackupAndRestore backs the run up there at "
        "every epoch end (one folder per process), and a run restarted with "
        "the same settings resumes from the last backup and ends with the "
        "masks of an uninterrupted run. None disables it.",
    )
    input_pipeline: str = option(
        "auto",
        "Input pipeline (see keras_sfp.training.data.load_dataset): auto "
        "takes tf.data when TensorFlow is installed.",
        choices=data_lib.PIPELINES,
    )
    output_dir: str | None = option(
        None,
        "Where artifacts go; None means runs/<model>_<dataset>. An existing "
        "non-empty folder is refused unless overwrite is set or the run "
        "resumes from a backup in backup_dir; every file is written "
        "atomically (a temporary file, then a rename).",
    )
    overwrite: bool = option(
        False,
        "Write into an existing non-empty output_dir, replacing the files of "
        "the earlier run there (each only once its new version is complete; "
        "other files are left).",
    )
    seed: int = option(0, "Seed of Python, NumPy, TensorFlow and the input pipeline.")
    train_limit: int = option(
        0, "Use only the first N training examples; 0 uses all.", minimum=0
    )
    test_limit: int = option(
        0, "Use only the first N test examples; 0 uses all.", minimum=0
    )
    latency_runs: int = option(
        50,
        "Timed calls per model for the latency median; 0 skips the measurement.",
        minimum=0,
    )
    verbose: int = option(
        1,
        "Keras fit verbosity (1: progress bars), also passed to SoftFilterPrune.",
        minimum=0,
    )
    export: str | None = option(
        None,
        "Comma-separated deployment formats (keras_sfp.export.measure.FORMATS, "
        "checked there: it imports TensorFlow) written to export/ for the "
        "original and the shrunk model, with their metrics.json; empty "
        "exports nothing. They need the TensorFlow backend. None means "
        f"{DEFAULT_EXPORT} on the TensorFlow backend and nothing on the others.",
    )

    def __post_init__(self):
        _validate(self)

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


def _validate(config: TrainConfig) -> None:
    """The checks of `TrainConfig.__post_init__`, in the order they run."""
    for field in options():
        # Optional choices (allocation) are checked by their library function.
        value, allowed = getattr(config, field.name), field.metadata.get("choices")
        if allowed and field.default is not None:
            if value not in allowed:
                raise ValueError(
                    f"`{field.name}` must be one of {allowed}. "
                    f"Received: {field.name}={value!r}"
                )
    for field in options():  # the integers that may not be None
        minimum = field.metadata.get("minimum")
        if minimum is not None and field.default is not None:
            value = _checks.int_at_least(
                field.name, getattr(config, field.name), minimum
            )
            object.__setattr__(config, field.name, value)  # NumPy ints as ints
    object.__setattr__(config, "round_to", _round_to(config.round_to))
    hard_epochs = _checks.optional_int_at_least("hard_epochs", config.hard_epochs, 0)
    object.__setattr__(config, "hard_epochs", hard_epochs)
    if config.hard_epochs is not None and config.hard_epochs > config.epochs:
        raise ValueError(
            "`hard_epochs` must be at most `epochs`. Received: "
            f"hard_epochs={config.hard_epochs!r} with epochs={config.epochs!r}"
        )
    if config.rate is not None and not 0.0 <= config.rate < 1.0:
        raise ValueError(f"`rate` must be in [0, 1). Received: rate={config.rate!r}")
    targets.check_targets(
        config.target_macs, config.target_latency, config.rate, config.coupling
    )
    targets.check_allocation(config.allocation, config.target_latency, config.coupling)
    if config.target_latency is not None and config.distribute == "multi_process":
        raise ValueError(
            "`target_latency` times layers in each process, which could "
            "choose different channels per process; prune with a rate or "
            "`target_macs` across processes. Received: target_latency="
            f"{config.target_latency!r}, distribute='multi_process'"
        )
    if config.latency_table and config.target_latency is None:
        raise ValueError(
            "`latency_table` is read for `target_latency` only. Received: "
            f"latency_table={config.latency_table!r}, target_latency=None"
        )
    if config.learning_rate is not None and not config.learning_rate > 0:
        raise ValueError(
            "`learning_rate` must be > 0. "
            f"Received: learning_rate={config.learning_rate!r}"
        )
    if not config.weight_decay >= 0:
        raise ValueError(
            "`weight_decay` must be >= 0. "
            f"Received: weight_decay={config.weight_decay!r}"
        )
    given = [n for n in PROCESS_SETTINGS if getattr(config, n) is not None]
    if given and config.distribute != "multi_process":
        raise ValueError(
            f"{', '.join(f'`{n}`' for n in given)} only apply with "
            f"distribute='multi_process'. Received: distribute="
            f"{config.distribute!r}, "
            + ", ".join(f"{n}={getattr(config, n)!r}" for n in given)
        )
    if config.num_processes is not None and config.batch_size % config.num_processes:
        raise ValueError(
            "`batch_size` (the global batch) must be a multiple of "
            f"`num_processes` ({config.num_processes}). Received: "
            f"batch_size={config.batch_size!r}"
        )
    backend = keras.backend.backend()
    needed = DISTRIBUTE_BACKEND.get(config.distribute)
    if needed is not None and backend != needed:
        raise ValueError(
            f"`distribute={config.distribute!r}` needs the {needed} backend "
            f"(KERAS_BACKEND={needed}); Keras runs on {backend!r}. "
            f"Received: distribute={config.distribute!r}"
        )
    _validate_export(config.export, backend)
    for name in ("reset_momentum", "distill", "overwrite"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(
                f"`{name}` must be a bool. Received: {name}={getattr(config, name)!r}"
            )
    if config.sparse_epochs + config.resolved_hard_epochs() > config.epochs:
        raise ValueError(
            "`sparse_epochs` plus the hard epochs must be at most `epochs`. "
            f"Received: sparse_epochs={config.sparse_epochs!r}, hard_epochs="
            f"{config.resolved_hard_epochs()}, epochs={config.epochs!r}"
        )
    if isinstance(config.sparsity, bool) or not (
        isinstance(config.sparsity, (int, float)) and config.sparsity > 0
    ):
        raise ValueError(
            "`sparsity` must be a positive number. "
            f"Received: sparsity={config.sparsity!r}"
        )
    if config.init_from is not None and not (
        isinstance(config.init_from, (str, os.PathLike))
        and os.fspath(config.init_from).endswith(".keras")
        and os.path.isfile(config.init_from)
    ):
        raise ValueError(
            "`init_from` must be the path of an existing .keras file or "
            f"None. Received: init_from={config.init_from!r}"
        )
    if config.init_from is not None:
        files.check_keras_file(config.init_from, "init_from")
    data_lib.check_dataset_name(config.dataset, "dataset")
    for name in ("backup_dir", "output_dir"):
        files.check_folder_path(name, getattr(config, name))
    if models is None and config.init_from is None:
        raise ValueError(
            "Training a new `model` needs the repository's model zoo `models` "
            "(run from a checkout of keras-sfp), or pass `init_from`. "
            f"Received: model={config.model!r}, init_from=None"
        )


def _round_to(value):
    """`"auto"`, or the positive int `value` names (a flag gives a string)."""
    number = value
    if isinstance(value, str) and value.strip().isdecimal():
        number = int(value)
    return _checks.round_to(number, received=value)


def _validate_export(export, backend: str) -> None:
    if export is not None and not isinstance(export, str):
        raise ValueError(
            "`export` must be a comma-separated string of formats or None. "
            f"Received: export={export!r}"
        )
    if not export:
        return
    if backend != "tensorflow":
        raise ValueError(
            "`export` needs the TensorFlow backend (the exporters trace "
            f"a tf.function); Keras runs on {backend!r}. Export the "
            "saved shrunk.keras with `KERAS_BACKEND=tensorflow "
            "keras-sfp-export`, or pass export=''. "
            f"Received: export={export!r}"
        )
    # Imported here: it needs TensorFlow, like the export.
    from keras_sfp.export import measure

    try:
        measure.parse_formats(export)
    except ValueError as error:
        raise ValueError(
            f"`export` must be a comma-separated subset of "
            f"{measure.FORMATS}. Received: export={export!r}"
        ) from error


def options() -> list[dataclasses.Field]:
    """`TrainConfig`'s fields: name, default, `metadata["help"]`, ..."""
    return list(dataclasses.fields(TrainConfig))


TrainConfig.__doc__ += "\n    Attributes:\n" + "".join(
    f"        {f.name}: {f.metadata['help']} Defaults to {f.default!r}.\n"
    for f in options()
)
