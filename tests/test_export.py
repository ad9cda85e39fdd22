"""Tests of `keras_sfp.export.saved_model`: every artifact reloaded in a fresh process.

One small CNN, trained briefly on Fashion-MNIST, is exported once per format;
a separate Python process, which has only TensorFlow (no keras_sfp, no
custom objects), loads each artifact the way it is deployed and writes its
outputs, which are compared with the Keras model's.
"""

import json
import os
import subprocess
import sys
import textwrap
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

import keras_sfp
from keras_sfp import export as export_lib
from keras_sfp.export import saved_model
from keras_sfp.training.data import load_fashion_mnist

# tf.lite.Interpreter warns that LiteRT replaces it; it is what TF ships.
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:tensorflow.lite.python.interpreter"
)

L = keras.layers
NUM_TRAIN, NUM_TEST, NUM_CALIBRATION = 4000, 10000, 200


def _cnn(input_shape=(28, 28, 1)):
    inputs = keras.Input(input_shape)
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = L.MaxPooling2D(name="p1")(x)
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="c2")(x)
    x = L.MaxPooling2D(name="p2")(x)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x), name="cnn")


@pytest.fixture(scope="module")
def trained():
    """The CNN, test images, labels and logits, and calibration images."""
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    x_train = (x_train[:NUM_TRAIN, ..., None] / 255.0).astype(np.float32)
    x_test = (x_test[:NUM_TEST, ..., None] / 255.0).astype(np.float32)
    model = _cnn()
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train[:NUM_TRAIN], epochs=2, batch_size=64, verbose=0)
    return types.SimpleNamespace(
        model=model,
        x_test=x_test,
        y_test=y_test[:NUM_TEST],
        logits=model.predict(x_test, verbose=0),
        x_calibration=x_train[-NUM_CALIBRATION:],
    )


