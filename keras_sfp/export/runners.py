"""Runners: a deployed artifact (or a Keras model) as `images -> outputs`.

Each loads an artifact the way it is deployed (a SavedModel's
`serving_default` signature, LiteRT's interpreter or tf.lite's, an ONNX
Runtime session on the CPU, an OpenVINO model compiled for the CPU) and
returns a function that `keras_sfp.export.measure` checks against the Keras
model and times (`keras_sfp.latency.timing`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import keras
import numpy as np

from keras_sfp._tensorflow import import_tensorflow, quiet_native_logs
from keras_sfp.export import onnx as onnx_lib
from keras_sfp.export.saved_model import SERVING_SIGNATURE
from keras_sfp.latency import timing as latency_lib

tf = import_tensorflow("keras_sfp.export.runners")


def _tflite_interpreter(path: str, num_threads: int):
    try:  # LiteRT (ai-edge-litert), where installed, replaces tf.lite.Interpreter
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*Interpreter is deprecated")
        return Interpreter(model_path=path, num_threads=num_threads)


def tflite_interpreter_name() -> str:
    """`"LiteRT"` where `ai-edge-litert` is installed, else `"tf.lite"`."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError:
        return "tf.lite"
    return "LiteRT"


def tflite_runner(path: str, num_threads: int | None = None) -> Callable:
    """A function `images -> float32 outputs` running a `.tflite` file.

    LiteRT's interpreter (`ai-edge-litert`), or `tf.lite.Interpreter`
    where it is not installed. One interpreter per batch size (resized from
    the file's batch of 1); integer inputs and outputs of full-integer
    models are quantized and dequantized with the tensors' scale and zero
    point.

    Args:
        path: The `.tflite` file.
        num_threads: Interpreter threads; `None` uses all CPU cores. Defaults
            to None.

    Returns:
        The function.
    """
    num_threads = num_threads or os.cpu_count() or 1
    interpreters = {}

    def run(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        interpreter = interpreters.get(len(images))
        if interpreter is None:
            with quiet_native_logs():  # "Created TensorFlow Lite XNNPACK delegate"
                interpreter = _tflite_interpreter(path, num_threads)
                index = interpreter.get_input_details()[0]["index"]
                interpreter.resize_tensor_input(index, images.shape, strict=True)
                interpreter.allocate_tensors()
            interpreters[len(images)] = interpreter
        inp = interpreter.get_input_details()[0]
        out = interpreter.get_output_details()[0]
        if np.issubdtype(inp["dtype"], np.integer):
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            images = np.clip(np.round(images / scale + zero), info.min, info.max)
        interpreter.set_tensor(inp["index"], images.astype(inp["dtype"]))
        interpreter.invoke()
        outputs = interpreter.get_tensor(out["index"])
        if np.issubdtype(out["dtype"], np.integer):
            scale, zero = out["quantization"]
            outputs = (outputs.astype(np.float32) - zero) * scale
        return outputs.astype(np.float32)

    return run


def onnx_runner(path: str, num_threads: int | None = None) -> Callable:
    """A function `images -> float32 outputs` running an ONNX file.

    An `onnxruntime.InferenceSession` on the CPU execution provider, all
    graph optimisations on (ONNX Runtime's default), its log limited to
    errors (a session option, nothing global).

    Args:
        path: The `.onnx` file (one input, one output).
        num_threads: Intra-op threads; `None` uses all CPU cores. Defaults
            to None.

    Returns:
        The function; it keeps the session alive (`run.session`).
    """
    ort = onnx_lib.require_module("onnxruntime", "onnxruntime", "ONNX measurement")
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or os.cpu_count() or 1
    options.log_severity_level = 3
    with quiet_native_logs():
        session = ort.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
    input_name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        return session.run(None, {input_name: images})[0]

    run.session = session
    return run


def openvino_runner(
    path: str, num_threads: int | None = None, precision: str | None = "f32"
) -> Callable:
    """A function `images -> float32 outputs` running OpenVINO IR on the CPU.

    `openvino.Core().compile_model(..., "CPU")`, one compiled model per
    batch size (the IR's batch dimension fixed to it, as the TFLite runner
    resizes its interpreter). OpenVINO computes in bfloat16 by default on
    CPUs with AMX or AVX512-BF16 (relative errors of 1e-3); `precision="f32"`
    (`INFERENCE_PRECISION_HINT`) measures the float32 artifact as it is.

    Args:
        path: The `.xml` file (one input, one output; its `.bin` beside it).
        num_threads: Inference threads; `None` uses all CPU cores. Defaults
            to None.
        precision: `INFERENCE_PRECISION_HINT` (`"f32"`, `"bf16"`, `"f16"`),
            or None for OpenVINO's default on this CPU. Defaults to `"f32"`.

    Returns:
        The function.
    """
    ov = onnx_lib.require_module("openvino", "openvino", "OpenVINO measurement")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": num_threads or os.cpu_count() or 1}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    requests = {}

    def run(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        request = requests.get(images.shape)
        if request is None:
            with quiet_native_logs():
                model = core.read_model(path)
                model.reshape({0: list(images.shape)})
                compiled = core.compile_model(model, "CPU", config)
            request = requests[images.shape] = compiled.create_infer_request()
        request.infer({0: images})
        return np.array(request.get_output_tensor(0).data, np.float32)

    return run


def saved_model_runner(path: str) -> Callable:
    """A function `images -> outputs` calling a SavedModel's `serving_default`.

    Args:
        path: A SavedModel directory with a one-input, one-output
            `serving_default` signature (a version directory of
            `export_saved_model`).

    Returns:
        The function; it keeps the loaded SavedModel alive.
    """
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures[SERVING_SIGNATURE]
    (input_name,) = signature.structured_input_signature[1]
    (output_name,) = signature.structured_outputs

    def run(images: np.ndarray) -> np.ndarray:
        return signature(**{input_name: tf.constant(images)})[output_name].numpy()

    run.loaded = loaded  # owns the variables the signature reads
    return run


def keras_runner(model: keras.Model) -> Callable:
    """A function `images -> NumPy outputs`: the model's compiled inference.

    On TensorFlow one `tf.function` with a free batch dimension, traced
    once for every batch size; elsewhere
    `keras_sfp.latency.timing.compiled_predict`.
    """
    if keras.backend.backend() != "tensorflow":
        return latency_lib.compiled_predict(model)
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype)

    @tf.function(input_signature=[spec])
    def predict(images):
        return model(images, training=False)

    return lambda images: predict(tf.constant(images, spec.dtype)).numpy()
