"""Short fine-tunes of a trained network: the regime where BN statistics decide.

A ResNet-20 trained for `--train_epochs` on `--train_limit` Fashion-MNIST
images (Keras's default BatchNormalization momentum, 0.99) is pruned with
`prune_filters(rate=...)` and fine-tuned for `--finetune_epochs` (SGD 0.01,
Nesterov momentum 0.9, batch 128) by each recipe below, as a user would with
`model.fit(..., callbacks=[SoftFilterPrune(...)])`. Every seed trains its own
network, and every recipe of a seed starts from it (paired).

Recipes (`sfp`: the callback's soft schedule, `hard_once`: prune once and
fine-tune with frozen masks, `hard_epochs` = all epochs):
- `unpruned`: the trained network fine-tuned without pruning.
- `sfp_keras_bn`, `hard_once_keras_bn`: `reset_batch_norm=False`, the moving
  statistics left to Keras (the library's behaviour before restarting them;
  the short fine-tune that collapsed).
- `sfp`, `hard_once`: the callback's defaults (statistics restarted at the
  first hard epoch, averaged with momentum 0.9, bias corrected).
- `sfp_bn099`, `hard_once_bn099`, `kd_hard_once_bn099`: restarted and bias
  corrected, but averaged with the layers' own momentum (0.99;
  `batch_norm_momentum=None`).
- `sfp_recal`, `hard_once_recal`: also re-estimated from 100 training
  batches when training ends (`recalibration_data`).
- `kd_sfp_recal`: `sfp_recal` as the student of a distiller (SFP's soft
  schedule with distillation, as `train.py --distill` runs it).
- `kd_hard_once`, `kd_sfp`: the same as `hard_once` and `sfp`, trained as the
  student of a `keras.distillation.Distiller` whose teacher is the trained
  network (`keras_sfp.distiller`: `logits_distillation(temperature=4)`,
  `student_loss_weight=0.5`).
- `global_hard_once`, `kd_global`: `hard_once` and `kd_hard_once` with
  `prune_filters(allocation="global")` at the same MACs budget.
- `sparse_kd_global`: `kd_global` whose first epoch trains with the group
  lasso (`sparse_epochs=1`, `sparsity=1e-4`) before the one prune event,
  then a hard epoch.
- `*_recal`: the same with `recalibration_data` (as `train.py` does by
  default): `global_recal`, `kd_recal`, `kd_global_recal`,
  `sparse_global_recal`.

The distillation rows were measured again after `keras_sfp.distiller` was
fixed (the Keras default `LogitsDistillation()` it used compared clipped
logits instead of probabilities, `keras_sfp.logits_distillation`); the rows
measured before are kept in `runs/fine_tune/<setting>/runs_kd_bug.jsonl`.

Each row reports the last epoch's training accuracy (a running average over
the epoch, in training mode), the accuracy of the deployed `shrink`ed model
on the first 5,000 training images (`deployed (train)`: the gap between the
two is what stale BatchNormalization statistics cost, free of the
generalisation gap) and on the test set (with the soft-masked model's, which
`shrink` matches exactly), the MACs kept and the wall time of the
fine-tune. Results go to `bench/results/fine_tune_<setting>.{md,json,png}`;
finished runs are kept in `runs/fine_tune/<setting>/runs.jsonl`, so an
interrupted run resumes. Another `--rate` than 0.3 gets its own folder and
files (`<setting>_r<rate>`), which reuse the setting's trained networks (and
its unpruned fine-tunes); other `--finetune_epochs` than 2 add `_e<epochs>`
(reusing the trained networks only). Each run logs the fingerprint of the
network it started from (`trained`) and pairs only with runs from the same
one: a network trained again elsewhere is another network (on an AMD EPYC
seed 0's unpruned fine-tune reached 89.5 %, on the Xeon of the logged rows
88.7 %), so a log whose networks are gone is not extended; `--tag=<name>`
starts a separate set (`<setting>_<tag>`, with its own networks).

    python -m bench.fine_tune                      # 3 seeds, ~25 min on 2 cores
    python -m bench.fine_tune --only=sfp,sfp_keras_bn --seeds=1
"""

from __future__ import annotations

import json
import os
import re
import time

import keras
import numpy as np
from absl import app, flags

import keras_sfp
import models
from bench import jobs as jobs_lib
from bench import tables
from keras_sfp.training import data as data_lib