# Runs in a fresh interpreter with only TensorFlow, as a server would have.
_RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np
    import tensorflow as tf

    warnings.filterwarnings("ignore")
    artifacts, images_path, out_path = json.loads(sys.argv[1]), *sys.argv[2:]
    images = np.load(images_path)
    outputs = {}
    for name, path in artifacts.items():
        if path.endswith(".tflite"):
            interpreter = tf.lite.Interpreter(model_path=path)
            inp = interpreter.get_input_details()[0]
            out = interpreter.get_output_details()[0]
            interpreter.resize_tensor_input(inp["index"], images.shape)
            interpreter.allocate_tensors()
            x = images
            if inp["dtype"] == np.int8:
                scale, zero = inp["quantization"]
                x = np.clip(np.round(images / scale + zero), -128, 127)
            interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
            interpreter.invoke()
            y = interpreter.get_tensor(out["index"]).astype(np.float32)
            if out["dtype"] == np.int8:
                scale, zero = out["quantization"]
                y = (y - zero) * scale
            outputs[name] = y
            outputs[name + "/signature"] = np.array(
                json.dumps(interpreter.get_signature_list()["serving_default"])
            )
        else:
            signature = tf.saved_model.load(path).signatures["serving_default"]
            outputs[name] = signature(images=tf.constant(images))["logits"].numpy()
    np.savez(out_path, **outputs)
    assert not any(m.startswith("keras_sfp") for m in sys.modules)
    """
)

_TFLITE = {
    "tflite": {},
    "tflite_float16": {"quantization": "float16"},
    "tflite_dynamic": {"quantization": "dynamic"},
    "tflite_int8": {"quantization": "int8"},
    "tflite_int8_io": {"quantization": "int8", "integer_io": True},
}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """Paths of every artifact and their outputs computed in a fresh process."""
    model, x_test = trained.model, trained.x_test
    root = tmp_path_factory.mktemp("export")
    paths = {
        "saved_model": export_lib.export_saved_model(
            model, root / "serving", warmup_inputs=[x_test[:1], x_test[:8]]
        )
    }
    for name, options in _TFLITE.items():
        if options.get("quantization") == "int8":
            options = options | {"representative_data": trained.x_calibration}
        paths[name] = export_lib.export_tflite(
            model, root / f"{name}.tflite", **options
        )
    np.save(root / "images.npy", x_test)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _RELOAD_SCRIPT,
            json.dumps(paths),
            str(root / "images.npy"),
            str(root / "outputs.npz"),
        ],
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(root / "outputs.npz") as outputs:
        return paths, dict(outputs)


def _accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, -1) == labels))


def test_public_names_are_exported():
    assert keras_sfp.export_saved_model is export_lib.export_saved_model
    assert keras_sfp.export_tflite is export_lib.export_tflite
    assert {"export_saved_model", "export_tflite"} <= set(keras_sfp.__all__)


def test_export_writes_tf_serving_layout(exported):
    paths, _ = exported
    version_dir = paths["saved_model"]
    assert os.path.basename(version_dir) == "1"
    assert sorted(os.listdir(os.path.dirname(version_dir))) == ["1"]
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    assert os.path.isdir(os.path.join(version_dir, "variables"))


@pytest.mark.parametrize(
    "artifact, tolerance",
    [("saved_model", 1e-4), ("tflite", 1e-4), ("tflite_float16", 1e-2)],
)
def test_float_artifact_matches_keras_in_fresh_process(
    trained, exported, artifact, tolerance
):
    expected = trained.logits
    got = exported[1][artifact]
    assert got.shape == expected.shape == (NUM_TEST, 10)
    # Relative to the logits' scale: elementwise relative error is
    # meaningless for logits near zero.
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize(
    "artifact", ["tflite_dynamic", "tflite_int8", "tflite_int8_io"]
)
def test_quantized_accuracy_within_one_point_of_float(trained, exported, artifact):
    float_accuracy = _accuracy(trained.logits, trained.y_test)
    assert float_accuracy > 0.7  # a model that learned something
    assert _accuracy(exported[1][artifact], trained.y_test) >= float_accuracy - 0.01


@pytest.mark.parametrize("artifact", list(_TFLITE))
def test_tflite_signature_has_meaningful_names(exported, artifact):
    signature = json.loads(str(exported[1][artifact + "/signature"]))
    assert signature == {"inputs": ["images"], "outputs": ["logits"]}


def test_int8_io_has_integer_tensors(exported):
    interpreter = tf.lite.Interpreter(model_path=exported[0]["tflite_int8_io"])
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == out["dtype"] == np.int8
    assert inp["quantization"][0] == pytest.approx(1 / 255, rel=0.01)
    assert list(inp["shape_signature"]) == [-1, 28, 28, 1]


def test_quantization_shrinks_the_file(exported):
    paths, _ = exported
    size = {name: os.path.getsize(paths[name]) for name in _TFLITE}
    assert size["tflite_float16"] < 0.6 * size["tflite"]
    assert size["tflite_int8"] < 0.4 * size["tflite"]
    assert size["tflite_dynamic"] < 0.4 * size["tflite"]


def test_warmup_records_match_the_signature(trained, exported):
    x_test = trained.x_test
    version_dir = exported[0]["saved_model"]
    path = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    records = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(path)
    ]
    signature = tf.saved_model.load(version_dir).signatures["serving_default"]
    ((name, spec),) = signature.structured_input_signature[1].items()
    assert (name, spec.dtype) == ("images", tf.float32)
    assert [log.WhichOneof("log_type") for log in records] == ["predict_log"] * 2
    for log, n in zip(records, (1, 8)):
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        assert list(request.inputs) == [name]
        tensor = request.inputs[name]
        assert tensor.dtype == spec.dtype.as_datatype_enum
        assert [d.size for d in tensor.tensor_shape.dim] == [n, 28, 28, 1]
        assert spec.shape.is_compatible_with([n, 28, 28, 1])
        np.testing.assert_array_equal(tf.make_ndarray(tensor), x_test[:n])


def test_saved_model_cli_lists_the_signature(exported):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run(
        [cli, "show", "--dir", exported[0]["saved_model"], "--all"],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    text = result.stdout
    block = text[text.index("signature_def['serving_default']") :]
    assert "inputs['images'] tensor_info:" in block
    assert "outputs['logits'] tensor_info:" in block
    assert block.count("dtype: DT_FLOAT") >= 2
    assert "shape: (-1, 28, 28, 1)" in block
    assert "shape: (-1, 10)" in block
    assert "Method name is: tensorflow/serving/predict" in block


def test_second_export_adds_version_2_next_to_1(trained, tmp_path):
    model = trained.model
    first = export_lib.export_saved_model(model, tmp_path)
    second = export_lib.export_saved_model(model, tmp_path)
    assert (first, second) == (str(tmp_path / "1"), str(tmp_path / "2"))
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    assert export_lib.export_saved_model(model, tmp_path, version=7).endswith("7")
    assert export_lib.export_saved_model(model, tmp_path).endswith("8")


def test_existing_version_is_refused_and_kept(trained, tmp_path):
    model = trained.model
    version_dir = export_lib.export_saved_model(model, tmp_path, version=3)
    before = sorted(os.listdir(version_dir))
    with pytest.raises(ValueError, match="version` 3 already exists"):
        export_lib.export_saved_model(model, tmp_path, version=3)
    assert sorted(os.listdir(tmp_path)) == ["3"]
    assert sorted(os.listdir(version_dir)) == before


def _tf_serving_rest(signature, body: str) -> dict:
    """Decodes a REST predict body as TF Serving does, runs it, encodes the reply.

    TF Serving's `json_tensor.cc`: exactly one of `instances` (row format: a
    list with one entry per example, a bare value when the signature has one
    input, else an object of named inputs) and `inputs` (columnar: a value,
    or an object of named inputs); values take the signature's dtypes. Row
    requests get `{"predictions": [...]}` (one entry per example, a bare
    value for a single output), columnar ones `{"outputs": ...}`.
    """
    request = json.loads(body)
    if ("instances" in request) == ("inputs" in request):
        raise ValueError("Missing 'inputs' or 'instances' key")
    specs = signature.structured_input_signature[1]
    if "instances" in request:
        instances = request["instances"]
        if all(isinstance(i, dict) for i in instances):
            inputs = {k: [i[k] for i in instances] for k in instances[0]}
        elif len(specs) == 1:
            inputs = {next(iter(specs)): instances}
        else:
            raise ValueError("instances must be objects for several inputs")
    else:
        columns = request["inputs"]
        inputs = columns if isinstance(columns, dict) else {next(iter(specs)): columns}
    if set(inputs) != set(specs):
        raise ValueError(f"inputs {sorted(inputs)} do not match {sorted(specs)}")
    tensors = {k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()}
    outputs = {k: v.numpy().tolist() for k, v in signature(**tensors).items()}
    if "instances" in request:
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values()))}
        return {"predictions": [dict(zip(outputs, row)) for row in zip(*outputs)]}
    return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}


@pytest.mark.parametrize(
    "make_body, reply_key",
    [
        (lambda x: {"instances": x.tolist()}, "predictions"),
        (lambda x: {"instances": [{"images": i.tolist()} for i in x]}, "predictions"),
        (
            lambda x: {"signature_name": "serving_default", "inputs": x.tolist()},
            "outputs",
        ),
        (lambda x: {"inputs": {"images": x.tolist()}}, "outputs"),
    ],
    ids=["row", "row_named", "columnar", "columnar_named"],
)
def test_rest_request_body_runs_through_the_signature(
    trained, exported, make_body, reply_key
):
    signature = tf.saved_model.load(exported[0]["saved_model"]).signatures[
        "serving_default"
    ]
    body = json.dumps(make_body(trained.x_test[:3]))
    reply = json.loads(json.dumps(_tf_serving_rest(signature, body)))
    np.testing.assert_allclose(
        np.array(reply[reply_key]), trained.logits[:3], atol=1e-4
    )


def test_rest_request_of_the_wrong_shape_is_rejected(exported):
    signature = tf.saved_model.load(exported[0]["saved_model"]).signatures[
        "serving_default"
    ]
    # Without the signature's shape check, the wrong rank aborts the process.
    for shape in ((2, 28, 28), (2, 28, 28, 3), (1, 14, 14, 1)):
        body = json.dumps({"instances": np.zeros(shape).tolist()})
        with pytest.raises(tf.errors.InvalidArgumentError, match="not compatible"):
            _tf_serving_rest(signature, body)
    for body in ({"images": [[0.0]]}, {"instances": [], "inputs": []}):
        with pytest.raises(ValueError, match="Missing 'inputs' or 'instances'"):
            _tf_serving_rest(signature, json.dumps(body))


def test_failed_saved_model_export_leaves_no_version_directory(
    trained, tmp_path, monkeypatch
):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(saved_model, "_write_warmup", fail)
    with pytest.raises(OSError, match="disk full"):
        export_lib.export_saved_model(
            trained.model, tmp_path, warmup_inputs=trained.x_test[:1]
        )
    assert os.listdir(tmp_path) == []


def test_failed_tflite_export_leaves_no_file(tmp_path):
    # MatrixDeterminant has no TFLite builtin kernel: the conversion fails
    # after the intermediate SavedModel has been written.
    inputs = keras.Input((3, 3))
    model = keras.Model(inputs, L.Lambda(lambda m: tf.linalg.det(m)[:, None])(inputs))
    with pytest.raises(Exception, match="MatrixDeterminant"):  # ConverterError
        export_lib.export_tflite(model, tmp_path / "model.tflite")
    assert os.listdir(tmp_path) == []


def test_tflite_fixes_free_dimensions_with_input_shape(tmp_path):
    inputs = keras.Input((None, None, 1))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    with pytest.raises(
        ValueError, match=r"pass `input_shape`.*\(None, None, None, 1\)"
    ):
        export_lib.export_tflite(model, tmp_path / "m.tflite")
    path = export_lib.export_tflite(model, tmp_path / "m.tflite", input_shape=(9, 9, 1))
    interpreter = tf.lite.Interpreter(model_path=path)
    interpreter.allocate_tensors()
    x = np.random.default_rng(0).random((1, 9, 9, 1), dtype=np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def _two_outputs():
    inputs = keras.Input((4,))
    return keras.Model(inputs, [L.Dense(2)(inputs), L.Dense(3)(inputs)])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"quantization": "int4"}, ValueError, "quantization=.int4."),
        ({"quantization": "int8"}, ValueError, "representative_data=None"),
        (
            {"representative_data": np.zeros((2, 28, 28, 1))},
            ValueError,
            "quantization='int8' only",
        ),
        ({"integer_io": True}, ValueError, "integer_io=True"),
        (
            {"quantization": "int8", "representative_data": np.zeros((2, 5, 5, 1))},
            ValueError,
            r"Received: shape \(2, 5, 5, 1\)",
        ),
        (
            {"quantization": "int8", "representative_data": 3},
            TypeError,
            "representative_data=3",
        ),
        ({"input_shape": (28, 28)}, ValueError, r"input_shape=\(28, 28\)"),
        ({"input_name": "my images"}, ValueError, "input_name='my images'"),
        ({"model": "cnn"}, TypeError, "model='cnn'"),
        ({"model": _two_outputs}, ValueError, "1 inputs and 2 outputs"),
    ],
)
def test_export_tflite_rejects_bad_arguments(trained, tmp_path, kwargs, error, match):
    kwargs = dict(kwargs)
    model = kwargs.pop("model", trained.model)
    model = model() if callable(model) and not isinstance(model, keras.Model) else model
    with pytest.raises(error, match=match):
        export_lib.export_tflite(model, tmp_path / "m.tflite", **kwargs)
    assert os.listdir(tmp_path) == []


def test_export_tflite_refuses_to_overwrite_unless_asked(trained, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="overwrite=True"):
        export_lib.export_tflite(trained.model, path)
    assert path.read_bytes() == b"old"
    export_lib.export_tflite(trained.model, path, overwrite=True)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"version": 0}, "version=0"),
        ({"version": "2"}, "version='2'"),
        ({"version": True}, "version=True"),
        ({"warmup_inputs": np.zeros((2, 28, 28))}, r"shape \(2, 28, 28\)"),
        ({"warmup_inputs": np.zeros((0, 28, 28, 1))}, r"shape \(0, 28, 28, 1\)"),
        ({"warmup_inputs": []}, "Received: 0 batches"),
        ({"output_name": ""}, "output_name=''"),
        ({"fold_batch_norm": "yes"}, "fold_batch_norm='yes'"),
    ],
)
def test_export_saved_model_rejects_bad_arguments(trained, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_lib.export_saved_model(trained.model, tmp_path / "serving", **kwargs)
    assert not (tmp_path / "serving").exists()


def test_export_saved_model_rejects_unbuilt_model(tmp_path):
    model = keras.Sequential([L.Dense(2)])
    with pytest.raises(ValueError, match="must be built with known inputs"):
        export_lib.export_saved_model(model, tmp_path)


def test_quiet_info_logs_drops_info_records_inside_the_block_only(caplog):
    import logging

    from absl import logging as absl_logging

    from keras_sfp._tensorflow import quiet_info_logs

    caplog.set_level(logging.INFO)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # TensorFlow sets WARNING
    tf_logger = logging.getLogger("tensorflow")
    try:
        with quiet_info_logs():
            tf_logger.info("tf info inside")
            absl_logging.info("absl info inside")
            tf_logger.warning("tf warning inside")
        tf_logger.info("tf info after")
        absl_logging.info("absl info after")
    finally:
        absl_logging.set_verbosity(verbosity)
    messages = [r.getMessage() for r in caplog.records]
    assert "tf info inside" not in messages and "absl info inside" not in messages
    assert "tf warning inside" in messages and "tf info after" in messages
    assert "absl info after" in messages


def test_saved_model_folds_batch_norm_by_default_with_the_same_outputs(tmp_path):
    from conftest import tiny_resnet

    model = tiny_resnet((8, 8, 3), widths=(8, 16))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.3, n))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n))
    x = rng.random((4, 8, 8, 3), dtype=np.float32)
    expected = model.predict(x, verbose=0)
    has_rsqrt = {}
    for fold in (True, False):
        path = export_lib.export_saved_model(
            model, tmp_path / f"fold_{fold}", fold_batch_norm=fold
        )
        signature = tf.saved_model.load(path).signatures["serving_default"]
        got = signature(images=tf.constant(x))["logits"]
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)
        graph = signature.graph.as_graph_def()
        nodes = list(graph.node) + [
            node for function in graph.library.function for node in function.node_def
        ]
        has_rsqrt[fold] = any(node.op == "Rsqrt" for node in nodes)
    # Folded: no BatchNormalization arithmetic (its 1/sqrt(var + eps)) left.
    assert has_rsqrt == {True: False, False: True}
