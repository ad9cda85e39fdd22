"""Export models in several formats and measure what each artifact costs and gains.

Why one module of over 400 lines: exporting and measuring share the
artifacts' paths, runners and metrics layout; the command line is in
`keras_sfp.cli.export`.

`export_and_measure` writes, for each named model, the artifacts of
`keras_sfp.export` (SavedModel, TFLite float32/float16/dynamic/int8, ONNX,
OpenVINO IR) and a `.keras` reference, then reloads every artifact the way
it is deployed (`tf.saved_model.load` and its `serving_default` signature,
LiteRT's interpreter or `tf.lite.Interpreter` without it, ONNX Runtime's
CPU execution provider, OpenVINO's CPU plugin) and records its size on
disk, how far its outputs are from the Keras model's on the test images,
its top-1 accuracy on them and its median CPU latency per batch, in
`metrics.json` and a printed table. `train.py --export=...` calls it with the
original architecture (the trained model with its pruned filters zeroed, as
`strip_pruning` gives it) beside the shrunk one.

`export_model_files` does the same for `.keras` files (models still holding
`FilterPruning` wrappers are stripped first); the `keras-sfp-export` command
(`keras_sfp.cli.export`) calls it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from keras_sfp import _checks
from keras_sfp import export as export_lib
from keras_sfp._tensorflow import import_tensorflow
from keras_sfp.core.prune import strip_pruning
from keras_sfp.core.wrapper import FilterPruning
from keras_sfp.export import onnx as onnx_lib
from keras_sfp.export import runners as runners_lib
from keras_sfp.latency import timing as latency_lib
from keras_sfp.training import data as data_lib
from keras_sfp.training import files

tf = import_tensorflow("keras_sfp.export.measure")

FORMATS = (
    "saved_model",
    "tflite",
    "tflite_float16",
    "tflite_dynamic",
    "tflite_int8",
    "onnx",
    "openvino",
)
"""Artifact formats `export_and_measure` writes."""

_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}

_QUANTIZATION = {
    "tflite": None,
    "tflite_float16": "float16",
    "tflite_dynamic": "dynamic",
    "tflite_int8": "int8",
}
_EVAL_BATCH = 256


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """Checks a comma-separated string (or sequence) of `FORMATS`.

    Args:
        formats: E.g. `"saved_model,tflite,tflite_int8"`; empty items are
            ignored and duplicates dropped.

    Returns:
        The formats, in the order given.

    Raises:
        ValueError: If a format is not in `FORMATS`.

    Example:
    >>> parse_formats("saved_model, tflite")
    ('saved_model', 'tflite')
    """
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = tuple(dict.fromkeys(s.strip() for s in items if s.strip()))
    unknown = [name for name in names if name not in FORMATS]
    if unknown:
        raise ValueError(
            f"`formats` must be a comma-separated subset of {FORMATS}. "
            f"Received: formats={formats!r} (unknown: {unknown})"
        )
    return names


def _save_without_optimizer(model: keras.Model, path: str) -> None:
    # A compiled model saves its optimizer state too, which is no part of
    # what is deployed; a copy from the config is not compiled.
    if model.compiled:
        copy = model.__class__.from_config(model.get_config())
        copy.set_weights(model.get_weights())
        model = copy
    model.save(path)


def _size_bytes(path: str) -> int:
    if path.endswith(".xml") and os.path.isfile(path):  # OpenVINO IR: with .bin
        weights = onnx_lib.openvino_weights_path(path)
        return os.path.getsize(path) + os.path.getsize(weights)
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _outputs(run: Callable, x: np.ndarray) -> np.ndarray:
    """`run`'s float32 outputs on `x`, in batches of `_EVAL_BATCH`."""
    return np.concatenate(
        [
            np.asarray(run(x[start : start + _EVAL_BATCH]), np.float32)
            for start in range(0, len(x), _EVAL_BATCH)
        ]
    )


