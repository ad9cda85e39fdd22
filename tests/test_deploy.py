"""Tests of `keras_sfp.export.measure` and the `keras-sfp-export` command."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_sfp
from keras_sfp.export import measure as deploy
from keras_sfp.export import runners as runners_lib

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:tensorflow.lite.python.interpreter"
)

L = keras.layers
SHAPE = (12, 12, 1)


def _cnn(width, input_shape=SHAPE, name="cnn"):
    inputs = keras.Input(input_shape)
    x = L.Conv2D(width, 3, padding="same", activation="relu", name="c1")(inputs)
    x = L.Conv2D(2 * width, 3, strides=2, activation="relu", name="c2")(x)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x), name=name)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.random((96, *SHAPE), dtype=np.float32)
    return x, rng.integers(0, 10, 96), x[:40]


@pytest.fixture(scope="module")
def measured(data, tmp_path_factory):
    keras.utils.set_random_seed(0)
    models = {"original": _cnn(16), "shrunk": _cnn(8)}
    x, y, _ = data
    models["original"].compile("adam", "sparse_categorical_crossentropy")
    models["original"].fit(x, y, verbose=0)  # optimizer state, not exported
    x, y, calibration = data
    root = tmp_path_factory.mktemp("deploy")
    metrics = deploy.export_and_measure(
        models, root, deploy.FORMATS, (x, y), calibration, latency_runs=2
    )
    return models, root, metrics


def _dir_size(path):
    return sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
    )


def test_metrics_json_records_every_artifact_of_every_model(measured):
    _, root, metrics = measured
    with open(root / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(metrics))
    assert list(metrics["models"]) == ["original", "shrunk"]
    for name, entry in metrics["models"].items():
        assert list(entry["artifacts"]) == ["keras", *deploy.FORMATS]
        paths = {k: a["path"] for k, a in entry["artifacts"].items()}
        assert paths["saved_model"] == str(root / name / "saved_model" / "1")
        assert paths["tflite"] == str(root / name / "model.tflite")
        assert paths["tflite_int8"] == str(root / name / "model_int8.tflite")
        for artifact in entry["artifacts"].values():
            path = artifact["path"]
            size = _dir_size(path) if os.path.isdir(path) else os.path.getsize(path)
            if path.endswith(".xml"):  # OpenVINO IR: the graph and its weights
                size += os.path.getsize(path[: -len(".xml")] + ".bin")
            assert artifact["size_bytes"] == size > 0
            assert set(artifact["latency_ms"]) == {"1", "32"}
            assert all(ms > 0 for ms in artifact["latency_ms"].values())
    # Each shrunk artifact's speedup is over the same artifact of the original.
    for fmt, artifact in metrics["models"]["shrunk"]["artifacts"].items():
        base = metrics["models"]["original"]["artifacts"][fmt]
        assert "speedup" not in base
        for b, ms in artifact["latency_ms"].items():
            assert artifact["speedup"][b] == base["latency_ms"][b] / ms
            assert f"({artifact['speedup'][b]:.2f}x)" in metrics["table"]
    # One table row per artifact and model, the original beside the shrunk.
    rows = metrics["table"].splitlines()[2:]
    assert [r.split()[:2] for r in rows[:2]] == [
        ["keras", "original"],
        ["keras", "shrunk"],
    ]
    assert len(rows) == 2 * (1 + len(deploy.FORMATS))


def test_measured_accuracy_is_the_models(measured, data):
    models, _, metrics = measured
    x, y, _ = data
    for name, model in models.items():
        expected = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
        artifacts = metrics["models"][name]["artifacts"]
        for fmt in ("keras", "saved_model", "tflite", "tflite_float16"):
            assert artifacts[fmt]["accuracy"] == pytest.approx(expected, abs=1 / 96)
        assert metrics["models"][name]["params"] == model.count_params()


def test_shrunk_artifacts_are_smaller(measured):
    models, _, metrics = measured
    original, shrunk = (metrics["models"][n]["artifacts"] for n in metrics["models"])
    for fmt in ("keras", *deploy.FORMATS):
        assert shrunk[fmt]["size_bytes"] < original[fmt]["size_bytes"]
    # The reference .keras holds the weights, not Adam's two slots per weight.
    weight_bytes = 4 * models["original"].count_params()
    assert weight_bytes < original["keras"]["size_bytes"] < 2 * weight_bytes
    assert original["tflite_int8"]["size_bytes"] < original["tflite"]["size_bytes"] / 3


def test_saved_model_has_warmup_at_latency_batch_sizes(measured):
    _, root, _ = measured
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = root / "shrunk" / "saved_model" / "1" / "assets.extra"
    records = tf.data.TFRecordDataset(str(path / "tf_serving_warmup_requests"))
    batches = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        .predict_log.request.inputs["images"]
        .tensor_shape.dim[0]
        .size
        for r in records
    ]
    assert batches == [1, 32]


def test_second_run_adds_a_saved_model_version(data, tmp_path):
    x, y, _ = data
    model = _cnn(4)
    for _ in range(2):
        metrics = deploy.export_and_measure(
            {"m": model}, tmp_path, "saved_model,tflite", (x, y), latency_runs=0
        )
    assert sorted(os.listdir(tmp_path / "m" / "saved_model")) == ["1", "2"]
    artifacts = metrics["models"]["m"]["artifacts"]
    assert artifacts["saved_model"]["path"].endswith(os.path.join("saved_model", "2"))
    assert artifacts["tflite"]["latency_ms"] is None


def test_tflite_runner_dequantizes_integer_io(measured, data, tmp_path):
    models, root, _ = measured
    x, _, calibration = data
    path = keras_sfp.export_tflite(
        models["shrunk"],
        tmp_path / "io.tflite",
        quantization="int8",
        representative_data=calibration,
        integer_io=True,
    )
    float_io = runners_lib.tflite_runner(str(root / "shrunk" / "model_int8.tflite"))(x)
    integer_io = runners_lib.tflite_runner(path)(x)
    assert integer_io.dtype == np.float32
    step = np.max(np.abs(float_io)) / 64  # a few int8 quantization steps
    np.testing.assert_allclose(integer_io, float_io, atol=step)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"formats": "saved_model,coreml"}, r"unknown: \['coreml'\]"),
        ({"formats": "tflite_int8"}, "representative_data=None"),
        ({"models": {}}, r"Received: \{\}"),
        ({"test_data": (np.zeros((3, *SHAPE)), np.zeros(2))}, "3 images and 2 labels"),
        ({"latency_runs": -1}, "Received: latency_runs=-1"),
        ({"batch_sizes": (1, 0)}, r"Received: \(1, 0\)"),
    ],
)
def test_export_and_measure_rejects_bad_arguments(tmp_path, kwargs, match):
    arguments = {
        "models": {"m": _cnn(4)},
        "output_dir": tmp_path,
        "formats": "saved_model",
        "test_data": (np.zeros((3, *SHAPE), np.float32), np.zeros(3)),
    } | kwargs
    with pytest.raises(ValueError, match=match):
        deploy.export_and_measure(**arguments)
    assert os.listdir(tmp_path) == []


def test_parse_formats_keeps_order_and_drops_blanks():
    assert deploy.parse_formats(" tflite,,saved_model,tflite ") == (
        "tflite",
        "saved_model",
    )
    assert deploy.parse_formats("") == ()


def test_command_line_exports_keras_files_and_strips_wrappers(tmp_path):
    keras.utils.set_random_seed(0)
    plain = _cnn(4, input_shape=(28, 28, 1))
    plain.save(tmp_path / "plain.keras")
    pruned = keras_sfp.prune_filters(_cnn(8, input_shape=(28, 28, 1)), rate=0.5)
    pruned.save(tmp_path / "pruned.keras")
    out = tmp_path / "export"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_sfp.cli.export",
            f"--model={tmp_path / 'plain.keras'}",
            f"--model=wrapped={tmp_path / 'pruned.keras'}",
            f"--output_dir={out}",
            "--formats=saved_model,tflite",
            "--test_limit=64",
            "--latency_runs=1",
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert list(metrics["models"]) == ["plain", "wrapped"]
    assert metrics["num_test"] == 64
    for entry in metrics["models"].values():
        accuracies = {a["accuracy"] for a in entry["artifacts"].values()}
        assert len(accuracies) == 1  # keras, saved_model and tflite agree
    exported = keras.saving.load_model(out / "wrapped" / "model.keras")
    assert not any(isinstance(x, keras_sfp.FilterPruning) for x in exported.layers)
    assert "saved_model  plain" in result.stdout


def test_command_line_requires_a_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keras_sfp.cli.export", f"--output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode != 0
    assert "--model" in result.stderr
    assert os.listdir(tmp_path) == []


def test_export_model_files_rejects_a_model_of_other_input_shape(tmp_path):
    _cnn(4).save(tmp_path / "small.keras")
    with pytest.raises(ValueError, match=r"shape \(12, 12, 1\).*\(28, 28, 1\)"):
        deploy.export_model_files({"small": tmp_path / "small.keras"}, tmp_path / "o")
    assert not (tmp_path / "o").exists()
