"""TensorFlow for the few modules that need it, with a clear error without it.

The core of keras-sfp (wrapper, callback, graph, rules, prune, shrink, flops,
describe) runs on any Keras 3 backend. SavedModel and TFLite export,
`keras_sfp.export.measure`, the `tf.data` input pipeline and `tf.distribute`
strategies need TensorFlow; they import it through `import_tensorflow`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import keras


def available() -> bool:
    """True if TensorFlow can be imported (without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def import_tensorflow(feature: str):
    """Imports TensorFlow for `feature`, or says what is missing.

    Args:
        feature: What needs it, for the message ("SavedModel export").

    Returns:
        The `tensorflow` module.

    Raises:
        ImportError: If TensorFlow is not installed; the message names
            `feature` and what works without TensorFlow.
    """
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            f"{feature} needs TensorFlow, which is not installed "
            "(pip install tensorflow, or keras-sfp[tf]). The core of keras-sfp "
            "(prune_filters, SoftFilterPrune, strip_pruning, shrink, "
            "count_flops, describe) works without it, on any Keras backend."
        ) from error
    return tf


def require_tensorflow_backend(feature: str) -> None:
    """Raises unless Keras runs on TensorFlow (`feature` traces a tf.function).

    Raises:
        RuntimeError: On another backend; the message says how to get there
            from a `.keras` file, which loads on every backend.
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{feature} traces the model in a tf.function and needs the "
            f"TensorFlow backend; Keras runs on {backend!r}. Save the model as "
            "`.keras` (it loads on every backend) and export it in a process "
            "started with KERAS_BACKEND=tensorflow, e.g. "
            "`KERAS_BACKEND=tensorflow keras-sfp-export "
            "--model=shrunk.keras --output_dir=export`."
        )


class _DropInfo(logging.Filter):
    """Drops records below WARNING (a handler filter: it sees every logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def quiet_info_logs():
    """Hides INFO logs inside the block; warnings and errors still show.

    Writing a SavedModel or converting to TFLite logs a dozen INFO lines
    (SavedModel builder, signature renames, sharding callbacks), through
    TensorFlow's logger and absl's, whose levels TensorFlow manages itself;
    a filter on every handler of those loggers and the root drops them.
    """
    from absl import logging as absl_logging

    handlers = set(logging.getLogger().handlers)
    handlers.update(logging.getLogger("tensorflow").handlers)
    handlers.update(absl_logging.get_absl_logger().handlers)
    handlers.add(absl_logging.get_absl_handler())
    drop = _DropInfo()
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)
