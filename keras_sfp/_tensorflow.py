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
import os
import re
import sys
import tempfile
import threading


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
        with quiet_native_logs():
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
    import keras  # here: importing this module must not import Keras

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


# Loggers third-party converters reconfigure: tf2onnx's conversion calls
# `logging.basicConfig` (a root handler), sets the absl and TensorFlow
# loggers' levels and TF_CPP_MIN_LOG_LEVEL; OpenVINO's converter sets the
# root logger's level and filters.
_KEPT_LOGGERS = ("", "tensorflow", "absl", "tf2onnx", "openvino")
_KEPT_ENVIRONMENT = ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL")


@contextlib.contextmanager
def keep_logging_state():
    """Restores, after the block, the logging settings a converter changes.

    The levels, handlers, filters and `propagate` of the root, `tensorflow`,
    `absl`, `tf2onnx` and `openvino` loggers, absl's verbosity and
    TF_CPP_MIN_LOG_LEVEL (and TF_CPP_MAX_VLOG_LEVEL) are put back as they
    were: a library call leaves the user's logging as it found it.
    """
    from absl import logging as absl_logging

    loggers = {name: logging.getLogger(name) for name in _KEPT_LOGGERS}
    saved = {
        name: (lg.level, list(lg.handlers), list(lg.filters), lg.propagate)
        for name, lg in loggers.items()
    }
    verbosity = absl_logging.get_verbosity()
    environment = {name: os.environ.get(name) for name in _KEPT_ENVIRONMENT}
    try:
        yield
    finally:
        if absl_logging.get_verbosity() != verbosity:  # sets absl's level too
            absl_logging.set_verbosity(verbosity)
        for name, lg in loggers.items():
            level, handlers, filters, propagate = saved[name]
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.filters[:] = filters
            lg.propagate = propagate
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# What TensorFlow, XLA and TFLite's native code write to file descriptor 2
# that says nothing to the user of a CPU machine: absl's notice that it logs
# before being initialised (TF and XLA each carry a copy), C++ INFO lines
# (`I0000 00:00:... port.cc:153] oneDNN custom operations are on`,
# `cudart_stub.cc:31] Could not find cuda drivers`), the CUDA probe's error
# without a GPU (`cuda_platform.cc:52] failed call to cuInit`), the CPU
# feature notice, and what the TFLite converter and interpreter print
# (`fully_quantize: 0, inference_type: 6, ...`, `Estimated count of
# arithmetic ops`, `INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`).
_NATIVE_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|E\d{4} [\d:.]+ +\d+ \S+:\d+\] failed call to cuInit"
    r"|To enable the following instructions: .*rebuild TensorFlow"
    r"|INFO: (Created TensorFlow Lite|Initialized TensorFlow Lite runtime)"
    r"|fully_quantize: \d+, inference_type: "
    r"|Estimated count of arithmetic ops: "
)
_STDERR_LOCK = threading.RLock()
_depth = 0


def is_native_noise(line: str) -> bool:
    """Whether `quiet_native_logs` drops `line` (see `_NATIVE_NOISE`)."""
    return _NATIVE_NOISE.match(line) is not None


@contextlib.contextmanager
def quiet_native_logs():
    """Drops native libraries' known noise from stderr inside the block.

    TensorFlow's C++ logging (absl), XLA's CUDA probe and the TFLite
    converter and interpreter write straight to file descriptor 2, past
    Python's `logging` and `TF_CPP_MIN_LOG_LEVEL` (absl prints what is
    logged before it is initialised whatever the level). Inside the block
    descriptor 2 goes to a temporary file; at its end the lines are written
    back to stderr except the known noise (`is_native_noise`): warnings,
    errors and anything unrecognised still show, after the block. Nothing
    outside the block is touched (no logging level, no environment
    variable). Blocks nest; while one is open, other threads' stderr is
    held back until it closes too.
    """
    global _depth
    with _STDERR_LOCK:
        if _depth:
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
            return
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError, OSError):
            pass
        try:
            saved = os.dup(2)
        except OSError:  # no descriptor 2 (a detached process): nothing to do
            yield
            return
        try:
            capture = tempfile.TemporaryFile()
        except OSError:  # no writable temporary folder: nothing is filtered
            os.close(saved)
            yield
            return
        _depth = 1
        try:
            with capture:
                os.dup2(capture.fileno(), 2)
                try:
                    yield
                finally:
                    try:
                        sys.stderr.flush()
                    except (AttributeError, ValueError, OSError):
                        pass
                    os.dup2(saved, 2)
                    capture.seek(0)
                    text = capture.read().decode("utf-8", "replace")
                    kept = [
                        line
                        for line in text.splitlines(keepends=True)
                        if not is_native_noise(line)
                    ]
                    if kept:
                        os.write(2, "".join(kept).encode("utf-8", "replace"))
        finally:
            _depth = 0
            os.close(saved)


def import_keras_quietly() -> None:
    """Imports Keras (and TensorFlow, on its backend) without native notices.

    Run first by `import keras_sfp`: the absl notice and the INFO lines
    TensorFlow's C++ code logs while it loads (`oneDNN custom operations
    are on`, `Could not find cuda drivers`) are dropped (`quiet_native_logs`);
    anything else they write still shows. Does nothing if Keras is imported
    already. Sets no logging level or environment variable.
    """
    if "keras" in sys.modules:
        return
    with quiet_native_logs():
        import keras  # noqa: F401


def probe_devices_quietly() -> None:
    """Lists TensorFlow's devices, dropping the CUDA probe's error.

    For an entry point (`keras-sfp-train`, `keras-sfp-export`), before any
    work: on a machine without a GPU the first device query logs
    `failed call to cuInit` from C++, which this drops. Physical devices
    only: visible devices and logical device configurations can still be
    set afterwards. Nothing on other backends.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    with quiet_native_logs():
        import tensorflow as tf

        tf.config.list_physical_devices()
