"""SFP against the obvious alternatives, at equal realised MACs and epoch budgets.

Why one module of over 400 lines: the recipes, their equal-MACs matching
and the seeds loop are one experiment's definition, read together when a
row changes; the job runner is `bench.jobs`, the report
`bench.accuracy_report`.

Every configuration is one `keras_sfp.training.run.train_and_evaluate` run (ResNet-20 on
Fashion-MNIST), repeated over seeds, and reported as the mean and standard
deviation of the deployed (shrunk) model's test accuracy, with the
soft-masked accuracy, the MACs kept and the filters revived over the run.

From scratch (`scratch/...`), all with the same number of epochs:
- `unpruned`: the full network.
- `scratch_arch`: the architecture `sfp_v1` deploys (every group-coupled
  configuration deploys the same shapes at one rate), re-initialised and
  trained from scratch (equal MACs by construction).
- `uniform`: a uniformly narrower ResNet-20 (`width`), the width whose MACs
  are nearest to `sfp_v1`'s.
- `sfp_paper`: the reference code (per-layer choice, prune before training,
  no hard epoch, L2).
- `sfp_v1`: keras-sfp's previous defaults (group coupling, prune before
  training, `hard_epochs=1`, L2).
- `sfp_delay`: `sfp_v1` with `prune_at_start="auto"` (from scratch, the first
  event is after the first epoch, so pruned filters can come back).
- `sfp_l2bn`: `sfp_delay` with the BatchNormalization-aware criterion
  `"l2_bn"`.
- `sfp_l2bn_reset`: `sfp_l2bn` with `reset_momentum=True`.
- `asfp`: `sfp_l2bn` with the asymptotic schedule.
- `fpgm`: `sfp_l2bn` with the FPGM criterion.

From a trained network (`trained/...`): each seed's `scratch/unpruned` model,
fine-tuned for `finetune_epochs` at `config_lib.FINE_TUNE_LEARNING_RATE`:
- `unpruned`: fine-tuned without pruning (the reference to stay close to).
- `hard_once`: prune once by L2 and fine-tune with frozen masks (Li et al.,
  ICLR 2017): `hard_epochs` = all epochs, one rate everywhere.
- `sfp_paper`, `sfp_v1`, `sfp_l2bn`, `asfp`, `fpgm` as above, one rate
  everywhere.
- `global`: `hard_once` with `allocation="global"` at the same MACs
  (`train.py --init_from`'s default recipe).
- `kd`, `kd_global`: `hard_once` and `global` as the student of a
  `keras.distillation.Distiller` whose teacher is the trained network
  (`distill=True`).
- `sparse_kd_global`: `kd_global` whose first epoch trains with the group
  lasso (`sparse_epochs=1`) before the one prune event.
- `kd_sfp`: `sfp_v1` with distillation (SFP's soft schedule).
Every pruned configuration names its allocation: `train.py --init_from`
allocates globally by default, and the trained `hard_once` and `sfp_v1`
rows of commit 48ba500 did so without saying it (they were re-run).

From both starts, `tfmot_plm`: `tensorflow-model-optimization`'s
`prune_low_magnitude` on a `tf_keras` copy of the same network (the seed's
initial or trained weights copied layer by layer), with the same recipe,
pruned to the non-zero kernel weights of `sfp_v1`'s deployed model at the
same rate and seed (`bench/tfmot_baseline.py`). Its rows also carry the
gzipped size and batch-1 TFLite latency of the stripped tfmot model and of
the SFP model, timed alternately; the markdown adds a table pairing the two.
The stripped model keeps every dense MAC (`MACs kept` 100 %). It needs
TensorFlow with `tf_keras` and `tensorflow-model-optimization` (the `bench`
extra) whatever the Keras backend.

Every seed starts all its configurations from the same initial weights (and
the trained ones from the same trained network), so the comparison is paired.
Every setting keeps Keras's default BatchNormalization momentum (0.99).
The short settings used 0.9 until the library fixed what that hid: with
0.99 the moving statistics of a 128-step run lagged the weights so far that
a ResNet-20 with 87 % training accuracy scored 34 % on the test set,
whatever the pruning. Now `SoftFilterPrune` restarts the statistics at the
first hard epoch and `train_and_evaluate` re-estimates them from 100
training batches when training ends (`recalibration_steps`), for every
configuration here, the unpruned ones included. `bench.fine_tune` keeps the
rows that show the collapse without that (`sfp_keras_bn`).

    python -m bench.accuracy              # reduced: ~42 minutes on 2 CPU cores
    python -m bench.accuracy --only=all   # every configuration: ~2.7 hours
    python -m bench.accuracy --rates=0.5,0.7 \
        --only=trained/unpruned,trained/hard_once,trained/global  # other rates
    KERAS_BACKEND=jax python -m bench.accuracy --setting=full --workers=12 \
        --deadline_minutes=60             # a GPU

Results go to `bench/results/accuracy_<setting>.{md,json,png}` (with each
configuration's paired differences from its baselines, made by
`bench/accuracy_report.py`); finished runs are
kept in `runs/accuracy/<setting>/runs.jsonl`, so an interrupted benchmark
resumes where it stopped, and `--report_only` rewrites the tables from it.
A logged run whose output a new run starts from (the trained network, the
architecture `scratch_arch` retrains) is trained again where its folder is
missing (a log carried without its run folders), and says whether it is the
same run: carry the folders to keep new rows paired with logged ones.
`--workers` runs that many jobs at once, each in its own process: one small
ResNet leaves a GPU mostly idle (on one H200, 12 processes sharing it through
MPS ran 15-epoch runs in 108-206 s each). Start NVIDIA's MPS daemon first
(`nvidia-cuda-mps-control -d`) so that their kernels run side by side; JAX's
memory preallocation is turned off here so that the processes fit.
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app, flags

# On JAX, each process would otherwise reserve 75% of the GPU's memory, and
# `--workers` processes (and this one) share one GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import keras  # noqa: E402

import keras_sfp  # noqa: E402
import models  # noqa: E402
from bench import accuracy_report, tfmot_baseline  # noqa: E402
from bench import jobs as jobs_lib  # noqa: E402
from keras_sfp.training import config as config_lib  # noqa: E402
from keras_sfp.training import run as run_lib  # noqa: E402

SETTINGS = {
    # 2 CPU cores, about 42 minutes (9 configurations x 3 seeds and the
    # rate sweep, 39 runs, measured):
    # 4,000 training images, short schedules, the comparisons that choose the
    # defaults. `--only=all` adds every other configuration (87 runs, about
    # 2.7 hours).
    "reduced": dict(
        train_limit=4000,
        test_limit=2000,
        epochs=4,
        finetune_epochs=2,
        rates=(0.3,),
        sweep_rates=(0.5, 0.7),
        sweep=(("scratch", "sfp_v1"), ("scratch", "scratch_arch")),
        bn_momentum=0.99,
        only=(
            "scratch/unpruned",
            "scratch/scratch_arch",
            "scratch/sfp_v1",
            "scratch/sfp_l2bn",
            "trained/unpruned",
            "trained/hard_once",
            "trained/sfp_v1",
            "trained/global",
            "trained/kd_global",
        ),
    ),
    # Minutes: checks that the benchmark runs end to end.
    "smoke": dict(
        train_limit=256,
        test_limit=128,
        epochs=2,
        finetune_epochs=2,
        rates=(0.3,),
        sweep_rates=(0.5,),
        sweep=(
            ("scratch", "sfp_v1"),
            ("scratch", "scratch_arch"),
            ("scratch", "uniform"),
        ),
        bn_momentum=0.99,
        only=None,
    ),
    # A GPU: the full data, every configuration at every rate, in priority
    # order (the comparisons that choose the defaults, then the curves of the
    # main configurations, then the rest), so that a run cut short by
    # `--deadline_minutes` still answers the main questions.
    "full": dict(
        train_limit=0,
        test_limit=0,
        epochs=15,
        finetune_epochs=5,
        rates=(0.3, 0.5, 0.7),
        sweep_rates=(0.5, 0.7),
        sweep=(
            ("scratch", "scratch_arch"),
            ("scratch", "sfp_v1"),
            ("trained", "hard_once"),
            ("trained", "global"),
            ("trained", "kd_global"),
            ("trained", "sfp_v1"),
            ("scratch", "uniform"),
            ("scratch", "sfp_l2bn"),
            ("trained", "sfp_l2bn"),
        ),
        bn_momentum=0.99,
        only=None,
    ),
}

# name -> TrainConfig overrides (applied on top of the setting's).
# The comparisons use the paper's kept counts (`round_to=1`, the default
# when they were measured); `sfp_r8` is `sfp_v1` with multiples of 8,
# balanced across groups (the default before `round_to="auto"`).
_PAPER = dict(
    coupling="layer", hard_epochs=0, prune_at_start="true", criterion="l2", round_to=1
)
_V1 = dict(hard_epochs=1, prune_at_start="true", criterion="l2", round_to=1)
_BN = dict(hard_epochs=1, prune_at_start="auto", criterion="l2_bn", round_to=1)
UNPRUNED = dict(rate=0.0, hard_epochs=0)
SCRATCH = {
    "unpruned": UNPRUNED,
    "scratch_arch": UNPRUNED,
    "uniform": UNPRUNED,
    "sfp_paper": _PAPER,
    "sfp_v1": _V1,
    "sfp_r8": dict(_V1, round_to=8),
    "sfp_delay": dict(_V1, prune_at_start="auto"),
    "sfp_l2bn": _BN,
    "sfp_l2bn_reset": dict(_BN, reset_momentum=True),
    "asfp": dict(_BN, schedule="asymptotic"),
    "fpgm": dict(_BN, criterion="fpgm"),
}
# From a trained network, `hard_epochs=None` is every epoch after the
# sparse ones (prune once).
_ONCE = dict(prune_at_start="true", criterion="l2", hard_epochs=None, round_to=1)
_UNIFORM = dict(allocation="uniform")
TRAINED = {
    "unpruned": UNPRUNED,
    "hard_once": dict(_ONCE, **_UNIFORM),
    "sfp_paper": _PAPER,
    "sfp_v1": dict(_V1, **_UNIFORM),
    "sfp_l2bn": dict(_BN, **_UNIFORM),
    "asfp": dict(_BN, schedule="asymptotic", **_UNIFORM),
    "fpgm": dict(_BN, criterion="fpgm", **_UNIFORM),
    "global": dict(_ONCE, allocation="global"),
    "kd": dict(_ONCE, distill=True, **_UNIFORM),
    "kd_global": dict(_ONCE, allocation="global", distill=True),
    "sparse_kd_global": dict(_ONCE, allocation="global", distill=True, sparse_epochs=1),
    "kd_sfp": dict(_V1, distill=True, **_UNIFORM),
}
# `tensorflow-model-optimization`'s `prune_low_magnitude` on a `tf_keras` copy
# (`bench/tfmot_baseline.py`), from scratch and from the trained network, at
# the non-zero kernel weights of `REFERENCE`'s deployed model.
TFMOT = tfmot_baseline.NAME
CONFIGURATIONS = {"scratch": SCRATCH, "trained": TRAINED}
# The configuration whose deployed architecture `scratch_arch` retrains and
# whose MACs `uniform` matches (every group-coupled configuration at one rate
# deploys the same MACs).
REFERENCE = "sfp_v1"
# Per start, the baselines each configuration is paired with (same seed).
BASELINES = {
    "scratch": ("scratch_arch", "unpruned"),
    "trained": ("hard_once", "unpruned"),
}
# Rows of the tables, per start, in this order.
ORDER = {start: [*names, TFMOT] for start, names in CONFIGURATIONS.items()}

_SETTING = flags.DEFINE_enum("setting", "reduced", list(SETTINGS), "Setting.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_ONLY = flags.DEFINE_list(
    "only",
    [],
    "Run only these `start/name` configurations (`all`: every one; empty: the "
    "setting's `only`).",
)
_RATES = flags.DEFINE_list(
    "rates",
    [],
    "Run the configurations at these rates (empty: the setting's `rates`), "
    "such as `--rates=0.5,0.7 --only=trained/hard_once` for the reduced "
    "setting's curve from a trained network; the tables show every logged rate.",
)
_ROOT = flags.DEFINE_string("root", "runs/accuracy", "Where runs are written.")
_RESULTS = flags.DEFINE_string("results", "bench/results", "Where tables go.")
_WORKERS = flags.DEFINE_integer(
    "workers",
    1,
    "Jobs run at once, each in its own process (several fill a GPU that one "
    "small ResNet leaves mostly idle).",
    lower_bound=1,
)
_DEADLINE = flags.DEFINE_float(
    "deadline_minutes",
    0.0,
    "With --workers > 1: finish within this many minutes (0: no limit), "
    "starting a job only if the jobs like it so far say it ends in time; the "
    "tables report what finished.",
    lower_bound=0.0,
)
_JOB = flags.DEFINE_string(
    "job", None, "Run only this `start/name/r<rate>/s<seed>` job (a worker)."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Fashion-MNIST folder (None: Debian's, else keras.datasets)."
)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Write the tables from the logged runs; train nothing."
)


def resolve(overrides: dict, rate: float, epochs: int) -> dict:
    """A configuration's `TrainConfig` overrides for one run: `rate` (unless
    unpruned) and `hard_epochs=None` as every epoch after the sparse ones."""
    overrides = dict(overrides)
    if overrides.get("hard_epochs", 0) is None:
        overrides["hard_epochs"] = epochs - overrides.get("sparse_epochs", 0)
    if overrides.get("rate", rate) != 0.0:
        overrides["rate"] = rate
    return overrides


def _width_for(kept_fraction: float, input_shape, num_classes) -> float:
    """The ResNet-20 width whose MACs fraction is nearest `kept_fraction`.

    MACs grow with the width, so a bisection over widths (a dozen builds)
    brackets the target; the nearer end of the bracket wins.
    """
    full = keras_sfp.count_flops(models.cifar_resnet(20, input_shape, num_classes))

    def fraction(width: float) -> float:
        model = models.cifar_resnet(20, input_shape, num_classes, width=width)
        return keras_sfp.count_flops(model) / full

    low, high = 1.0 / min(models.resnet.STAGE_FILTERS), 1.0
    for _ in range(12):
        middle = 0.5 * (low + high)
        if fraction(middle) < kept_fraction:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda w: abs(fraction(w) - kept_fraction))


def _fresh_copy(model: keras.Model, seed: int, path: str, bn_momentum=None) -> str:
    """Saves a freshly initialised copy of `model` to `path`."""
    keras.utils.set_random_seed(seed)
    copy = keras.models.clone_model(model)
    if bn_momentum is not None:
        for layer in copy.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    copy.save(path)
    return path


def _summary(results: dict, full_macs: int) -> dict:
    history = results["history"]
    revived = history.get("sfp_revived", [])
    return {
        "deployed": results["shrunk"]["accuracy"],
        "soft_masked": results["soft_masked"]["accuracy"],
        # Of the full ResNet-20 (`scratch_arch` and `uniform` start narrower).
        "kept_macs": results["shrunk"]["macs"] / full_macs,
        "macs": results["shrunk"]["macs"],
        "revived": [int(r) for r in revived],
        "train_loss": history.get("loss", [None])[-1],
        "seconds": results["train_seconds"],
    }


def _device() -> str:
    from keras_sfp.latency import timing as latency

    return f"Keras {keras.backend.backend()} on {latency.device_name()}"


def _check_setting(root: str, params: dict) -> None:
    """Refuses a run folder whose runs (and start files) used other params.

    The runs' keys do not name the setting's parameters (data size, epochs,
    BatchNormalization momentum, ...); `setting.json` in the folder does.
    """
    path = os.path.join(root, "setting.json")
    current = json.loads(json.dumps(params))  # tuples as lists
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(current, f, indent=1)
        return
    with open(path) as f:
        stored = json.load(f)
    names = set(stored) | set(current)
    differ = sorted(n for n in names if stored.get(n) != current.get(n))
    if differ:
        raise ValueError(
            f"{root} holds runs of other settings ({', '.join(differ)} differ: "
            f"{ {n: stored.get(n) for n in differ} } there, "
            f"{ {n: current.get(n) for n in differ} } now). Move it away or "
            "pass another --root."
        )


class Runner:
    def __init__(self, setting: str, root: str, data_dir: str | None = None):
        self.setting = setting
        self.params = SETTINGS[setting]
        self.root = os.path.join(root, setting)
        os.makedirs(self.root, exist_ok=True)
        self.log = os.path.join(self.root, "runs.jsonl")
        _check_setting(self.root, self.params)
        self.data_dir = data_dir
        self.data = None
        self._fingerprints = {}  # (start file, modified) -> fingerprint
        self.reload()

    def reload(self) -> None:
        """Reads the finished runs from the log (other processes append)."""
        self.done = {row["key"]: row for row in jobs_lib.read_log(self.log)}

    def key(self, start, name, rate, seed) -> str:
        return f"{start}/{name}/r{rate}/s{seed}"

    def config(
        self, start, key, seed, init_from, **overrides
    ) -> config_lib.TrainConfig:
        """The `config_lib.TrainConfig` of run `key` (the setting's recipe)."""
        p = self.params
        learning_rate = (
            config_lib.FINE_TUNE_LEARNING_RATE
            if start == "trained"
            else config_lib.LEARNING_RATE
        )
        return config_lib.TrainConfig(
            epochs=self.epochs(start),
            train_limit=p["train_limit"],
            test_limit=p["test_limit"],
            learning_rate=learning_rate,
            seed=seed,
            init_from=init_from,
            latency_runs=0,
            export="",
            data_dir=self.data_dir,
            verbose=0,
            output_dir=self.output_dir(key),
            **overrides,
        )

    def epochs(self, start) -> int:
        p = self.params
        return p["finetune_epochs"] if start == "trained" else p["epochs"]

    def _append(self, row) -> dict:
        jobs_lib.append_log(self.log, row)
        self.done[row["key"]] = row
        print(json.dumps({k: row[k] for k in ("key", "deployed", "kept_macs")}))
        return row

    def _start(self, start: str, init_from) -> dict:
        """A trained run's `trained`: the fingerprint of the network it
        started from, so that it pairs only with runs from that network
        (each start file read once, and again only if it is rewritten)."""
        if start != "trained" or not init_from:
            return {}
        key = (init_from, os.path.getmtime(init_from))
        if key not in self._fingerprints:
            model = keras.saving.load_model(init_from, compile=False)
            self._fingerprints[key] = jobs_lib.fingerprint(model)
        return {"trained": self._fingerprints[key]}

    def output_dir(self, key: str) -> str:
        """The folder run `key` writes to (under this runner's root)."""
        return os.path.join(self.root, key.replace("/", "_"))

    def run(
        self, start, name, rate, seed, overrides, init_from=None, needs=None
    ) -> dict:
        """Runs `start/name` at `rate` and `seed` unless logged, and logs it.

        `needs` names a file of the run's output folder that the caller
        reads. A logged run whose folder here lacks it (a log carried from
        another machine, or the folder removed) trains again, in this
        process, and its row is replaced: the same row where training is
        deterministic (one CPU machine); elsewhere the rows logged from the
        old one (such as trained runs started from its network) are no
        longer paired exactly, and the message says by how much the two
        differ. Carry the run folders, or the start files, with the log.
        """
        key = self.key(start, name, rate, seed)
        done = self.done.get(key)
        if done is not None:
            if needs is None:
                return done
            if os.path.exists(os.path.join(self.output_dir(key), needs)):
                return dict(done, output_dir=self.output_dir(key))
        overrides = resolve(overrides, rate, self.epochs(start))
        # The log says what is done: a folder without a logged row is a run
        # cut short (or set aside), and is trained again from the start.
        config = self.config(start, key, seed, init_from, **overrides, overwrite=True)
        began = time.perf_counter()
        results = run_lib.train_and_evaluate(config)
        row = {
            "key": key,
            "start": start,
            "name": name,
            "rate": rate,
            "seed": seed,
            "options": {k: v for k, v in overrides.items()},
            "output_dir": config.resolved_output_dir(),
            "wall_seconds": time.perf_counter() - began,
            "device": _device(),
            **self._start(start, init_from),
            **_summary(results, self.full_macs()),
        }
        if done is not None:
            print(
                f"{key} was logged without its {needs} here and trained again: "
                f"deployed {row['deployed']:.4f} now, {done['deployed']:.4f} "
                "logged. "
                + (
                    "The same run."
                    if row["deployed"] == done["deployed"]
                    else "Not the same run: rows that started from the logged "
                    "one are not paired exactly with the new ones."
                ),
                flush=True,
            )
        return self._append(row)

    def run_tfmot(self, start, rate, seed) -> dict:
        """`prune_low_magnitude` at the non-zero weights of `REFERENCE`'s
        deployed model (same start, rate and seed), trained with the same
        recipe; see `bench/tfmot_baseline.py`."""
        key = self.key(start, TFMOT, rate, seed)
        if key in self.done:
            return self.done[key]
        reference = self.run(
            start,
            REFERENCE,
            rate,
            seed,
            CONFIGURATIONS[start][REFERENCE],
            _init_for(self, start, REFERENCE, rate, seed),
            needs="shrunk.keras",
        )
        init_from = _init_for(self, start, TFMOT, rate, seed)
        config = self.config(start, key, seed, init_from)
        began = time.perf_counter()
        results = tfmot_baseline.train_and_evaluate(
            init_from,
            os.path.join(reference["output_dir"], "shrunk.keras"),
            start,
            config,
            config.resolved_output_dir(),
        )
        row = {
            "key": key,
            "start": start,
            "name": TFMOT,
            "rate": rate,
            "seed": seed,
            "options": {
                "schedule": "constant" if start == "trained" else "polynomial",
                "reference": reference["key"],
            },
            "output_dir": config.resolved_output_dir(),
            "wall_seconds": time.perf_counter() - began,
            "device": _device(),
            **self._start(start, init_from),
            # The stripped model is the full ResNet-20 with zeros in it.
            "kept_macs": 1.0,
            "macs": self.full_macs(),
            "revived": [],
            **results,
        }
        return self._append(row)

    def initial(self, seed: int) -> str:
        """The seed's initial ResNet-20, shared by its from-scratch runs."""
        path = os.path.join(self.root, f"init_s{seed}.keras")
        if not os.path.exists(path):
            data = self.dataset()
            model = models.cifar_resnet(
                20,
                data.input_shape,
                data.num_classes,
                weight_decay=config_lib.TrainConfig().weight_decay,
            )
            _fresh_copy(model, seed, path, self.params["bn_momentum"])
        return path

    @functools.cached_property
    def _full_macs(self) -> int:
        data = self.dataset()
        model = models.cifar_resnet(20, data.input_shape, data.num_classes)
        return keras_sfp.count_flops(model)

    def full_macs(self) -> int:
        """MACs of the full ResNet-20 (built once)."""
        return self._full_macs

    def dataset(self):
        if self.data is None:
            from keras_sfp.training import data as data_lib

            self.data = data_lib.load_dataset(
                "fashion_mnist", data_dir=self.data_dir, pipeline="numpy"
            )
        return self.data


def _wanted(params, start, name, only=()) -> bool:
    """Whether `only` (`--only`; empty: the setting's `only`) wants it."""
    only = list(only or params["only"] or ())
    return not only or only == ["all"] or f"{start}/{name}" in only


def _init_for(runner: Runner, start: str, name: str, rate: float, seed: int) -> str:
    """The `.keras` file a run starts from (running what it depends on)."""
    p, data = runner.params, runner.dataset()
    if start == "trained":
        trained = os.path.join(runner.root, f"trained_s{seed}.keras")
        if not os.path.exists(trained):
            unpruned = runner.run(
                "scratch",
                "unpruned",
                0.0,
                seed,
                UNPRUNED,
                runner.initial(seed),
                needs="pruned.keras",
            )
            wrapped = keras.saving.load_model(
                os.path.join(unpruned["output_dir"], "pruned.keras"), compile=False
            )
            keras_sfp.strip_pruning(wrapped).save(trained)
        return trained
    if name not in ("scratch_arch", "uniform"):
        return runner.initial(seed)
    path = os.path.join(runner.root, f"init_{name}_r{rate}_s{seed}.keras")
    if os.path.exists(path):
        return path
    ours = runner.run(
        "scratch",
        REFERENCE,
        rate,
        seed,
        SCRATCH[REFERENCE],
        runner.initial(seed),
        needs="shrunk.keras" if name == "scratch_arch" else None,
    )
    if name == "scratch_arch":
        model = keras.saving.load_model(
            os.path.join(ours["output_dir"], "shrunk.keras"), compile=False
        )
    else:
        width = _width_for(ours["kept_macs"], data.input_shape, data.num_classes)
        model = models.cifar_resnet(
            20,
            data.input_shape,
            data.num_classes,
            weight_decay=config_lib.TrainConfig().weight_decay,
            width=width,
        )
    return _fresh_copy(model, seed, path, p["bn_momentum"])


def jobs(params) -> tuple[list, list]:
    """Two phases of `(start, name, rate)`, in priority order: the comparisons
    that choose the defaults at the first rate; then the rate sweep of the
    `sweep` configurations, then every other configuration at every rate
    (tfmot after its SFP reference)."""
    main = params["rates"][0]
    first = [
        ("scratch", "unpruned", 0.0),
        ("scratch", REFERENCE, main),
        ("scratch", "scratch_arch", main),
        ("scratch", "sfp_paper", main),
        ("scratch", "sfp_l2bn", main),
        ("trained", "unpruned", 0.0),
        ("trained", "hard_once", main),
        ("trained", "sfp_v1", main),
        ("trained", "global", main),
        ("trained", "kd_global", main),
        ("trained", "sfp_l2bn", main),
    ]
    order = [
        (start, name, rate)
        for rate in params["sweep_rates"]
        for start, name in params["sweep"]
    ]
    for rate in params["rates"]:
        order += [("scratch", n, 0.0 if n == "unpruned" else rate) for n in SCRATCH]
        order += [("trained", n, rate) for n in TRAINED if n != "unpruned"]
        order += [("scratch", TFMOT, rate), ("trained", TFMOT, rate)]
    rest = []
    for job in order:
        if job not in rest and job not in first:
            rest.append(job)
    return first, rest


def _needs(start: str, name: str, rate: float) -> list:
    """The `(start, name, rate)` runs whose results job's start file needs."""
    if name == TFMOT:
        return [(start, REFERENCE, rate)] + _needs(start, REFERENCE, rate)
    if start == "trained":
        return [("scratch", "unpruned", 0.0)]
    if name in ("scratch_arch", "uniform"):
        return [("scratch", REFERENCE, rate)]
    return []


def parse_rates(values) -> tuple[float, ...]:
    """`--rates` as floats in (0, 1), or a `ValueError` naming the flag."""
    try:
        rates = tuple(float(v) for v in values)
    except ValueError:
        rates = ()
    if len(rates) != len(values) or not all(
        0.0 < r < 1.0 and round(r, 1) == r for r in rates
    ):
        raise ValueError(
            "`--rates` must be pruning rates in (0, 1) with one decimal (as the "
            f"tables print them). Received: rates={values!r}"
        )
    return rates


def _extra_runs(runner: Runner) -> set:
    """The `(start, name, rate)` logged at rates the setting does not run
    them at (`--rates`; the sweep's own rates excluded)."""
    rates, sweep = runner.params["rates"], set(runner.params["sweep"])
    return {
        (row["start"], row["name"], row["rate"])
        for row in runner.done.values()
        if row["rate"] and row["rate"] not in rates
        if (row["start"], row["name"]) not in sweep
    }


def _ordered_jobs(
    runner: Runner, seeds, only=(), skip_missing=True, rates=()
) -> tuple[list, set]:
    """Every wanted job as `(start, name, rate, seed)` in priority order (each
    phase before the next), and the `start/name` of the
    tfmot jobs left out because this process lacks what they need. `rates`
    replaces the setting's `rates` (its first is then the rate of the
    first phase's comparisons; the sweep keeps its own rates)."""
    ordered, skipped = [], set()
    params = dict(runner.params, rates=tuple(rates)) if rates else runner.params
    for phase in jobs(params):
        # Every seed of a job before the next job, so that a run cut short
        # leaves whole rows (mean and std over seeds), not more rows of one seed.
        for start, name, rate in phase:
            for seed in seeds:
                if not _wanted(runner.params, start, name, only):
                    continue
                if skip_missing and name == TFMOT and tfmot_baseline.missing():
                    skipped.add(f"{start}/{name}")
                    continue
                ordered.append((start, name, rate, seed))
    return ordered, skipped


def _skipped_message(skipped) -> str:
    return (
        f"Not run: {', '.join(sorted(skipped))} (this process has no "
        f"{tfmot_baseline.missing()}: the tfmot baseline needs TensorFlow, "
        "tf_keras and tensorflow-model-optimization, the `bench` extra). "
        "Run them where TensorFlow is installed; runs.jsonl merges them."
    )


def run_job(runner: Runner, start: str, name: str, rate: float, seed: int) -> dict:
    """Runs one job (and, in one process, what it depends on)."""
    if name == TFMOT:
        return runner.run_tfmot(start, rate, seed)
    key = runner.key(start, name, rate, seed)
    if key in runner.done:  # its start files may be gone (another machine)
        return runner.done[key]
    overrides = CONFIGURATIONS[start][name]
    init_from = _init_for(runner, start, name, rate, seed)
    return runner.run(start, name, rate, seed, overrides, init_from)


def run_all(runner: Runner, seeds, only=(), rates=()) -> None:
    ordered, skipped = _ordered_jobs(runner, seeds, only, rates=rates)
    for job in ordered:
        run_job(runner, *job)
    if skipped:
        print(_skipped_message(skipped), flush=True)


def run_parallel(
    runner: Runner,
    seeds,
    workers: int,
    deadline_s: float,
    flags_for_job,
    only=(),
    launch=None,
    poll_s: float = 1.0,
    rates=(),
) -> None:
    """Runs the wanted jobs in `workers` processes at once, each job in its
    own process (`--job`), a job starting once the runs it needs are logged
    (`bench.jobs.run_parallel`).

    This process writes every start file (initial, trained and narrower
    models) before the jobs that read them start, so the workers never race
    on one. A job starts only if the median time of the jobs of its start
    (`scratch` or `trained`) finished so far says it ends within `deadline_s`
    seconds; the ones running are waited for. A job that fails is reported
    with the end of its log and the jobs that need it are dropped.
    `launch(key, log)` starts a job and returns its `subprocess.Popen`
    (default: `python -m bench.accuracy --job=key` with `flags_for_job`).
    A logged run whose output a start file needs but whose folder is not
    here trains again in this process while the start file is written
    (`Runner.run`'s `needs`), and no job starts meanwhile.
    """
    launch = launch or functools.partial(
        jobs_lib.launch_module, "bench.accuracy", flags_for_job
    )
    ordered, skipped = _ordered_jobs(runner, seeds, only, rates=rates)
    # The runs a wanted job needs run too (first), even if not wanted.
    keys, needed_first = {runner.key(*job) for job in ordered}, []
    for start, name, rate, seed in ordered:
        for need in _needs(start, name, rate):
            key = runner.key(*need, seed)
            if key not in keys and key not in runner.done:
                keys.add(key)
                needed_first.append((*need, seed))
    ordered = needed_first + ordered
    for seed in seeds:
        runner.initial(seed)
    # Seconds from start to logged, per start; seeded with the logged runs of
    # this device, so that a resumed run knows them from the start.
    took, device = {"scratch": [], "trained": []}, _device()
    for row in runner.done.values():
        if row.get("device") == device and row["name"] != TFMOT:
            took[row["start"]].append(row["wall_seconds"])

    def reload():
        runner.reload()
        return runner.done

    outcome = jobs_lib.run_parallel(
        [
            jobs_lib.Job(
                runner.key(start, name, rate, seed),
                tuple(runner.key(*n, seed) for n in _needs(start, name, rate)),
                group=start,
                spec=(start, name, rate, seed),
            )
            for start, name, rate, seed in ordered
        ],
        done=runner.done,
        reload=reload,
        launch=launch,
        workers=workers,
        deadline_s=deadline_s,
        log_dir=os.path.join(runner.root, "logs"),
        durations=took,
        # Writes the job's start file here.
        prepare=lambda job: _init_for(runner, *job.spec),
        describe=lambda row: (
            f"deployed {row['deployed']:.4f}, {row['wall_seconds']:.0f} s"
        ),
        poll_s=poll_s,
    )
    if outcome.late:
        print(
            f"Deadline: {len(outcome.late)} jobs not started (not enough time left).",
            flush=True,
        )
    if skipped:
        print(_skipped_message(skipped), flush=True)


def _parse_job(key: str) -> tuple:
    """`start/name/r<rate>/s<seed>` as `(start, name, rate, seed)`."""
    try:
        start, name, rate, seed = key.split("/")
        job = (start, name, float(rate[1:]), int(seed[1:]))
        known = name == TFMOT or name in CONFIGURATIONS[start]
        known = known and start in CONFIGURATIONS
    except (KeyError, ValueError):
        known = False
    if not known or not rate.startswith("r") or not seed.startswith("s"):
        raise ValueError(
            "`job` must be `start/name/r<rate>/s<seed>` with a known "
            f"configuration. Received: job={key!r}"
        )
    return job


def report(runner: Runner, results_dir: str, seeds=(0, 1, 2)) -> None:
    """Writes `accuracy_<setting>.{md,json,png}` from the logged runs."""
    planned = len(_ordered_jobs(runner, seeds, ["all"], skip_missing=False)[0])
    planned += len(_extra_runs(runner)) * len(seeds)
    rows = list(runner.done.values())
    table = accuracy_report.aggregate(rows, ORDER)
    comparison = accuracy_report.tfmot_comparison(rows)
    paired = accuracy_report.paired_differences(rows, BASELINES, ORDER)
    # Where the runs trained (logged with each run since the GPU runs), else
    # this process's device.
    here = _device()
    device = ", ".join(
        sorted({row.get("device") or here for row in runner.done.values()}) or [here]
    )
    os.makedirs(results_dir, exist_ok=True)
    base = os.path.join(results_dir, f"accuracy_{runner.setting}")
    text = accuracy_report.markdown(
        table,
        runner.setting,
        runner.params,
        device,
        comparison,
        paired,
        planned,
        reference=REFERENCE,
    )
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump(
            {
                "device": device,
                "setting": runner.params,
                "table": table,
                "tfmot_comparison": comparison,
                "paired_differences": paired,
                "runs": list(runner.done.values()),
            },
            f,
            indent=1,
        )
    accuracy_report.plot(table, base + ".png")
    print(text)


def main(argv):
    del argv
    setting = _SETTING.value
    try:
        rates = parse_rates(_RATES.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    runner = Runner(setting, _ROOT.value, _DATA_DIR.value)
    if _JOB.value:
        run_job(runner, *_parse_job(_JOB.value))
        return
    seeds = [int(s) for s in _SEEDS.value]
    if _REPORT_ONLY.value:
        pass
    elif _WORKERS.value > 1:
        job_flags = [f"--setting={setting}", f"--root={_ROOT.value}"]
        if _DATA_DIR.value:
            job_flags.append(f"--data_dir={_DATA_DIR.value}")
        deadline = _DEADLINE.value * 60 or float("inf")
        run_parallel(
            runner,
            seeds,
            _WORKERS.value,
            deadline,
            job_flags,
            _ONLY.value,
            rates=rates,
        )
        runner.reload()
    else:
        run_all(runner, seeds, _ONLY.value, rates)
    report(runner, _RESULTS.value, seeds)


if __name__ == "__main__":
    app.run(main)
