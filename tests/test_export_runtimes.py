"""Tests of `keras_sfp.export.onnx` and the runtimes `measure` times them in.

A tiny residual CNN (convolution, BatchNormalization, ReLU, a residual add,
global average pooling, a dense layer) is pruned once and shrunk; each
format is exported through Keras's `model.export` and run the way it is
deployed (ONNX Runtime, OpenVINO, LiteRT, a SavedModel signature), and must
reproduce the Keras model to 1e-4 of its output scale.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import onnx
import onnxruntime
import openvino
import pytest
import tensorflow as tf  # noqa: F401  (export needs TensorFlow)

import keras_sfp
from conftest import prune_once, randomize_batch_norm, tiny_resnet
from keras_sfp import _tensorflow
from keras_sfp.export import measure
from keras_sfp.export import onnx as onnx_export
from keras_sfp.export import runners as runners_lib

pytestmark = [
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow", reason="export needs TensorFlow"
    ),
]

SHAPE = (12, 12, 3)
TOLERANCE = 1e-4  # relative to the largest absolute Keras output


@pytest.fixture(scope="module")
def models():
    """`{"original": strip_pruning's, "shrunk": shrink's}` of one prune event."""
    keras.utils.set_random_seed(0)
    pruned = prune_once(randomize_batch_norm(tiny_resnet(SHAPE)), rate=0.5)
    return {
        "original": keras_sfp.strip_pruning(pruned),
        "shrunk": keras_sfp.shrink(pruned),
    }


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((8, *SHAPE), dtype=np.float32)


def _relative_diff(outputs, reference):
    return measure.output_difference(outputs, reference)["max_rel_diff"]


@pytest.fixture(scope="module")
def measured(models, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtimes")
    labels = np.arange(len(images)) % 5
    metrics = measure.export_and_measure(
        models,
        root,
        "saved_model,tflite,onnx,openvino",
        (images, labels),
        latency_runs=2,
        batch_sizes=(1, 4),
    )
    return root, metrics


def test_every_artifact_reproduces_its_keras_model(measured, models, images):
    root, metrics = measured
    with open(root / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(metrics))
    for name, model in models.items():
        reference = model.predict(images, verbose=0)
        artifacts = metrics["models"][name]["artifacts"]
        assert list(artifacts) == ["keras", "saved_model", "tflite", "onnx", "openvino"]
        for fmt, artifact in artifacts.items():
            assert artifact["max_rel_diff"] <= TOLERANCE, (name, fmt, artifact)
            scale = np.abs(reference).max()
            assert artifact["max_abs_diff"] <= TOLERANCE * scale
            assert artifact["max_rel_diff"] == pytest.approx(
                artifact["max_abs_diff"] / scale, rel=1e-5
            )
            assert set(artifact["latency_ms"]) == {"1", "4"}
        assert artifacts["keras"]["max_abs_diff"] == 0
        # The runners, reloaded here, give the same outputs again.
        onnx_out = runners_lib.onnx_runner(artifacts["onnx"]["path"])(images)
        assert _relative_diff(onnx_out, reference) <= TOLERANCE
        ov_out = runners_lib.openvino_runner(artifacts["openvino"]["path"])(images[:3])
        assert _relative_diff(ov_out, reference[:3]) <= TOLERANCE
    shrunk = metrics["models"]["shrunk"]["artifacts"]
    original = metrics["models"]["original"]["artifacts"]
    for fmt in ("onnx", "openvino"):
        assert shrunk[fmt]["size_bytes"] < original[fmt]["size_bytes"]
        assert "speedup" in shrunk[fmt]
    assert shrunk["openvino"]["size_bytes"] == os.path.getsize(
        root / "shrunk" / "model.xml"
    ) + os.path.getsize(root / "shrunk" / "model.bin")
    assert metrics["tflite_interpreter"] == "LiteRT"


def test_table_shows_the_difference_beside_accuracy(measured):
    _, metrics = measured
    lines = metrics["table"].splitlines()
    assert lines[0].split() == [
        "artifact",
        "model",
        "size",
        "KB",
        "accuracy",
        "rel",
        "diff",
        "ms@1",
        "ms@4",
    ]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[2:]}
    assert len(rows) == 2 * 5
    for (fmt, name), cells in rows.items():
        diff = metrics["models"][name]["artifacts"][fmt]["max_rel_diff"]
        assert cells[4] == ("0" if diff == 0 else f"{diff:.1e}")


def test_onnx_file_has_the_names_a_free_batch_and_folded_batch_norm(
    models, images, tmp_path
):
    model = models["shrunk"]
    path = onnx_export.export_onnx(model, tmp_path / "m.onnx")
    assert path == str(tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == ("images", ["batch", *SHAPE])
    assert (out.name, out.shape) == ("logits", ["batch", 5])
    reference = model.predict(images, verbose=0)
    for batch in (1, 5):
        got = session.run(None, {"images": images[:batch]})[0]
        assert _relative_diff(got, reference[:batch]) <= TOLERANCE
    unfolded = onnx_export.export_onnx(
        model, tmp_path / "unfolded.onnx", fold_batch_norm=False
    )
    # tf2onnx fuses a BatchNormalization's multiply and add into the
    # convolution itself; the names tell which graph was folded before.
    folded_names = [node.name for node in onnx.load(path).graph.node]
    unfolded_names = [node.name for node in onnx.load(unfolded).graph.node]
    assert not any("batchnorm" in name for name in folded_names)
    assert any("batchnorm" in name for name in unfolded_names)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "unfolded.onnx"]


def test_openvino_ir_has_the_names_and_a_free_batch(models, images, tmp_path):
    model = models["shrunk"]
    old = os.umask(0o027)
    try:
        path = onnx_export.export_openvino(model, str(tmp_path / "ir" / "m.xml"))
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path / "ir")) == ["m.bin", "m.xml"]
    for name in ("m.bin", "m.xml"):
        assert os.stat(tmp_path / "ir" / name).st_mode & 0o777 == 0o640
    core = openvino.Core()
    ir = core.read_model(path)
    assert ir.inputs[0].get_names() == {"images"}
    assert ir.outputs[0].get_names() == {"logits"}
    assert ir.inputs[0].get_partial_shape().to_string() == "[?,12,12,3]"
    compiled = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    reference = model.predict(images, verbose=0)
    got = compiled({"images": images})["logits"]
    assert _relative_diff(got, reference) <= TOLERANCE


def test_exporters_replace_only_when_told(models, tmp_path):
    model = models["shrunk"]
    onnx_export.export_onnx(model, tmp_path / "m.onnx")
    onnx_export.export_openvino(model, tmp_path / "m.xml")
    with pytest.raises(ValueError, match="overwrite=True"):
        onnx_export.export_onnx(model, tmp_path / "m.onnx")
    os.remove(tmp_path / "m.xml")  # the .bin alone blocks too
    with pytest.raises(ValueError, match=r"m\.bin.*overwrite=True"):
        onnx_export.export_openvino(model, tmp_path / "m.xml")
    onnx_export.export_openvino(model, tmp_path / "m.xml", overwrite=True)
    onnx_export.export_onnx(model, tmp_path / "m.onnx", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.onnx", "m.xml"]


@pytest.mark.parametrize(
    "function, kwargs, match",
    [
        ("export_openvino", {"path": "m.onnx"}, r"\.xml.*Received: path='m\.onnx'"),
        ("export_onnx", {"input_name": "1x"}, "Received: input_name='1x'"),
        ("export_onnx", {"output_name": "images"}, "must differ"),
        ("export_onnx", {"fold_batch_norm": "yes"}, "Received: fold_batch_norm='yes'"),
        ("export_onnx", {"opset": 0}, "Received: opset=0"),
        ("export_openvino", {"overwrite": 1}, "Received: overwrite=1"),
        ("export_onnx", {"input_shape": (12, 12)}, "Received: input_shape="),
    ],
)
def test_exporters_reject_bad_arguments(models, tmp_path, function, kwargs, match):
    suffix = ".xml" if function == "export_openvino" else ".onnx"
    arguments = {"model": models["shrunk"], "path": "m" + suffix} | kwargs
    arguments["path"] = str(tmp_path / arguments["path"])
    match = match.replace("path='m", f"path='{tmp_path}/m")
    with pytest.raises(ValueError, match=match):
        getattr(onnx_export, function)(**arguments)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "module, call",
    [
        ("tf2onnx", lambda m, p: onnx_export.export_onnx(m, p / "m.onnx")),
        ("onnx", lambda m, p: onnx_export.export_onnx(m, p / "m.onnx")),
        ("openvino", lambda m, p: onnx_export.export_openvino(m, str(p / "m.xml"))),
        ("onnxruntime", lambda m, p: runners_lib.onnx_runner(str(p / "m.onnx"))),
        ("openvino", lambda m, p: runners_lib.openvino_runner(str(p / "m.xml"))),
    ],
)
def test_a_missing_package_is_named(models, tmp_path, monkeypatch, module, call):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ImportError, match=f"pip install {module} "):
        call(models["shrunk"], tmp_path)
    assert os.listdir(tmp_path) == []


def test_native_noise_is_dropped_and_the_rest_kept(capfd):
    with _tensorflow.quiet_native_logs():
        with _tensorflow.quiet_native_logs():  # nested blocks redirect once
            os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: 0\n")
        os.write(2, b"E0000 00:00:1.2  77 cuda_platform.cc:52] failed call to cuInit\n")
        os.write(2, b"W0000 00:00:1.2  77 a.cc:1] a real warning\n")
        os.write(2, b"an error of the user's\n")
    assert capfd.readouterr().err == (
        "W0000 00:00:1.2  77 a.cc:1] a real warning\nan error of the user's\n"
    )


def test_tflite_conversion_and_interpreter_print_nothing(
    models, images, tmp_path, capfd
):
    path = keras_sfp.export_tflite(
        models["shrunk"],
        tmp_path / "m.tflite",
        quantization="int8",
        representative_data=images,
    )
    runners_lib.tflite_runner(path)(images)
    err = capfd.readouterr().err
    for noise in ("fully_quantize", "XNNPACK", "Estimated count"):
        assert noise not in err


def test_command_line_exports_onnx_and_openvino(tmp_path):
    keras.utils.set_random_seed(0)
    pruned = prune_once(randomize_batch_norm(tiny_resnet((28, 28, 1))), rate=0.5)
    pruned.save(tmp_path / "pruned.keras")  # wrappers are stripped on export
    keras_sfp.shrink(pruned).save(tmp_path / "shrunk.keras")
    out = tmp_path / "export"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_sfp.cli.export",
            f"--model=original={tmp_path / 'pruned.keras'}",
            f"--model={tmp_path / 'shrunk.keras'}",
            f"--output_dir={out}",
            "--formats=onnx,openvino",
            "--test_limit=32",
            "--latency_runs=1",
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["formats"] == ["onnx", "openvino"]
    for name in ("original", "shrunk"):
        artifacts = metrics["models"][name]["artifacts"]
        assert list(artifacts) == ["keras", "onnx", "openvino"]
        for artifact in artifacts.values():
            assert artifact["max_rel_diff"] <= TOLERANCE
        assert sorted(os.listdir(out / name)) == [
            "model.bin",
            "model.keras",
            "model.onnx",
            "model.xml",
        ]
    assert "rel diff" in result.stdout
    assert "openvino  shrunk" in result.stdout
