"""Training overhead of Soft Filter Pruning: epoch time against the plain model.

For each Keras backend installed (one process each, Keras fixes its backend
at import), trains side by side in one process, in alternating rounds:

- `plain`: the model as built;
- `wrapped`: `prune_filters(model)` trained without the callback (the cost
  of the wrappers alone, in the soft state);
- `sfp_soft`: `prune_filters(model)` trained with
  `SoftFilterPrune(hard_epochs=0, prune_at_start=True)` (soft epochs: a prune
  event at every epoch end, nothing in between);
- `sfp_hard`: the same with `SoftFilterPrune(hard_epochs=...)` covering every
  epoch (masks enforced in the forward pass).

Epoch times are measured from epoch begin to epoch end (the prune event
included) on random data of the model's input shape; the first round, which
compiles, is not counted. The table gives the ratio of medians to `plain`
(the goal is at most 1.05x) and, in brackets, the ratio of the fastest
epochs, which a shared machine's other load disturbs least.

    python -m bench.overhead --table=bench/results/overhead.md   # CPU, ~10 min
    KERAS_BACKEND=jax python -m bench.overhead --backends=jax --steps=0  # a GPU
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

from bench import tables

BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}

_BACKENDS = flags.DEFINE_list(
    "backends",
    [b for b, m in BACKEND_MODULES.items() if importlib.util.find_spec(m)],
    "Keras backends to measure, each in a process of its own.",
)
_MODEL = flags.DEFINE_string("model", "resnet20", "A name in models.MODEL_NAMES.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_STEPS = flags.DEFINE_integer(
    "steps", 40, "Steps per epoch; 0 for a Fashion-MNIST epoch (60000 images)."
)
_EPOCHS = flags.DEFINE_integer("epochs_per_round", 2, "Epochs per fit call.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (after one warm-up).")
_TABLE = flags.DEFINE_string("table", None, "Write the Markdown table here.")
_WORKER = flags.DEFINE_bool("worker", False, "Measure this process's backend.")


def measure(model_name, batch_size, steps, epochs, rounds) -> dict:
    """Epoch times of the three configurations on the current backend."""
    import keras
    import numpy as np

    import keras_sfp
    import models
    from keras_sfp.latency import timing as latency

    keras.utils.set_random_seed(0)
    n = batch_size * (steps or -(-60000 // batch_size))
    rng = np.random.default_rng(0)
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n)

    class Begin(keras.callbacks.Callback):  # first in the list
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

    class End(keras.callbacks.Callback):  # last: after the prune event
        def __init__(self, begin):
            super().__init__()
            self.begin, self.times = begin, []

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.begin.start)

    def compiled(model):
        model.compile(
            keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    def build():
        return models.get_model(model_name, (28, 28, 1), 10, weight_decay=2.5e-4)

    runs = {
        "plain": (compiled(build()), None),
        "wrapped": (compiled(keras_sfp.prune_filters(build())), None),
        "sfp_soft": (
            compiled(keras_sfp.prune_filters(build())),
            keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True),
        ),
        "sfp_hard": (
            compiled(keras_sfp.prune_filters(build())),
            keras_sfp.SoftFilterPrune(hard_epochs=epochs),
        ),
    }
    times = {name: [] for name in runs}
    for round_ in range(rounds + 1):
        for name, (model, callback) in runs.items():
            begin = Begin()
            end = End(begin)
            callbacks = [begin] + ([callback] if callback else []) + [end]
            model.fit(
                x,
                y,
                batch_size=batch_size,
                epochs=epochs,
                verbose=0,
                callbacks=callbacks,
            )
            if round_ > 0:
                times[name].extend(end.times)
    plain = statistics.median(times["plain"])
    return {
        "backend": keras.backend.backend(),
        "device": latency.device_name(),
        "model": model_name,
        "batch_size": batch_size,
        "steps_per_epoch": n // batch_size,
        "epochs_timed": len(times["plain"]),
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "all_seconds": times,
        "ratio": {name: statistics.median(t) / plain for name, t in times.items()},
    }


def format_table(rows: list[dict]) -> str:
    """Median ratios to `plain`, and in brackets the ratios of the fastest
    epochs (less sensitive to other load on a shared machine)."""
    cells = []
    for r in rows:
        fastest = {name: min(t) for name, t in r["all_seconds"].items()}
        cells.append(
            [
                r["backend"],
                r["device"],
                r["model"],
                f"{r['steps_per_epoch']} (batch {r['batch_size']})",
                f"{r['seconds']['plain']:.3f}",
                *(
                    f"{r['ratio'][name]:.3f}x ({fastest[name] / fastest['plain']:.3f}x)"
                    for name in ("wrapped", "sfp_soft", "sfp_hard")
                ),
            ]
        )
    columns = ["backend", "device", "model", "steps/epoch", "plain s/epoch"]
    columns += ["wrapped / plain", "SFP soft / plain", "SFP hard / plain"]
    return "\n".join(tables.markdown_table(columns, cells))


def main(argv):
    del argv
    args = (_MODEL.value, _BATCH.value, _STEPS.value, _EPOCHS.value, _ROUNDS.value)
    if _WORKER.value:
        print("RESULT " + json.dumps(measure(*args)))
        return
    rows = []
    for backend in _BACKENDS.value:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, "-m", "bench.overhead", "--worker"] + [
            f"--{name}={value}"
            for name, value in zip(
                ("model", "batch_size", "steps", "epochs_per_round", "rounds"), args
            )
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the {backend} worker failed")
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT ") :]))
        print(format_table(rows[-1:]), flush=True)
    table = format_table(rows)
    print(table)
    if _TABLE.value:
        with open(_TABLE.value, "w") as f:
            f.write(
                f"Epoch time, median of {rows[0]['epochs_timed']} epochs per "
                "configuration after a warm-up round, all configurations "
                f"alternating in one process per backend ({platform.machine()}, "
                f"{os.cpu_count()} cores; `python -m bench.overhead`).\n\n"
                + table
                + "\n"
            )
        with open(os.path.splitext(_TABLE.value)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