RECIPES = {
    "unpruned": dict(prune=False),
    "sfp_keras_bn": dict(hard_epochs=1, reset_batch_norm=False),
    "sfp": dict(hard_epochs=1),
    "hard_once": dict(hard_epochs="all"),
    "sfp_bn099": dict(hard_epochs=1, batch_norm_momentum=None),
    "hard_once_bn099": dict(hard_epochs="all", batch_norm_momentum=None),
    "sfp_recal": dict(hard_epochs=1, recalibrate=True),
    "hard_once_recal": dict(hard_epochs="all", recalibrate=True),
    "kd_hard_once": dict(hard_epochs="all", distill=True),
    "kd_hard_once_bn099": dict(
        hard_epochs="all", distill=True, batch_norm_momentum=None
    ),
    "global_hard_once": dict(hard_epochs="all", allocation="global"),
    "global_recal": dict(hard_epochs="all", allocation="global", recalibrate=True),
    "kd_recal": dict(hard_epochs="all", distill=True, recalibrate=True),
    "kd_global": dict(hard_epochs="all", distill=True, allocation="global"),
    "kd_global_recal": dict(
        hard_epochs="all", distill=True, allocation="global", recalibrate=True
    ),
    "kd_sfp": dict(hard_epochs=1, distill=True),
    "kd_sfp_recal": dict(hard_epochs=1, distill=True, recalibrate=True),
    "hard_once_keras_bn": dict(hard_epochs="all", reset_batch_norm=False),
    "sparse_kd_global": dict(
        hard_epochs=1, sparse_epochs=1, distill=True, allocation="global"
    ),
    "sparse_global_recal": dict(
        hard_epochs=1, sparse_epochs=1, allocation="global", recalibrate=True
    ),
}
# Run in this order, each phase for every seed before the next phase, so a
# run cut short still has whole rows for the comparisons that set defaults.
PHASES = (
    ("unpruned", "sfp_keras_bn", "sfp_bn099", "hard_once_bn099", "hard_once_recal"),
    ("sfp", "hard_once"),
    ("global_recal", "kd_recal", "sparse_global_recal"),
    ("kd_global_recal",),
    ("sfp_recal", "kd_sfp_recal", "hard_once_keras_bn"),
    ("kd_hard_once_bn099", "global_hard_once", "kd_global"),
    ("sparse_kd_global", "kd_sfp", "kd_hard_once"),
)

