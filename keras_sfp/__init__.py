"""keras-sfp: Soft Filter Pruning for Keras 3 that yields genuinely smaller models.

Usage:

    pruned = keras_sfp.prune_filters(model, rate=0.3)
    pruned.compile(...)
    pruned.fit(x, y, epochs=..., callbacks=[keras_sfp.SoftFilterPrune()])
    small = keras_sfp.shrink(pruned)

The core runs on every Keras 3 backend (TensorFlow, JAX, PyTorch).
`export_saved_model`, `export_tflite`, `export_onnx` and `export_openvino`
need TensorFlow: they are imported when first used, so `import keras_sfp`
works without it.
"""

# ruff: noqa: E402 (Keras is imported quietly before the modules that use it)
from keras_sfp import _tensorflow

_tensorflow.import_keras_quietly()  # before the modules below import Keras

from keras_sfp.core import criteria, schedules
from keras_sfp.core.callback import SoftFilterPrune
from keras_sfp.core.engine import FilterPruner
from keras_sfp.core.prune import prune_filters, strip_pruning
from keras_sfp.core.spec import PruningSpec, spec_of
from keras_sfp.core.wrapper import ChannelMask, FilterPruning
from keras_sfp.graph import rules
from keras_sfp.graph.channels import ChannelGraph
from keras_sfp.graph.describe import describe
from keras_sfp.graph.flops import count_flops
from keras_sfp.graph.fold import fold_batch_norm
from keras_sfp.graph.rules import register_layer, unregister_layer
from keras_sfp.graph.shrink import shrink
from keras_sfp.latency.table import LatencyTable
from keras_sfp.recovery.batch_norm import recalibrate_batch_norm
from keras_sfp.recovery.distill import distiller, logits_distillation

__version__ = "0.1.0"

# Public names whose module imports TensorFlow (PEP 562 lazy attributes).
_TENSORFLOW_EXPORTS = {
    "export_onnx": "keras_sfp.export",
    "export_openvino": "keras_sfp.export",
    "export_saved_model": "keras_sfp.export",
    "export_tflite": "keras_sfp.export",
}

__all__ = [
    "ChannelGraph",
    "ChannelMask",
    "FilterPruner",
    "FilterPruning",
    "LatencyTable",
    "PruningSpec",
    "SoftFilterPrune",
    "count_flops",
    "criteria",
    "describe",
    "distiller",
    "export_onnx",
    "export_openvino",
    "export_saved_model",
    "export_tflite",
    "fold_batch_norm",
    "logits_distillation",
    "prune_filters",
    "recalibrate_batch_norm",
    "register_layer",
    "rules",
    "schedules",
    "shrink",
    "spec_of",
    "strip_pruning",
    "unregister_layer",
]


def __getattr__(name: str):
    if name in _TENSORFLOW_EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_TENSORFLOW_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keras_sfp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
