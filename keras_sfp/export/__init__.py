"""Deployment artifacts (needs TensorFlow).

- `saved_model`: `export_saved_model`, TF Serving's layout.
- `tflite`: `export_tflite`, with optional quantization.
- `onnx`: `export_onnx` and `export_openvino`, through Keras's `model.export`
  (needs `onnx` and `tf2onnx`, or `openvino`: `keras-sfp[runtimes]`).
- `measure`: export artifacts and measure their size, fidelity, accuracy and
  latency.
"""

from keras_sfp.export.onnx import export_onnx, export_openvino
from keras_sfp.export.saved_model import SERVING_SIGNATURE, export_saved_model
from keras_sfp.export.tflite import export_tflite

__all__ = [
    "SERVING_SIGNATURE",
    "export_onnx",
    "export_openvino",
    "export_saved_model",
    "export_tflite",
]
