"""Deployment artifacts (needs TensorFlow).

- `saved_model`: `export_saved_model`, TF Serving's layout.
- `tflite`: `export_tflite`, with optional quantization.
- `measure`: export artifacts and measure their size, accuracy and latency.
"""

from keras_sfp.export.saved_model import SERVING_SIGNATURE, export_saved_model
from keras_sfp.export.tflite import export_tflite

__all__ = ["SERVING_SIGNATURE", "export_saved_model", "export_tflite"]
