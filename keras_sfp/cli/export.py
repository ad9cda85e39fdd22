"""`keras-sfp-export`: export `.keras` files and measure the artifacts.

    keras-sfp-export --model=runs/resnet20_fashion_mnist/shrunk.keras \\
        --output_dir=export --formats=saved_model,tflite,tflite_int8

(also `python -m keras_sfp.cli.export`). Models still holding `FilterPruning`
wrappers are stripped first. See `keras_sfp.export.measure.export_model_files`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from keras_sfp import _tensorflow
from keras_sfp.export import measure


def _define_flags() -> None:
    flags.DEFINE_multi_string(
        "model",
        None,
        "A .keras file, or NAME=PATH; repeat for several models.",
        required=True,
    )
    flags.DEFINE_string("output_dir", None, "Output directory.", required=True)
    flags.DEFINE_string(
        "formats",
        "saved_model,tflite,tflite_int8",
        f"Comma-separated {measure.FORMATS} (onnx and openvino need "
        "keras-sfp[runtimes]).",
    )
    flags.DEFINE_string(
        "dataset", "fashion_mnist", "Dataset of keras_sfp.training.data."
    )
    flags.DEFINE_string("data_dir", None, "Data directory (None: default).")
    flags.DEFINE_integer("test_limit", 0, "Test images (0: all).", lower_bound=0)
    flags.DEFINE_integer(
        "calibration_examples", 200, "int8 calibration images.", lower_bound=1
    )
    flags.DEFINE_integer("latency_runs", 20, "Timed calls (0: skip).", lower_bound=0)


def _model_paths(specs: Sequence[str]) -> dict[str, str]:
    paths = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, os.path.splitext(os.path.basename(spec))[0]
        paths[name] = path
    return paths


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    metrics = measure.export_model_files(
        _model_paths(values.model),
        values.output_dir,
        values.formats,
        dataset=values.dataset,
        data_dir=values.data_dir,
        test_limit=values.test_limit,
        calibration_examples=values.calibration_examples,
        latency_runs=values.latency_runs,
    )
    print(metrics["table"])


def run_main() -> None:
    """The `keras-sfp-export` command (`python -m keras_sfp.cli.export`)."""
    # Flags are defined here, not at import: importing this module (its
    # doctests, another program's) registers nothing.
    _define_flags()
    _tensorflow.probe_devices_quietly()
    app.run(main)


if __name__ == "__main__":
    run_main()
