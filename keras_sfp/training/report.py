"""The report of a run: its `results.json` entries and the printed table."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import keras

import keras_sfp
from keras_sfp.latency import timing as latency
from keras_sfp.training import distributed
from keras_sfp.training.config import TrainConfig


def collect(
    config: TrainConfig,
    data,
    *,
    models: dict[str, keras.Model],
    evaluations: dict[str, dict[str, float]],
    timings: dict[str, float | None],
    history: keras.callbacks.History,
    distilled: bool,
    train_seconds: float,
    sizes: tuple[int, int],
    artifacts: dict[str, Any],
) -> dict[str, Any]:
    """The results of a run (`train_and_evaluate`'s, without `export`, `table`).

    `models`: the unpruned `original` architecture, the trained `pruned`
    model and the `shrunk` one; `evaluations`: `evaluate`'s dicts of the
    `soft_masked` and `shrunk` models; `sizes`: examples trained and tested on.
    """
    original, pruned, shrunk = models["original"], models["pruned"], models["shrunk"]
    soft, shrunk_eval = evaluations["soft_masked"], evaluations["shrunk"]
    num_train, num_test = sizes
    output_dir = config.resolved_output_dir()
    export = config.resolved_export()
    original_macs = keras_sfp.count_flops(original)
    shrunk_macs = keras_sfp.count_flops(shrunk)
    original_filters = filters(original)
    shrunk_filters = filters(shrunk)
    speedup = None
    if timings["original"] and timings["shrunk"]:
        speedup = timings["original"] / timings["shrunk"]
    return {
        "device": latency.device_name(),
        "config": dataclasses.asdict(config)
        | {
            "output_dir": output_dir,
            "export": export,
            "learning_rate": config.resolved_learning_rate(),
            "rate": keras_sfp.spec_of(pruned).rate,
            "round_to": keras_sfp.spec_of(pruned).round_to,  # "auto" resolved
            "hard_epochs": config.resolved_hard_epochs(),
            "allocation": config.resolved_allocation(),
            "distill": distilled,
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
        "history": history_lists(history),
        "train_seconds": train_seconds,
        "artifacts": artifacts,
    }


def filters(model: keras.Model) -> dict[str, int]:
    """`{conv layer name: filters}`, unwrapping `FilterPruning`."""
    counts = {}
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, keras_sfp.FilterPruning) else layer
        if isinstance(inner, keras.layers.Conv2D):
            counts[inner.name] = int(inner.filters)
    return counts


def history_lists(history: keras.callbacks.History) -> dict[str, list[float]]:
    return {key: [float(v) for v in values] for key, values in history.history.items()}


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
