"""Is the shrunk model faster where it runs? Speedup against the MACs ratio.

Why one module of over 400 lines: models, runtimes, batch sizes and
round_to values form one grid whose rows are measured side by side in one
process (timing as ratios); splitting it would split the grid.

For each model, prunes once at the given rate (`prune_filters` +
one `FilterPruner` event, defaults otherwise) with each `--round_to`,
shrinks, and times the original and every shrunk variant *alternately in
one process* (`keras_sfp.latency.timing.time_alternately`: warm-up first, medians)
on every runtime available here:

- `keras`: the current Keras backend, compiled (`keras_sfp.latency.timing`:
  a `tf.function` on TensorFlow; on JAX a jitted `stateless_call` on
  device-resident inputs, blocking on the result: a GPU when JAX has one);
- `tflite`: the TFLite float flatbuffer through the interpreter (XNNPACK),
  all CPU cores (TensorFlow backend only);
- `tflite_int8`: full-integer post-training quantization (`--int8`);
- `onnx`: `keras_sfp.export_onnx` (BatchNormalization folded) in an ONNX
  Runtime session on the CPU execution provider, all CPU cores;
- `openvino`: `keras_sfp.export_openvino` (folded) compiled for the CPU by
  OpenVINO in float32 (`INFERENCE_PRECISION_HINT`), all CPU cores.

`--runtimes` picks among them (`tflite`, `onnx` and `openvino` need the
TensorFlow backend and their packages: `keras-sfp[runtimes]`; one whose
package is missing is skipped with a message). Every results file names the
CPU, its vector extensions and the GPU where one is used (`bench.machine`):
a figure holds on that machine, not on another.

Besides the `round_to` variants: `latency`, `prune_filters(target_latency=...)`
over this device's per-layer latency table (`--latency_aware`, cached under
`--cache_dir`), and the original and default shrunk models with
BatchNormalization folded (`--fold`, Keras runtime only). The Markdown file
ends with a summary table: one line per model, runtime and batch size.

Each row gives the MACs ratio (original / shrunk), the measured speedup and
their quotient, the *efficiency* (1.0 is the physical limit of a MACs
reduction). Results go to `bench/results/<--name>_<device>.{md,json,png}`
(`--name` defaults to `latency`);
the PNG plots speedup against MACs ratio per runtime.

    python -m bench.latency    # every model and runtime: the longest run
    python -m bench.latency --models=resnet56 --round_to=8,16 \
        --batch_sizes=1,32 --runtimes=keras,tflite,onnx,openvino \
        --nolatency_aware --nofold --name=latency_runtimes
    KERAS_BACKEND=jax python -m bench.latency      # a GPU through JAX/XLA

On a GPU the input sizes are those of the issue's table (224x224 for the
ImageNet models) and batch 1, 32 and 128 are timed; on a CPU 160x160 and
batches 1 and 32 (128 for the CIFAR-size models).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import time

import keras  # noqa: E402
import numpy as np
from absl import app, flags

import keras_sfp  # noqa: E402
from bench import machine as machine_lib
from bench import tables
from bench.latency_models import MODELS, SMALL
from keras_sfp.latency import timing as latency  # noqa: E402

# Runtimes besides Keras, each on an artifact exported from every variant
# (the folded variants excepted: each export folds BatchNormalization).
EXPORTED = ("tflite", "onnx", "openvino")
RUNTIMES = ("keras", *EXPORTED)


flags.DEFINE_list("models", list(MODELS), "Models to measure.")
flags.DEFINE_list("round_to", ["1", "8", "16"], "round_to values to compare.")
flags.DEFINE_list(
    "batch_sizes",
    ["1", "32", "128"],
    "Batch sizes (128: CIFAR-size models only on a CPU).",
)
flags.DEFINE_integer("runs", 0, "Timed calls per model (0: by cost).")
flags.DEFINE_bool("int8", False, "Also time full-integer TFLite.")
flags.DEFINE_bool(
    "latency_aware",
    True,
    "Add the `target_latency` variant (per-layer latency table of this "
    "device, cached under --cache_dir).",
)
flags.DEFINE_string("cache_dir", None, "Latency tables (default: ~/.cache).")
flags.DEFINE_bool(
    "fold", True, "Add BatchNormalization-folded variants (Keras runtime)."
)
flags.DEFINE_list(
    "runtimes",
    list(RUNTIMES),
    f"Runtimes to time, among {', '.join(RUNTIMES)} (tflite_int8 with --int8).",
)
flags.DEFINE_string("out", "bench/results", "Directory of the results.")
flags.DEFINE_string(
    "name", "latency", "Results file stem: <out>/<name>_<device>.{md,json,png}."
)


def on_gpu() -> bool:
    return latency.device_name() != "CPU"


def _shrunk(pruned: keras.Model) -> keras.Model:
    """One prune event, then `shrink`."""
    keras_sfp.FilterPruner(pruned).prune(0)
    return keras_sfp.shrink(pruned)


def variants(
    name: str,
    size: int,
    round_tos,
    latency_aware: bool = False,
    table=None,
    fold: bool = False,
) -> dict[str, keras.Model]:
    """`{"original": model, "round_to=q": shrunk, ...}` for one model.

    With `latency_aware`, also `"latency"`: `prune_filters(target_latency=f)`
    (HALP's allocation over the per-layer `table`, round_to 8), where `f` is
    the latency the table predicts for the default (`round_to=8` at the
    model's rate), as a fraction of the original's: the same predicted
    speed, with the channels spent where they cost least time.

    With `fold`, also `"original folded"` and `"round_to=8 folded"`: the
    original and the default shrunk model with BatchNormalization folded into
    the convolutions (`keras_sfp.fold_batch_norm`, what `export_saved_model`
    writes). Keras runtime only: the TFLite converter folds by itself.
    """
    builder, rate, _, _ = MODELS[name]
    keras.utils.set_random_seed(0)
    model = builder(size)
    result = {"original": model}
    for q in round_tos:
        result[f"round_to={q}"] = _shrunk(
            keras_sfp.prune_filters(model, rate=rate, round_to=q)
        )
    if latency_aware or fold:
        default = result.get("round_to=8") or _shrunk(
            keras_sfp.prune_filters(model, rate=rate, round_to=8)
        )
    if latency_aware:
        from keras_sfp.allocation.latency_model import predicted_ms

        start, measured = time.perf_counter(), table.measured
        fraction = predicted_ms(default, table) / predicted_ms(model, table)
        pruned = keras_sfp.prune_filters(
            model, target_latency=fraction, latency_table=table, round_to=8
        )
        print(
            f"{name}: latency allocation for target {fraction:.3f} in "
            f"{time.perf_counter() - start:.0f} s ({table.measured - measured} "
            f"entries measured, {len(table.entries)} in the table)",
            flush=True,
        )
        result["latency"] = _shrunk(pruned)
    if fold:
        result["original folded"] = keras_sfp.fold_batch_norm(model)
        result["round_to=8 folded"] = keras_sfp.fold_batch_norm(default)
    return result


def _runs_for(macs: int, batch: int, runs: int) -> int:
    """`runs`, or for 0 about 20 s of the original's work on a 2-core CPU."""
    if runs:
        return runs
    if on_gpu():
        return 200
    seconds = macs * batch / 2e10  # ~20 GMAC/s here
    return int(np.clip(20.0 / max(seconds, 1e-3), 5, 100))


def _available(runtime: str) -> bool:
    """Whether `runtime`'s packages import here (a message where not)."""
    import importlib.util

    needs = {"onnx": ("onnx", "tf2onnx", "onnxruntime"), "openvino": ("openvino",)}
    missing = [m for m in needs.get(runtime, ()) if not importlib.util.find_spec(m)]
    if missing:
        print(f"skipping runtime {runtime}: {', '.join(missing)} not installed")
    return not missing


def _exported_runners(named, runtimes, int8: bool, directory: str) -> dict:
    """`{(runtime, variant): images -> outputs}`, each model exported once
    per runtime of `runtimes` among `EXPORTED` (each runner takes any batch
    size)."""
    from keras_sfp import export
    from keras_sfp.export import runners as runners_lib

    calibration = _images(named["original"], 8)
    runners = {}
    for key, model in named.items():
        if key.endswith("folded"):
            continue  # every export folds BatchNormalization itself
        stem = os.path.join(directory, key.replace("=", "_").replace(" ", "_"))
        if "tflite" in runtimes:
            path = export.export_tflite(model, f"{stem}.tflite")
            runners[("tflite", key)] = runners_lib.tflite_runner(path)
            if int8:
                path = export.export_tflite(
                    model,
                    f"{stem}_int8.tflite",
                    quantization="int8",
                    representative_data=calibration,
                )
                runners[("tflite_int8", key)] = runners_lib.tflite_runner(path)
        if "onnx" in runtimes:
            path = export.export_onnx(model, f"{stem}.onnx")
            runners[("onnx", key)] = runners_lib.onnx_runner(path)
        if "openvino" in runtimes:
            path = export.export_openvino(model, f"{stem}.xml")
            runners[("openvino", key)] = runners_lib.openvino_runner(
                path, precision="f32"
            )
    return runners


def _images(model, batch: int) -> np.ndarray:
    shape = (batch, *model.input_shape[1:])
    return np.random.default_rng(0).random(shape, dtype=np.float32)


def measure_model(
    name: str,
    round_tos,
    batches,
    int8: bool = False,
    runs: int = 0,
    table=None,
    fold: bool = False,
    runtimes=None,
) -> list[dict]:
    """Rows of one model: every runtime and batch, variants side by side.

    `table`: a `LatencyTable` to add the latency-aware variant with, or None;
    `fold`: add the folded variants (see `variants`); `runtimes`: names of
    `RUNTIMES` to time (None: every one whose packages are installed; the
    exported ones on the TensorFlow backend only).
    """
    runtimes = list(RUNTIMES if runtimes is None else runtimes)
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise ValueError(f"Unknown runtimes {unknown}; expected some of {RUNTIMES}")
    _, rate, cpu_size, gpu_size = MODELS[name]
    size = gpu_size if on_gpu() else cpu_size
    named = variants(name, size, round_tos, table is not None, table, fold)
    macs = {key: keras_sfp.count_flops(m) for key, m in named.items()}
    backend = keras.backend.backend()
    directory = tempfile.TemporaryDirectory()
    exported = {}
    if backend == "tensorflow":
        chosen = [r for r in runtimes if r in EXPORTED and _available(r)]
        exported = _exported_runners(named, chosen, int8, directory.name)
    rows = []
    for batch in batches:
        if not on_gpu() and batch > 32 and name not in SMALL:
            continue
        x = _images(named["original"], batch)
        runners = {}
        if "keras" in runtimes:
            runners = {
                (f"keras-{backend}", key): latency.keras_runner(m, x)
                for key, m in named.items()
            }
        runners |= {key: functools.partial(run, x) for key, run in exported.items()}
        calls = _runs_for(macs["original"], batch, runs)
        start = time.perf_counter()
        times = latency.time_alternately(runners, runs=calls, warmup=3)
        seconds = time.perf_counter() - start
        print(f"{name} batch {batch}: {calls} runs in {seconds:.0f} s", flush=True)
        for runtime in dict.fromkeys(r for r, _ in runners):
            base = times[(runtime, "original")]
            for key in named:
                if key == "original" or (runtime, key) not in times:
                    continue
                ratio = macs["original"] / macs[key]
                speedup = base / times[(runtime, key)]
                rows.append(
                    {
                        "model": name,
                        "input": size,
                        "rate": rate,
                        "variant": key,
                        "runtime": runtime,
                        "batch": batch,
                        "macs_ratio": ratio,
                        "original_ms": base,
                        "shrunk_ms": times[(runtime, key)],
                        "speedup": speedup,
                        "efficiency": speedup / ratio,
                        "runs": calls,
                    }
                )
    directory.cleanup()
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"{machine_lib.header(device)}.",
        "",
        f"Device: {device}; Keras {keras.__version__} on "
        f"{keras.backend.backend()}. One prune event at the rate shown, "
        "defaults otherwise; original and shrunk variants timed alternately in "
        "one process, medians. efficiency = speedup / MACs ratio (1.0 is the "
        "limit of the MACs reduction).",
        "",
    ]
    columns = ["model", "input", "rate", "variant", "runtime", "batch"]
    columns += ["MACs ratio", "original ms", "shrunk ms", "speedup", "efficiency"]
    lines += tables.markdown_table(
        columns,
        [
            [r["model"], r["input"], r["rate"], r["variant"], r["runtime"]]
            + [r["batch"], f"{r['macs_ratio']:.2f}x", f"{r['original_ms']:.2f}"]
            + [f"{r['shrunk_ms']:.2f}", f"{r['speedup']:.2f}x"]
            + [f"{r['efficiency']:.2f}"]
            for r in rows
        ],
    )
    return "\n".join(lines) + "\n"


def summary(rows: list[dict], device: str | None = None) -> str:
    """One line per model, runtime and batch: each variant's speedup.

    A variant's MACs ratio is shown beside its speedup where it differs from
    the default's (`round_to=8`): the latency-aware variant keeps other
    counts; folding removes no MACs. With `device`
    (`keras_sfp.latency.timing.device_name()`), the table opens with the
    machine's line (`bench.machine.header`).
    """
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = []
    cells = {}
    for r in rows:
        cells.setdefault((r["model"], r["runtime"], r["batch"]), {})[r["variant"]] = r
    for (model, runtime, batch), found in cells.items():
        default = found.get("round_to=8")
        ratio = default["macs_ratio"] if default else None
        row = []
        for variant in variants:
            r = found.get(variant)
            if r is None:
                row.append("-")
            elif (
                ratio is None
                or variant.endswith("folded")
                or (abs(r["macs_ratio"] - ratio) < 0.01)
            ):
                row.append(f"{r['speedup']:.2f}x")
            else:
                row.append(f"{r['speedup']:.2f}x (MACs {r['macs_ratio']:.2f}x)")
        lines.append(
            [model, runtime, batch, "-" if ratio is None else f"{ratio:.2f}x", *row]
        )
    columns = ["model", "runtime", "batch", "MACs ratio", *variants]
    align = "llr" + "r" * (len(columns) - 3)
    head = [] if device is None else [f"{machine_lib.header(device)}.", ""]
    return "\n".join(head + tables.markdown_table(columns, lines, align)) + "\n"


def plot(rows: list[dict], path: str, device: str) -> None:
    """Speedup against MACs ratio: one panel per runtime and batch size.

    Colour = model, marker = variant; the balanced rounding keeps a model's
    MACs ratio about the same for every variant, so its points stack
    vertically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows))
    colors = dict(zip(names, plt.get_cmap("tab10").colors))
    markers = dict(zip(dict.fromkeys(r["variant"] for r in rows), "osD^v<>"))
    limit = max(max(r["macs_ratio"], r["speedup"]) for r in rows) * 1.1
    figure, axes = plt.subplots(
        len(runtimes),
        len(batches),
        figsize=(4 * len(batches), 3.6 * len(runtimes)),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for i, runtime in enumerate(runtimes):
        for j, batch in enumerate(batches):
            axis = axes[i][j]
            axis.plot([1, limit], [1, limit], "k--", lw=0.8)
            axis.axhline(1.0, color="grey", lw=0.8)
            for r in rows:
                if r["runtime"] == runtime and r["batch"] == batch:
                    axis.scatter(
                        r["macs_ratio"],
                        r["speedup"],
                        marker=markers[r["variant"]],
                        color=colors[r["model"]],
                    )
            where = device if runtime.startswith("keras") else "CPU"
            axis.set_title(f"{runtime} ({where}), batch {batch}", fontsize=9)
            axis.set(xlim=(1, limit), ylim=(0.5, limit))
            if i == len(runtimes) - 1:
                axis.set_xlabel("MACs ratio (original / shrunk)")
            if j == 0:
                axis.set_ylabel("speedup")
    handles = [
        plt.Line2D([], [], ls="", marker="o", color=c, label=n)
        for n, c in colors.items()
    ] + [
        plt.Line2D([], [], ls="", marker=m, color="k", label=v)
        for v, m in markers.items()
    ]
    handles.append(plt.Line2D([], [], ls="--", color="k", label="speedup = MACs ratio"))
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(path, dpi=110)


def main(argv):
    del argv
    options = flags.FLAGS
    device = latency.device_name()
    round_tos = [int(q) for q in options.round_to]
    batches = [int(b) for b in options.batch_sizes]
    stem = "cpu" if device == "CPU" else device.lower().replace(" ", "_")
    os.makedirs(options.out, exist_ok=True)
    base = os.path.join(options.out, f"{options.name}_{stem}")
    table = None
    if options.latency_aware:
        from keras_sfp.latency.table import LatencyTable

        table = LatencyTable.for_device(options.cache_dir)
    rows = []
    for name in options.models:
        rows.extend(
            measure_model(
                name,
                round_tos,
                batches,
                options.int8,
                options.runs,
                table,
                options.fold,
                options.runtimes,
            )
        )
        result = {
            "device": device,
            "backend": keras.backend.backend(),
            "keras": keras.__version__,
            "machine": platform.platform(),
            **machine_lib.describe(device),
            "runtimes": list(dict.fromkeys(r["runtime"] for r in rows)),
            "rows": rows,
        }
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(markdown(rows, device) + "\n" + summary(rows, device))
    plot(rows, base + ".png", device)
    print(markdown(rows, device))


if __name__ == "__main__":
    app.run(main)
