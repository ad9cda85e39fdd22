"""The latency benchmark end to end on a tiny model: rows, table and plot."""

import keras
import pytest

from bench import latency as bench
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