SETTINGS = {
    # The regime of the collapse report: 20,000 images, 3 + 2 epochs.
    "reduced": dict(train_limit=20000, test_limit=10000, train_epochs=3),
    "smoke": dict(train_limit=512, test_limit=256, train_epochs=1),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This benchmark's flags, defined when it runs (so that tests can import
    it beside `bench.accuracy`, whose `--setting` would clash)."""
    flags.DEFINE_enum("setting", "reduced", list(SETTINGS), "Data size and epochs.")
    flags.DEFINE_integer("seeds", 3, "Seeds (each trains its own network).")
    flags.DEFINE_float("rate", 0.3, "prune_filters rate.")
    flags.DEFINE_integer("finetune_epochs", 2, "Epochs of each fine-tune.")
    flags.DEFINE_list("only", [], f"Recipes to run (default all): {list(RECIPES)}.")
    flags.DEFINE_string("data_dir", None, "Fashion-MNIST folder (Debian's by default).")
    flags.DEFINE_boolean("report_only", False, "Rewrite the report from the log.")
    flags.DEFINE_string(
        "tag",
        "",
        "A separate set of runs with its own trained networks, folder and results "
        "(`<setting>_<tag>`), such as the runs of another machine.",
    )


BATCH = 128
# The multiple every row was measured with (the default before "auto"), so
# that rows stay paired whatever CPU runs them.
ROUND_TO = 8
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _compile(model, learning_rate: float):
    optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    model.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
    return model


def _accuracy(model, x, y) -> float:
    logits = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def trained_network(path: str, seed: int, x, y, epochs: int, logged=()) -> keras.Model:
    """Trains (or loads from `path`) the seed's starting network.

    Refuses to train it while `logged` holds runs of the seed: they started
    from the network whose file is gone, and a network trained again (on
    another machine, or with other library versions) is another one, so
    new runs would not pair with them (a ResNet-20 trained on an AMD EPYC
    fine-tuned to 89.5 % where the Xeon's had reached 88.7 %).
    """
    if os.path.exists(path):
        return keras.saving.load_model(path, compile=False)
    seeds = [r for r in logged if r["seed"] == seed]
    if seeds:
        raise ValueError(
            f"{path} is gone, but the log holds {len(seeds)} runs of seed {seed} "
            "that started from it; a network trained again would not pair with "
            "them. Bring the file back, or run a separate set with --tag. "
            f"Received: seed={seed}"
        )
    keras.utils.set_random_seed(seed)
    model = models.get_model("resnet20")
    _compile(model, 0.05).fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    model.save(path)
    return model


def fingerprint(model: keras.Model, seed: int, logged=()) -> str:
    """A short hash of `model`'s weights, which each run logs as `trained`
    (the network it started from); refuses a network other than the one
    the seed's `logged` runs name."""
    value = jobs_lib.fingerprint(model)
    other = {r.get("trained") for r in logged if r["seed"] == seed} - {None, value}
    if other:
        raise ValueError(
            f"Seed {seed}'s trained network ({value}) is not the one its logged "
            f"runs started from ({', '.join(sorted(other))}): new runs would not "
            "pair with them. Bring its file back, or run a separate set with "
            f"--tag. Received: seed={seed}"
        )
    return value


def fine_tune(name: str, trained: keras.Model, data, seed: int, rate: float, epochs):
    """Runs one recipe from `trained` and returns its row."""
    (x, y), (x_test, y_test) = data
    recipe = RECIPES[name]
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    if not recipe.get("prune", True):
        model = keras.models.clone_model(trained)
        model.set_weights(trained.get_weights())
        history = _compile(model, 0.01).fit(
            x, y, batch_size=BATCH, epochs=epochs, verbose=0
        )
        seconds = time.perf_counter() - start
        accuracy = _accuracy(model, x_test, y_test)
        on_train = _accuracy(model, x[:5000], y[:5000])
        return _row(name, seed, history, accuracy, accuracy, on_train, 1.0, seconds)
    pruned = keras_sfp.prune_filters(
        trained, rate=rate, round_to=ROUND_TO, allocation=recipe.get("allocation")
    )
    hard = recipe["hard_epochs"]
    callback = keras_sfp.SoftFilterPrune(
        hard_epochs=epochs if hard == "all" else hard,
        reset_batch_norm=recipe.get("reset_batch_norm", True),
        batch_norm_momentum=recipe.get("batch_norm_momentum", 0.9),
        sparse_epochs=recipe.get("sparse_epochs", 0),
        recalibration_data=x if recipe.get("recalibrate") else None,
    )
    trainer = pruned
    if recipe.get("distill"):
        trainer = keras_sfp.distiller(trained, pruned)
    history = _compile(trainer, 0.01).fit(
        x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[callback]
    )
    seconds = time.perf_counter() - start
    shrunk = keras_sfp.shrink(pruned)
    macs = keras_sfp.count_flops(shrunk) / keras_sfp.count_flops(trained)
    return _row(
        name,
        seed,
        history,
        _accuracy(pruned, x_test, y_test),
        _accuracy(shrunk, x_test, y_test),
        _accuracy(shrunk, x[:5000], y[:5000]),
        macs,
        seconds,
    )


def _row(name, seed, history, masked, deployed, on_train, macs, seconds) -> dict:
    train = history.history.get("accuracy") or history.history.get("student_accuracy")
    return {
        "recipe": name,
        "seed": seed,
        "train_accuracy": float(train[-1]) if train else float("nan"),
        "masked": masked,
        "deployed": deployed,
        "deployed_train": on_train,
        "kept_macs": macs,
        "seconds": seconds,
    }


def _stats(values) -> str:
    values = np.asarray(values, dtype=float) * 100
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} +- {std:.2f}"


def report(rows: list, path: str, setting: dict) -> None:
    """Writes the markdown table, the JSON summary and the plot."""
    by_recipe = {}
    for row in rows:
        by_recipe.setdefault(row["recipe"], []).append(row)
    baseline = by_recipe.get("unpruned", [])
    lines = [
        f"ResNet-20, Fashion-MNIST ({setting['train_limit']} training images, "
        f"trained {setting['train_epochs']} epochs, BatchNormalization momentum "
        f"0.99), prune_filters(rate={FLAGS.rate}), fine-tuned "
        f"{FLAGS.finetune_epochs} epochs. Accuracy in %, mean +- std over "
        "seeds; paired: deployed minus the seed's unpruned fine-tune (test); "
        "BN gap: training accuracy (last epoch) minus the deployed model's on "
        "the first 5,000 training images.",
        "",
    ]
    cells = []
    summary = {}
    for name in RECIPES:
        runs = by_recipe.get(name)
        if not runs:
            continue
        paired = tables.paired_differences(runs, baseline)
        gap = [r["train_accuracy"] - r["deployed_train"] for r in runs]
        summary[name] = {
            "seeds": len(runs),
            "deployed_mean": float(np.mean([r["deployed"] for r in runs])),
            "paired_mean": float(np.mean(paired)) if paired else None,
            "max_gap": float(np.max(gap)),
            "kept_macs": float(np.mean([r["kept_macs"] for r in runs])),
            "seconds": float(np.median([r["seconds"] for r in runs])),
        }
        cells.append(
            [name, len(runs), _stats([r["train_accuracy"] for r in runs])]
            + [_stats([r["deployed_train"] for r in runs]), _stats(gap)]
            + [_stats([r["masked"] for r in runs])]
            + [_stats([r["deployed"] for r in runs])]
            + [_stats(paired) if paired else "-"]
            + [f"{100 * summary[name]['kept_macs']:.1f} %"]
            + [f"{summary[name]['seconds']:.0f}"]
        )
    columns = ["recipe", "seeds", "train", "deployed (train)", "BN gap"]
    columns += ["soft-masked (test)", "deployed (test)", "paired vs unpruned"]
    lines += tables.markdown_table([*columns, "MACs kept", "seconds"], cells)
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(path + ".json", "w") as f:
        json.dump({"setting": setting, "recipes": summary, "runs": rows}, f, indent=1)
    _plot(by_recipe, path + ".png")
    print("\n".join(lines))


