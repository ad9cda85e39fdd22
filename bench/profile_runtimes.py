"""Where the time goes: per-operator profiles of ONNX Runtime and OpenVINO.

A shrunk model whose MACs fell 2.6x but whose latency fell 1.3x spends its
time somewhere the MACs reduction does not reach. This runs the original
and the shrunk model of `bench.latency`'s `--model` (one prune event at its
rate, `round_to` as given, `"auto"` by default), exported with
`keras_sfp.export_onnx` and `keras_sfp.export_openvino` (BatchNormalization
folded), under each runtime's own profiler, and sums the time per operator
type:

- ONNX Runtime: `SessionOptions.enable_profiling`, the `*_kernel_time`
  events of the CPU execution provider (microseconds per node);
- OpenVINO: `ov.properties.enable_profiling`, each request's
  `get_profiling_info()` (real time per executed node, after OpenVINO's
  own fusions: a convolution with its bias, activation and residual add
  is one node).

Each operator type's row gives the number of nodes and the milliseconds
per call of the original and the shrunk model, and their ratio: the
convolutions follow the MACs, while ops whose cost does not fall with the
channel count (layout transposes, pooling, the classifier, per-node
overhead) cap the speedup. The profiled totals are sums of kernel times,
not wall-clock latency (`bench.latency` measures that), and the runtime's
own time between kernels is not in them.

    python -m bench.profile_runtimes                  # ResNet-56, batch 1 and 32
    python -m bench.profile_runtimes --model=resnet50 --batch_sizes=1

Results go to `bench/results/profile_<model>_cpu.{md,json}`.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile

import keras
import numpy as np
from absl import app, flags

import keras_sfp
from bench import machine as machine_lib
from bench import tables
from bench.latency_models import MODELS
from keras_sfp.export import onnx as onnx_lib

flags.DEFINE_string("model", "resnet56", "A model of bench.latency_models.MODELS.")
flags.DEFINE_string("round_to", "auto", "round_to of the shrunk model.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to profile.")
flags.DEFINE_integer("runs", 0, "Profiled calls (0: 200 at batch 1, 20 above).")
flags.DEFINE_string("out", "bench/results", "Directory of the results.")

FLAGS = flags.FLAGS


def _onnx_profile(path: str, images: np.ndarray, runs: int, directory: str) -> dict:
    """`{op_type: (nodes, ms per call)}` from ONNX Runtime's profiler."""
    ort = onnx_lib.require_module("onnxruntime", "onnxruntime", "profiling")
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(directory, "ort")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(5 + runs):  # 5 warm-up calls, dropped below
        session.run(None, {name: images})
    per_node = collections.defaultdict(list)
    for event in _ort_events(session.end_profiling()):
        per_node[event["name"]].append(event)
    totals = collections.defaultdict(float)
    nodes = collections.Counter()
    for node_events in per_node.values():
        kept = node_events[-runs:]
        op = kept[0]["args"].get("op_name", "?")
        nodes[op] += 1
        totals[op] += sum(e["dur"] for e in kept) / 1000.0 / runs
    return {op: (nodes[op], totals[op]) for op in totals}


def _ort_events(profile_path: str) -> list:
    with open(profile_path) as f:
        events = json.load(f)
    os.remove(profile_path)
    return [
        e
        for e in events
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
    ]


def _openvino_profile(path: str, images: np.ndarray, runs: int) -> dict:
    """`{node_type: (nodes, ms per call)}` from OpenVINO's profiler."""
    ov = onnx_lib.require_module("openvino", "openvino", "profiling")
    core = ov.Core()
    model = core.read_model(path)
    model.reshape({0: list(images.shape)})
    compiled = core.compile_model(
        model,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": os.cpu_count() or 1,
            "INFERENCE_PRECISION_HINT": "f32",
            "PERF_COUNT": True,
        },
    )
    request = compiled.create_infer_request()
    for _ in range(5):
        request.infer({0: images})
    totals = collections.defaultdict(float)
    nodes = collections.Counter()
    for run in range(runs):
        request.infer({0: images})
        for info in request.get_profiling_info():
            if info.status != info.Status.EXECUTED:
                continue
            op = info.node_type
            if run == 0:
                nodes[op] += 1
            totals[op] += info.real_time.total_seconds() * 1000.0 / runs
    return {op: (nodes[op], totals[op]) for op in totals}