def output_difference(outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far `outputs` are from `reference` (the Keras model's).

    Returns:
        `max_abs_diff`, the largest absolute difference, and
        `max_rel_diff`, that over the reference's scale (its largest
        absolute value; the absolute difference where that is 0).

    Example:
    >>> output_difference(np.array([[1.0, -4.0]]), np.array([[1.0, -3.0]]))
    {'max_abs_diff': 1.0, 'max_rel_diff': 0.3333333333333333}
    """
    outputs = np.asarray(outputs, np.float64)
    reference = np.asarray(reference, np.float64)
    if outputs.shape != reference.shape:
        raise ValueError(
            f"An artifact's outputs have shape {outputs.shape}, the Keras model's "
            f"{reference.shape}"
        )
    diff = float(np.max(np.abs(outputs - reference), initial=0.0))
    scale = float(np.max(np.abs(reference), initial=0.0))
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale else diff}


def _add_speedups(models: Mapping[str, Any]) -> None:
    """Adds `speedup` (`{batch: first model's ms / ms}`) to every artifact
    of the models after the first one that has the same artifact."""
    first = {}
    for entry in models.values():
        for fmt, artifact in entry["artifacts"].items():
            base = first.setdefault(fmt, artifact)
            if base is not artifact:
                artifact["speedup"] = {
                    b: base["latency_ms"][b] / ms
                    for b, ms in artifact["latency_ms"].items()
                }


def _latency_cell(artifact: Mapping, batch: str) -> str:
    """`ms`, and `ms (speedup)` for a model timed beside another."""
    latency = artifact["latency_ms"] or {}
    if batch not in latency:
        return "-"
    speedup = (artifact.get("speedup") or {}).get(batch)
    if speedup is None:
        return f"{latency[batch]:.2f}"
    return f"{latency[batch]:.2f} ({speedup:.2f}x)"


def _diff_cell(artifact: Mapping) -> str:
    diff = artifact.get("max_rel_diff")
    if diff is None:
        return "-"
    return "0" if diff == 0 else f"{diff:.1e}"


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """The plain-text table of `export_and_measure`'s metrics.

    Args:
        metrics: What `export_and_measure` returns (without `table`).

    Returns:
        One row per artifact and model, the models of an artifact adjacent;
        `rel diff` is the artifact's largest output difference from the
        Keras model relative to the output scale (`max_rel_diff`).
    """
    batch_sizes = metrics["batch_sizes"]
    header = ("artifact", "model", "size KB", "accuracy", "rel diff") + tuple(
        f"ms@{b}" for b in batch_sizes
    )
    rows = [header]
    artifact_names = dict.fromkeys(
        name for entry in metrics["models"].values() for name in entry["artifacts"]
    )
    for artifact in artifact_names:
        for model_name, entry in metrics["models"].items():
            a = entry["artifacts"].get(artifact)
            if a is None:
                continue
            rows.append(
                (
                    artifact,
                    model_name,
                    f"{a['size_bytes'] / 1024:,.1f}",
                    f"{a['accuracy']:.4f}",
                    _diff_cell(a),
                    *(_latency_cell(a, str(b)) for b in batch_sizes),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def export_and_measure(
    models: Mapping[str, keras.Model],
    output_dir: str | os.PathLike,
    formats: str | Sequence[str],
    test_data: tuple[np.ndarray, np.ndarray],
    representative_data: np.ndarray | None = None,
    latency_runs: int = 50,
    batch_sizes: Sequence[int] = (1, 32),
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Exports each model in `formats`, reloads each artifact and measures it.

    Writes `<output_dir>/<name>/model.keras` (the reference, without
    optimizer state),
    `<output_dir>/<name>/saved_model/<version>/` (the next free version, with
    warmup requests at the latency batch sizes),
    `<output_dir>/<name>/model[_<quantization>].tflite`,
    `<output_dir>/<name>/model.onnx` and `<output_dir>/<name>/model.xml`
    (OpenVINO IR, with `model.bin`) (files replaced if present), then
    `<output_dir>/metrics.json`. For each artifact it records the size on
    disk in bytes (a SavedModel's whole version directory, an IR's `.xml`
    and `.bin`), how far its outputs on the test images are from the Keras
    model's (`max_abs_diff`, and `max_rel_diff` relative to the largest
    absolute Keras output), the top-1 accuracy on `test_data` and the
    median milliseconds per call at each batch size, all artifacts timed in
    alternation on the same batch (the first test images). ONNX runs in
    ONNX Runtime (CPU execution provider), OpenVINO IR on OpenVINO's CPU
    plugin in float32, TFLite in LiteRT's interpreter (`tf.lite` without
    `ai-edge-litert`).

    Args:
        models: `{name: model}`, e.g. `{"original": ..., "shrunk": ...}`.
        output_dir: Where the artifacts and `metrics.json` go.
        formats: A subset of `FORMATS`, as a sequence or comma-separated.
        test_data: `(images, integer labels)` for the accuracy.
        representative_data: Calibration examples for `"tflite_int8"`
            (required for it) and the warmup requests; `None` uses the first
            test images for warmup. Defaults to None.
        latency_runs: Timed calls per artifact and batch size; 0 skips the
            latency. Defaults to 50.
        batch_sizes: Batch sizes of the latency. Defaults to (1, 32).
        num_threads: TFLite, ONNX Runtime and OpenVINO threads; `None` uses
            all CPU cores, as TensorFlow does for the SavedModel. Defaults
            to None.

    Returns:
        The metrics also written to `metrics.json`: `formats`, `num_test`,
        `batch_sizes`, `latency_runs`, `num_threads`, `tflite_interpreter`,
        `models` (per name: `params` and `artifacts`, per artifact `path`,
        `size_bytes`, `max_abs_diff`, `max_rel_diff`, `accuracy` and
        `latency_ms` keyed by batch size) and `table`.

    Raises:
        ValueError: If a format is unknown, `"tflite_int8"` lacks
            `representative_data`, `models` is empty, the test data is empty or
            its images and labels differ in number, or `latency_runs` or a
            batch size is negative (or zero for batch sizes).

    Example:

    ```python
    metrics = export_and_measure(
        {"shrunk": model}, "export", "saved_model,tflite", (x_test, y_test)
    )
    print(metrics["table"])
    ```
    """
    formats = parse_formats(formats)
    if not models:
        raise ValueError(f"`models` must name at least one model. Received: {models!r}")
    x_test, y_test = (np.asarray(a) for a in test_data)
    if len(x_test) == 0 or len(x_test) != len(y_test):
        raise ValueError(
            "`test_data` must be non-empty (images, labels) of equal length. "
            f"Received: {len(x_test)} images and {len(y_test)} labels"
        )
    if "tflite_int8" in formats and representative_data is None:
        raise ValueError(
            "The 'tflite_int8' format needs `representative_data` for calibration. "
            "Received: representative_data=None"
        )
    _checks.int_at_least("latency_runs", latency_runs, 0)
    batch_sizes = tuple(batch_sizes)
    if not all(_checks.is_int(b) and b >= 1 for b in batch_sizes):
        raise ValueError(
            f"`batch_sizes` must be positive integers. Received: {batch_sizes!r}"
        )
    output_dir = os.fspath(output_dir)
    num_threads = num_threads or os.cpu_count() or 1
    warmup_source = x_test if representative_data is None else representative_data
    warmup = [warmup_source[:b] for b in sorted(set(batch_sizes))]

    metrics = {
        "formats": list(formats),
        "num_test": len(x_test),
        "batch_sizes": list(batch_sizes),
        "latency_runs": latency_runs,
        "num_threads": num_threads,
        "tflite_interpreter": runners_lib.tflite_interpreter_name(),
        "models": {},
    }
    runners = {}
    for name, model in models.items():
        directory = os.path.join(output_dir, name)
        os.makedirs(directory, exist_ok=True)
        paths = {"keras": os.path.join(directory, "model.keras")}
        _save_without_optimizer(model, paths["keras"])
        runners[name, "keras"] = runners_lib.keras_runner(model)
        for fmt in formats:
            if fmt == "saved_model":
                paths[fmt] = export_lib.export_saved_model(
                    model, os.path.join(directory, "saved_model"), warmup_inputs=warmup
                )
                runners[name, fmt] = runners_lib.saved_model_runner(paths[fmt])
                continue
            if fmt == "onnx":
                paths[fmt] = onnx_lib.export_onnx(
                    model, os.path.join(directory, _FILES[fmt]), overwrite=True
                )
                runners[name, fmt] = runners_lib.onnx_runner(paths[fmt], num_threads)
                continue
            if fmt == "openvino":
                paths[fmt] = onnx_lib.export_openvino(
                    model, os.path.join(directory, _FILES[fmt]), overwrite=True
                )
                runners[name, fmt] = runners_lib.openvino_runner(
                    paths[fmt], num_threads
                )
                continue
            quantization = _QUANTIZATION[fmt]
            paths[fmt] = export_lib.export_tflite(
                model,
                os.path.join(directory, fmt.replace("tflite", "model") + ".tflite"),
                quantization=quantization,
                representative_data=(
                    representative_data if quantization == "int8" else None
                ),
                overwrite=True,
            )
            runners[name, fmt] = runners_lib.tflite_runner(paths[fmt], num_threads)
        reference = _outputs(runners[name, "keras"], x_test)
        artifacts = {}
        for fmt, path in paths.items():
            outputs = _outputs(runners[name, fmt], x_test)
            artifacts[fmt] = {
                "path": path,
                "size_bytes": _size_bytes(path),
                **output_difference(outputs, reference),
                "accuracy": float(np.mean(np.argmax(outputs, -1) == y_test)),
                "latency_ms": None,
            }
        metrics["models"][name] = {
            "params": model.count_params(),
            "artifacts": artifacts,
        }
    if latency_runs:
        for b in batch_sizes:
            batch = np.resize(x_test, (b, *x_test.shape[1:])).astype(np.float32)
            timed = latency_lib.time_alternately(
                {key: functools.partial(run, batch) for key, run in runners.items()},
                latency_runs,
                warmup=3,
            )
            for (name, fmt), ms in timed.items():
                artifact = metrics["models"][name]["artifacts"][fmt]
                artifact["latency_ms"] = (artifact["latency_ms"] or {}) | {str(b): ms}
        _add_speedups(metrics["models"])
    metrics["table"] = format_metrics_table(metrics)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def _load_model(path: str) -> keras.Model:
    model = files.load_model(path, "model_paths")  # a damaged file says so
    if any(isinstance(layer, FilterPruning) for layer in model.layers):
        model = strip_pruning(model)
    return model


def export_model_files(
    model_paths: Mapping[str, str | os.PathLike],
    output_dir: str | os.PathLike,
    formats: str | Sequence[str] = "saved_model,tflite,tflite_int8",
    dataset: str = "fashion_mnist",
    data_dir: str | None = None,
    test_limit: int = 0,
    calibration_examples: int = 200,
    latency_runs: int = 20,
) -> dict[str, Any]:
    """`export_and_measure` for `.keras` files, on a `keras_sfp.training.data` set.

    Models holding `FilterPruning` wrappers are stripped (`strip_pruning`)
    first. The first `calibration_examples` training images calibrate int8
    and form the warmup requests; the test split (or its first `test_limit`
    images) gives the accuracy.

    Args:
        model_paths: `{name: path of a .keras file}`.
        output_dir: Where the artifacts and `metrics.json` go.
        formats: A subset of `FORMATS`. Defaults to
            `"saved_model,tflite,tflite_int8"`.
        dataset: A name for `keras_sfp.training.data.load_dataset`. Defaults to
            `"fashion_mnist"`.
        data_dir: The dataset's directory; `None` for the default. Defaults to
            None.
        test_limit: Test images used; 0 uses all. Defaults to 0.
        calibration_examples: Training images for int8 calibration. Defaults
            to 200.
        latency_runs: Timed calls per artifact and batch size. Defaults to 20.

    Returns:
        The metrics of `export_and_measure`.

    Raises:
        ValueError: If a format is unknown, a model's input does not match the
            dataset's images, or `calibration_examples` is not positive.

    Example:

    ```python
    export_model_files(
        {"shrunk": "runs/resnet20_fashion_mnist/shrunk.keras"}, "export"
    )["table"]
    ```
    """

    formats = parse_formats(formats)
    _checks.positive_int("calibration_examples", calibration_examples)
    data = data_lib.load_dataset(dataset, data_dir=data_dir)
    models = {name: _load_model(os.fspath(p)) for name, p in model_paths.items()}
    for name, model in models.items():
        if tuple(model.inputs[0].shape[1:]) != tuple(data.input_shape):
            raise ValueError(
                f"Model {name!r} takes inputs of shape {model.inputs[0].shape[1:]} "
                f"but {dataset!r} has images of shape {data.input_shape}. "
                f"Received: model_paths[{name!r}]={os.fspath(model_paths[name])!r}"
            )
    representative, _ = data_lib.as_arrays(data.train, calibration_examples)
    metrics = export_and_measure(
        models,
        output_dir,
        formats,
        data_lib.as_arrays(data.test, test_limit or None),
        representative_data=representative,
        latency_runs=latency_runs,
    )
    return metrics