def _plot(by_recipe: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415 (optional dependency, bench only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [n for n in RECIPES if n in by_recipe]
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, name in enumerate(names):
        for key, color, offset, label in (
            ("train_accuracy", "C0", -0.2, "training (last epoch)"),
            ("deployed_train", "C3", 0.0, "deployed, training images"),
            ("deployed", "C2", 0.2, "deployed, test images"),
        ):
            values = [100 * r[key] for r in by_recipe[name]]
            ax.scatter(
                [i + offset] * len(values),
                values,
                color=color,
                label=label if i == 0 else None,
            )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Short fine-tune of a trained ResNet-20, rate {FLAGS.rate}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _name(setting: str, rate: float, epochs: int = 2, tag: str = "") -> str:
    """The run folder's and results' name: the setting and its tag, a rate
    not 0.3 and fine-tune epochs not 2 (so that no run is taken for
    another's)."""
    name = f"{setting}_{tag}" if tag else setting
    name = name if rate == 0.3 else f"{name}_r{rate}"
    return name if epochs == 2 else f"{name}_e{epochs}"


def main(argv) -> None:
    del argv
    setting = SETTINGS[FLAGS.setting]
    if FLAGS.tag and not re.fullmatch(r"[a-z0-9]+", FLAGS.tag):
        raise app.UsageError(
            f"--tag must be lowercase letters and digits. Received: {FLAGS.tag!r}"
        )
    folder = _name(FLAGS.setting, FLAGS.rate, FLAGS.finetune_epochs, FLAGS.tag)
    run_dir = os.path.join("runs", "fine_tune", folder)
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "runs.jsonl")
    rows = jobs_lib.read_log(log)
    base_name = _name(FLAGS.setting, 0.3, tag=FLAGS.tag)
    base_dir = os.path.join("runs", "fine_tune", base_name)
    os.makedirs(base_dir, exist_ok=True)
    # The rows of the runs that started from the folder's trained networks.
    logged = list(rows)
    if folder != base_name:
        base = jobs_lib.read_log(os.path.join(base_dir, "runs.jsonl"))
        logged += base
        if folder == _name(FLAGS.setting, FLAGS.rate, tag=FLAGS.tag):
            # The unpruned fine-tune does not depend on rate (but on epochs).
            rows += [r for r in base if r["recipe"] == "unpruned"]
    names = FLAGS.only or list(RECIPES)
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise app.UsageError(f"--only: unknown recipes {unknown}")
    if not FLAGS.report_only:
        (x, y), (x_test, y_test) = data_lib.load_fashion_mnist(FLAGS.data_dir)
        x = data_lib.to_float_images(x[: setting["train_limit"], ..., None])
        y = y[: setting["train_limit"]].astype("int32")
        x_test = data_lib.to_float_images(x_test[: setting["test_limit"], ..., None])
        y_test = y_test[: setting["test_limit"]].astype("int32")
        done = {(r["recipe"], r["seed"]) for r in rows}
        jobs = [
            (seed, name)
            for phase in PHASES
            for seed in range(FLAGS.seeds)
            for name in phase
            if name in names and (name, seed) not in done
        ]
        trained_by_seed = {}  # each seed's network, loaded (or trained) once
        for seed, name in jobs:
            if seed not in trained_by_seed:
                network = trained_network(
                    os.path.join(base_dir, f"trained_s{seed}.keras"),
                    seed,
                    x,
                    y,
                    setting["train_epochs"],
                    logged=logged,
                )
                trained_by_seed[seed] = (network, fingerprint(network, seed, logged))
            trained, start = trained_by_seed[seed]
            row = fine_tune(
                name,
                trained,
                ((x, y), (x_test, y_test)),
                seed,
                FLAGS.rate,
                FLAGS.finetune_epochs,
            )
            row["trained"] = start
            print(json.dumps(row))
            rows.append(row)
            jobs_lib.append_log(log, row)
    os.makedirs(os.path.join("bench", "results"), exist_ok=True)
    report(rows, os.path.join("bench", "results", f"fine_tune_{folder}"), setting)


if __name__ == "__main__":
    define_flags()
    app.run(main)
