"""Runs the cross-backend checks of `test_backends.py` in a fresh process.

    python tests/_backend_worker.py OUT [--train] [--check DIR ...]
        [--train_py] [--no_tensorflow]

The Keras backend is the process's `KERAS_BACKEND`. `--train` SFP-trains a
tiny ResNet and saves `OUT/pruned.keras` with its outputs (`OUT/train.npz`);
`--check DIR` loads `DIR/pruned.keras`, shrinks it and saves the outputs
(`DIR/check_<backend>.npz`); `--train_py` runs `train.py`'s
`train_and_evaluate` into `OUT/run/`; `--no_tensorflow` first makes every
import of TensorFlow fail, as on a machine without it.
"""

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _images():
    import numpy as np

    return np.random.default_rng(1).random((8, 12, 12, 3), dtype=np.float32)


def train(directory: str) -> None:
    import keras

    import keras_sfp
    from conftest import compile_sgd, random_data, randomize_batch_norm, tiny_resnet

    keras.utils.set_random_seed(0)
    model = keras_sfp.prune_filters(randomize_batch_norm(tiny_resnet()), rate=0.5)
    x, y = random_data(model)
    compile_sgd(model).fit(
        x,
        y,
        epochs=2,
        batch_size=8,
        verbose=0,
        callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=True)],
    )
    model.save(os.path.join(directory, "pruned.keras"))
    check(directory, name="train")


def check(directory: str, name: str | None = None) -> None:
    import keras
    import numpy as np

    import keras_sfp

    pruned = keras.saving.load_model(os.path.join(directory, "pruned.keras"))
    small = keras_sfp.shrink(pruned)
    masks = [
        keras.ops.convert_to_numpy(w.mask)
        for w in keras_sfp.core.prune.wrappers(pruned)
    ]
    np.savez(
        os.path.join(directory, f"{name or 'check_' + keras.backend.backend()}.npz"),
        pruned=keras.ops.convert_to_numpy(pruned(_images(), training=False)),
        shrunk=keras.ops.convert_to_numpy(small(_images(), training=False)),
        masks=np.concatenate(masks),
        macs=keras_sfp.count_flops(small),
    )


def train_py(directory: str) -> None:
    import keras_sfp
    import train as train_lib

    if sys.modules.get("tensorflow", True) is None:  # hidden
        try:
            keras_sfp.export_tflite  # noqa: B018
        except ImportError as error:
            assert "needs TensorFlow" in str(error), error
        else:
            raise AssertionError("export_tflite imported without TensorFlow")
    import keras

    parallel = keras.backend.backend() == "jax"
    train_lib.train_and_evaluate(
        train_lib.TrainConfig(
            distribute="data_parallel" if parallel else "none",
            epochs=2,
            batch_size=64,
            train_limit=256,
            test_limit=128,
            latency_runs=2,
            augment=True,
            verbose=0,
            output_dir=os.path.join(directory, "run"),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--check", nargs="*", default=[])
    parser.add_argument("--train_py", action="store_true")
    parser.add_argument("--no_tensorflow", action="store_true")
    args = parser.parse_args()
    if args.no_tensorflow:
        for name in ("tensorflow", "tensorflow_datasets", "tensorboard"):
            sys.modules[name] = None  # `import tensorflow` raises ImportError
    sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
    for directory in args.check:
        check(directory)
    if args.train:
        train(args.out)
    if args.train_py:
        train_py(args.out)
    if args.no_tensorflow:
        loaded = {m.split(".")[0] for m, module in sys.modules.items() if module}
        assert "tensorflow" not in loaded, "TensorFlow was imported"


if __name__ == "__main__":
    main()
