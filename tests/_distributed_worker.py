"""One process of a multi-process SFP run on JAX, for `test_distributed.py`.

    python tests/_distributed_worker.py OUT PROCESS_ID NUM_PROCESSES PORT
        [--backup_dir DIR] [--crash_in_epoch E]

Trains a tiny pruned network for 3 epochs on 64 fixed examples (global
batch 16, each process feeding its part) with `SoftFilterPrune`, then saves
its masks, weights and its shrunk model's size and outputs to
`OUT/process_<id>.npz`. `--backup_dir` adds
`BackupAndRestore`; `--crash_in_epoch` makes process 1 exit
abruptly after the second step of that epoch (a killed worker).
"""

import argparse
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # one device per process
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EPOCHS, EXAMPLES, BATCH = 3, 64, 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("process_id", type=int)
    parser.add_argument("num_processes", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("--backup_dir")
    parser.add_argument("--crash_in_epoch", type=int)
    args = parser.parse_args()

    from keras_sfp.training import distributed

    distributed.initialize(
        f"localhost:{args.port}", args.num_processes, args.process_id
    )
    import keras
    import numpy as np

    import keras_sfp
    from keras_sfp.training import pipeline
    from keras_sfp.training.data import ArraySplit

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    split = ArraySplit(
        rng.integers(0, 256, (EXAMPLES, 8, 8, 1), dtype=np.uint8),
        rng.integers(0, 3, EXAMPLES),
    )
    batches = pipeline.make_pipeline(
        split,
        BATCH,
        training=True,
        augment=True,
        seed=0,
        num_shards=distributed.process_count(),
        shard_index=distributed.process_index(),
    )
    L = keras.layers
    with distributed.data_parallel().scope():
        inputs = keras.Input((8, 8, 1))
        x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(inputs)))
        y = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(x)))
        x = L.GlobalAveragePooling2D()(L.Add()([x, y]))
        model = keras.Model(inputs, L.Dense(3)(x))
        pruned = keras_sfp.prune_filters(model, rate=0.4, round_to=1)
        pruned.compile(
            keras.optimizers.SGD(0.05, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        epochs_run = []
        callbacks = [
            # Before the backup: its epoch-end event is part of the epoch's
            # state, and it waits for the epoch's steps before anything is
            # written. At the start, the backup's restore comes last.
            keras_sfp.SoftFilterPrune(hard_epochs=1),
            keras.callbacks.LambdaCallback(
                on_epoch_begin=lambda epoch, logs: epochs_run.append(epoch)
            ),
        ]
        if args.backup_dir:
            callbacks.append(distributed.BackupAndRestore(args.backup_dir))
        callbacks.append(pipeline.EpochSync(batches))
        if args.crash_in_epoch is not None and args.process_id == 1:
            crash = args.crash_in_epoch

            def maybe_crash(batch, logs):
                if epochs_run and epochs_run[-1] == crash and batch == 1:
                    os._exit(3)

            callbacks.append(
                keras.callbacks.LambdaCallback(on_train_batch_end=maybe_crash)
            )
        pruned.fit(
            batches, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks
        )
    wrappers = keras_sfp.core.prune.wrappers(pruned)
    small = keras_sfp.shrink(pruned)  # in every process, outside the scope
    probe = np.random.default_rng(1).random((4, 8, 8, 1), dtype=np.float32)
    np.savez(
        os.path.join(args.out, f"process_{args.process_id}.npz"),
        masks=np.concatenate([w.mask for w in wrappers]),
        shrunk_params=np.array(small.count_params()),
        shrunk_outputs=small.predict(probe, verbose=0),
        epochs_run=np.array(epochs_run),
        **{f"w{i}": w for i, w in enumerate(pruned.get_weights())},
    )


if __name__ == "__main__":
    main()
