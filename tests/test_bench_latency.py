"""The latency benchmark end to end on a tiny model: rows, table and plot."""

import keras
import pytest

from bench import latency as bench
from bench import machine
from conftest import tiny_resnet


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(
        bench.MODELS,
        "tiny",
        (lambda s: tiny_resnet((s, s, 3), widths=(16, 32)), 0.3, 12, 12),
    )
    return "tiny"


def test_rows_compare_every_variant_with_the_original_on_each_runtime(tiny, tmp_path):
    rows = bench.measure_model(tiny, round_tos=[1, 8], batches=[1, 2], runs=2)
    runtimes = {r["runtime"] for r in rows}
    assert f"keras-{keras.backend.backend()}" in runtimes
    if keras.backend.backend() == "tensorflow":
        assert "tflite" in runtimes
    assert len(rows) == len(runtimes) * 2 * 2  # variants x batches
    for row in rows:
        assert row["speedup"] == pytest.approx(row["original_ms"] / row["shrunk_ms"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["macs_ratio"])
        assert row["macs_ratio"] > 1.5  # rate 0.3: about 1 / 0.7^2
    table = bench.markdown(rows, "CPU")
    assert table.count("\n| tiny |") == len(rows)
    assert table.startswith(f"CPU: {machine.cpu_description()}")
    bench.plot(rows, str(tmp_path / "plot.png"), "CPU")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_latency_aware_and_folded_variants(tiny):
    from keras_sfp.latency.table import LatencyTable

    table = LatencyTable(timer=lambda layer, shape: 1e-3 * shape[-1])
    rows = bench.measure_model(
        tiny, round_tos=[8], batches=[1], runs=2, table=table, fold=True
    )
    keras_runtime = f"keras-{keras.backend.backend()}"
    by_key = {(r["runtime"], r["variant"]): r for r in rows}
    for variant in ("round_to=8", "latency", "original folded", "round_to=8 folded"):
        assert (keras_runtime, variant) in by_key
    assert not any(
        r["variant"].endswith("folded") for r in rows if r["runtime"] == "tflite"
    )
    # Folding removes no MACs; the latency variant reaches the table's target.
    assert by_key[keras_runtime, "original folded"]["macs_ratio"] == 1.0
    assert by_key[keras_runtime, "latency"]["macs_ratio"] > 1.2
    assert table.measured > 0
    summary = bench.summary(rows)
    line = next(
        x
        for x in summary.splitlines()
        if x.startswith(f"| tiny | {keras_runtime} | 1 |")
    )
    latency = by_key[keras_runtime, "latency"]
    assert f"{latency['speedup']:.2f}x (MACs {latency['macs_ratio']:.2f}x)" in line
    assert line.count("|") == 4 + 4 + 1  # model, runtime, batch, ratio, 4 variants


def test_onnx_and_openvino_rows_beside_keras_and_tflite(tiny):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the exported runtimes need the TensorFlow backend")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    pytest.importorskip("openvino")
    rows = bench.measure_model(
        tiny,
        round_tos=[8],
        batches=[1, 2],
        runs=2,
        runtimes=["keras", "tflite", "onnx", "openvino"],
    )
    keras_runtime = f"keras-{keras.backend.backend()}"
    found = {(r["runtime"], r["batch"]) for r in rows}
    for runtime in (keras_runtime, "tflite", "onnx", "openvino"):
        for batch in (1, 2):
            assert (runtime, batch) in found
    for row in rows:
        assert row["original_ms"] > 0 and row["shrunk_ms"] > 0
        assert row["speedup"] == pytest.approx(row["original_ms"] / row["shrunk_ms"])
    summary = bench.summary(rows, "CPU")
    assert summary.startswith(f"CPU: {machine.cpu_description()}")
    assert "| tiny | onnx | 2 |" in summary and "| tiny | openvino | 1 |" in summary
    # A subset: only the chosen runtimes are timed.
    rows = bench.measure_model(
        tiny, round_tos=[8], batches=[1], runs=1, runtimes=["onnx"]
    )
    assert {r["runtime"] for r in rows} == {"onnx"}
    with pytest.raises(ValueError, match="Unknown runtimes"):
        bench.measure_model(tiny, round_tos=[8], batches=[1], runtimes=["trt"])


def test_machine_description_names_the_cpu_and_its_vector_extensions():
    xeon = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum\n"
        "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni amx_tile\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum\n"
    )
    assert machine.cpu_info(xeon, "x86_64") == {
        "model": "Intel(R) Xeon(R) Platinum",
        "extensions": ["avx512f", "avx512_vnni", "amx_tile", "avx2", "fma"],
    }
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm sve\n"
    info = machine.cpu_info(arm, "aarch64")
    assert info["extensions"] == ["neon", "sve"] and info["model"]
    assert machine.cpu_info("", "x86_64")["model"]  # platform.processor() or arch
    line = machine.cpu_description(xeon, "x86_64")
    assert line.startswith("Intel(R) Xeon(R) Platinum (") and "avx512f" in line
    # This machine: the header names the CPU, and the GPU where one is used.
    assert machine.header("CPU").startswith("CPU: ")
    assert "GPU: NVIDIA H200" in machine.header("NVIDIA H200")
    described = machine.describe("NVIDIA H200")
    assert described["gpu"] == "NVIDIA H200" and described["cpu"]
    assert machine.describe("CPU")["gpu"] is None