def profile(name: str, round_to, batches, runs: int) -> list[dict]:
    """The rows of `name`: one per runtime, batch and operator type."""
    builder, rate, size, _ = MODELS[name]
    keras.utils.set_random_seed(0)
    original = builder(size)
    pruned = keras_sfp.prune_filters(original, rate=rate, round_to=round_to)
    resolved = keras_sfp.spec_of(pruned).round_to
    keras_sfp.FilterPruner(pruned).prune(0)
    shrunk = keras_sfp.shrink(pruned)
    macs_ratio = keras_sfp.count_flops(original) / keras_sfp.count_flops(shrunk)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        paths = {}
        for label, model in (("original", original), ("shrunk", shrunk)):
            onnx_path = os.path.join(directory, f"{label}.onnx")
            xml_path = os.path.join(directory, f"{label}.xml")
            keras_sfp.export_onnx(model, onnx_path)
            keras_sfp.export_openvino(model, xml_path)
            paths[label] = {"onnx": onnx_path, "openvino": xml_path}
        for batch in batches:
            count = runs or (200 if batch == 1 else 20)
            images = np.random.default_rng(0).random(
                (batch, *original.inputs[0].shape[1:]), dtype=np.float32
            )
            for runtime in ("onnx", "openvino"):
                found = {}
                for label in ("original", "shrunk"):
                    path = paths[label][runtime]
                    found[label] = (
                        _onnx_profile(path, images, count, directory)
                        if runtime == "onnx"
                        else _openvino_profile(path, images, count)
                    )
                for op in sorted(
                    set(found["original"]) | set(found["shrunk"]),
                    key=lambda o: -found["original"].get(o, (0, 0.0))[1],
                ):
                    n0, ms0 = found["original"].get(op, (0, 0.0))
                    n1, ms1 = found["shrunk"].get(op, (0, 0.0))
                    rows.append(
                        dict(
                            model=name,
                            round_to=resolved,
                            macs_ratio=macs_ratio,
                            runtime=runtime,
                            batch=batch,
                            op=op,
                            nodes_original=n0,
                            nodes_shrunk=n1,
                            ms_original=ms0,
                            ms_shrunk=ms1,
                        )
                    )
    return rows


def markdown(rows: list[dict]) -> str:
    """A table per runtime and batch, with the totals and each op's share."""
    lines = [machine_lib.header("CPU"), ""]
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["runtime"], r["batch"])].append(r)
    for (runtime, batch), found in groups.items():
        first = found[0]
        total0 = sum(r["ms_original"] for r in found)
        total1 = sum(r["ms_shrunk"] for r in found)
        lines += [
            f"**{first['model']}, {runtime}, batch {batch}** (round_to="
            f"{first['round_to']}, MACs ratio {first['macs_ratio']:.2f}x): "
            f"profiled kernels {total0:.3f} ms -> {total1:.3f} ms "
            f"({total0 / total1:.2f}x).",
            "",
        ]
        cells = []
        for r in found:
            ratio = r["ms_original"] / r["ms_shrunk"] if r["ms_shrunk"] else None
            cells.append(
                [
                    r["op"],
                    f"{r['nodes_original']} / {r['nodes_shrunk']}",
                    f"{r['ms_original']:.3f}",
                    f"{100 * r['ms_original'] / total0:.0f} %",
                    f"{r['ms_shrunk']:.3f}",
                    f"{100 * r['ms_shrunk'] / total1:.0f} %",
                    f"{ratio:.2f}x" if ratio else "-",
                ]
            )
        columns = ["op", "nodes", "original ms", "share", "shrunk ms", "share"]
        lines += tables.markdown_table([*columns, "speedup"], cells)
        lines.append("")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    round_to = FLAGS.round_to if FLAGS.round_to == "auto" else int(FLAGS.round_to)
    rows = profile(
        FLAGS.model, round_to, [int(b) for b in FLAGS.batch_sizes], FLAGS.runs
    )
    os.makedirs(FLAGS.out, exist_ok=True)
    base = os.path.join(FLAGS.out, f"profile_{FLAGS.model}_cpu")
    with open(base + ".json", "w") as f:
        json.dump({**machine_lib.describe("CPU"), "rows": rows}, f, indent=1)
    text = markdown(rows)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
