"""Data-parallel scaling of SFP training: 1 process against N on one machine.

Each configuration trains the same pruned ResNet-20 with `SoftFilterPrune`
on the same global batches of Fashion-MNIST (a prune event at every epoch
end), on the JAX backend: one process, then
`--processes` processes joined by `jax.distributed` (gloo collectives on
CPUs), each feeding its part of every global batch
(`keras_sfp.training.distributed`). The first epoch compiles and is not counted;
the table gives the median epoch time, the throughput and the speedup over
one process, and checks that the runs ended with the same masks.

On one machine the processes share its cores, so this measures the cost of
the multi-process machinery (collectives, per-process input), not a gain:
a gain needs more machines, or processes pinned to devices of their own.

    KERAS_BACKEND=jax python -m bench.scaling --table=bench/results/scaling_cpu.md
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

from bench import tables


def train_one(
    out, process_id, num_processes, port, examples, batch_size, epochs
) -> None:
    """One process of a run: trains and writes `out/process_<id>.json`."""
    os.environ["KERAS_BACKEND"] = "jax"
    from keras_sfp.training import distributed

    if num_processes > 1:
        distributed.initialize(f"localhost:{port}", num_processes, process_id)
    import keras
    import numpy as np

    import keras_sfp
    import models
    from keras_sfp.training import data as data_lib
    from keras_sfp.training import pipeline

    keras.utils.set_random_seed(0)
    # Whole batches only, so that one process sees the batches N processes do.
    limit = examples // batch_size * batch_size
    data = data_lib.load_dataset("fashion_mnist", limit=limit, pipeline="numpy")
    batches = pipeline.make_pipeline(
        data.train,
        batch_size,
        training=True,
        seed=0,
        num_shards=num_processes,
        shard_index=process_id,
    )
    times, started = [], []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs: started.append(time.perf_counter()),
        on_epoch_end=lambda e, logs: times.append(time.perf_counter() - started[-1]),
    )
    scope = contextlib.nullcontext()
    if num_processes > 1:
        scope = distributed.data_parallel().scope()
    with scope:
        model = models.get_model("resnet20", data.input_shape, data.num_classes)
        pruned = keras_sfp.prune_filters(model)
        pruned.compile(
            keras.optimizers.SGD(0.1, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        pruned.fit(
            batches,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras_sfp.SoftFilterPrune(hard_epochs=0),
                pipeline.EpochSync(batches),
                timer,
            ],
        )
    masks = np.concatenate([w.mask for w in keras_sfp.core.prune.wrappers(pruned)])
    with open(os.path.join(out, f"process_{process_id}.json"), "w") as f:
        json.dump(
            {"epoch_seconds": times, "steps": len(batches), "masks": masks.tolist()}, f
        )


def run(num_processes, out, examples, batch_size, epochs) -> dict:
    """Launches a run of `num_processes` processes; returns process 0's record."""
    os.makedirs(out, exist_ok=True)
    from keras_sfp.training import distributed

    port = distributed.free_port()
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.scaling",
                "--worker",
                f"--out={out}",
                f"--process_id={k}",
                f"--processes={num_processes}",
                f"--port={port}",
                f"--examples={examples}",
                f"--batch_size={batch_size}",
                f"--epochs={epochs}",
            ],
            env=env,
        )
        for k in range(num_processes)
    ]
    try:
        for proc in procs:
            if proc.wait(timeout=3600) != 0:
                raise RuntimeError(
                    f"a process of the {num_processes}-process run failed"
                )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    with open(os.path.join(out, "process_0.json")) as f:
        return json.load(f)


def table(rows, examples, batch_size) -> str:
    lines = [
        f"Pruned ResNet-20, Fashion-MNIST ({examples} images, global batch "
        f"{batch_size}), JAX on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores); median of the epochs after the first.",
        "",
    ]
    base = rows[0]["median"]
    lines += tables.markdown_table(
        [
            "processes",
            "median epoch s",
            "images/s",
            "speedup",
            "same masks as 1 process",
        ],
        [
            [
                row["processes"],
                f"{row['median']:.2f}",
                f"{examples // batch_size * batch_size / row['median']:.0f}",
                f"{base / row['median']:.2f}x",
                row["same_masks"],
            ]
            for row in rows
        ],
        "rrrrl",
    )
    return "\n".join(lines)


_WORKER = flags.DEFINE_bool("worker", False, "Run one process of a run.")
_OUT = flags.DEFINE_string("out", "runs/scaling", "Where the runs write.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Worker: this process.")
_PROCESSES = flags.DEFINE_integer("processes", 2, "Processes of the parallel run.")
_PORT = flags.DEFINE_integer("port", 0, "Worker: the coordinator's port.")
_EXAMPLES = flags.DEFINE_integer("examples", 4096, "Training images.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs (the first is not timed).")
_TABLE = flags.DEFINE_string("table", None, "Write the Markdown table here.")


def main(argv) -> None:
    del argv
    if _WORKER.value:
        train_one(
            _OUT.value,
            _PROCESS_ID.value,
            _PROCESSES.value,
            _PORT.value,
            _EXAMPLES.value,
            _BATCH.value,
            _EPOCHS.value,
        )
        return
    rows, reference = [], None
    for n in sorted({1, _PROCESSES.value}):
        record = run(
            n,
            os.path.join(_OUT.value, f"{n}_processes"),
            _EXAMPLES.value,
            _BATCH.value,
            _EPOCHS.value,
        )
        reference = reference or record["masks"]
        rows.append(
            {
                "processes": n,
                "median": statistics.median(record["epoch_seconds"][1:]),
                "epoch_seconds": record["epoch_seconds"],
                "same_masks": record["masks"] == reference,
            }
        )
    text = table(rows, _EXAMPLES.value, _BATCH.value)
    print(text)
    if _TABLE.value:
        with open(_TABLE.value, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(_TABLE.value)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
