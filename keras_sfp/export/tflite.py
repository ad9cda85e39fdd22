"""TFLite flatbuffers: float32, float16, dynamic-range or full-integer int8.

`export_tflite` writes the SavedModel that `keras_sfp.export.saved_model`
writes (same signature, same input and output names) to a temporary folder
and converts it with `tf.lite.TFLiteConverter`; full-integer int8 is
calibrated on representative data, and refused (`ValueError`, nothing
written) when that data yields no batch, where the converter would silently
write a float32 model. The flatbuffer is written to a temporary name, given
the permissions of newly created files (the umask's) and renamed into place
when complete; staging folders of killed exports in the same directory are
removed first (`keras_sfp.export._staging.remove_stale_staging`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np

from keras_sfp._tensorflow import (
    import_tensorflow,
    quiet_info_logs,
    quiet_native_logs,
)
from keras_sfp.export._staging import (
    apply_umask,
    staging_dir,
)
from keras_sfp.export.saved_model import (
    SERVING_SIGNATURE,
    check_name,
    serving_spec,
    write_saved_model,
)

tf = import_tensorflow("TFLite export (keras_sfp.export.tflite)")

QUANTIZATIONS = (None, "float16", "dynamic", "int8")


def _describe(representative_data: Any) -> str:
    text = repr(representative_data)
    return text if len(text) <= 120 else text[:117] + "..."


class _Calibration:
    """The converter's `representative_dataset`: float batches, counted.

    TFLite's converter writes a float32 model, without a word, when the
    representative dataset yields nothing; counting the batches it draws
    lets `export_tflite` refuse that instead.
    """

    def __init__(self, source: Any, batches_of: Callable[[Any], Iterable[Any]]):
        self.source = source
        self.batches_of = batches_of
        self.calls = 0
        self.batches = 0
        self.failed = False  # whether the source itself raised

    def __call__(self) -> Iterable[list[np.ndarray]]:
        self.calls += 1
        try:
            for batch in self.batches_of(self.source):
                self.batches += 1
                yield [np.asarray(batch, np.float32)]
        except Exception:
            self.failed = True
            raise

    def empty_error(self) -> ValueError:
        return ValueError(
            "`representative_data` yielded no input batch, so int8 calibration "
            "had nothing to measure (TFLite would write a float32 model). Pass "
            "an array of examples or an iterable (or a callable returning one) "
            "that yields at least one batch. Received: "
            f"representative_data={_describe(self.source)}, which yielded 0 "
            "batches"
        )


def _iterate(source: Any) -> Iterable[Any]:
    batches = source() if callable(source) else source
    if not isinstance(batches, Iterable):
        raise TypeError(
            "`representative_data`, a callable, must return an iterable of input "
            f"batches. Received: it returned {_describe(batches)}"
        )
    return batches


def _representative_dataset(
    representative_data: Any, spec: tf.TensorSpec
) -> _Calibration:
    """The converter's `representative_dataset`, refusing what is surely empty."""
    if isinstance(representative_data, (np.ndarray, tf.Tensor)):
        examples = np.asarray(representative_data, np.float32)
        if len(examples) == 0 or not spec.shape.is_compatible_with(examples.shape):
            raise ValueError(
                "`representative_data` must be a non-empty array of input examples "
                f"of shape {tuple(spec.shape)}. Received: shape {examples.shape}"
            )
        return _Calibration(examples, lambda source: (e[None] for e in source))
    if callable(representative_data) or isinstance(representative_data, Iterable):
        try:
            size = None if callable(representative_data) else len(representative_data)
        except TypeError:  # a generator, or a dataset of unknown cardinality
            size = None
        if size == 0:
            raise ValueError(
                "`representative_data` must hold at least one input batch to "
                "calibrate int8 (TFLite would write a float32 model). Received: "
                f"representative_data={_describe(representative_data)}, with 0 "
                "batches"
            )
        return _Calibration(representative_data, _iterate)
    raise TypeError(
        "`representative_data` must be an array of examples, an iterable of input "
        "batches or a callable returning one. "
        f"Received: representative_data={representative_data!r}"
    )


def export_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    quantization: str | None = None,
    representative_data: Any = None,
    integer_io: bool = False,
    input_shape: Sequence[int] | None = None,
    input_name: str = "images",
    output_name: str = "logits",
    overwrite: bool = False,
) -> str:
    """Converts `model` to a TFLite flatbuffer, optionally quantized.

    The flatbuffer has a `serving_default` signature with the same names as
    `export_saved_model`'s and a free batch dimension (resize the
    interpreter's input for batches other than 1). Quantization modes (see
    the TensorFlow Lite post-training quantization guide):

    - `None`: float32, computes what the Keras model computes.
    - `"float16"`: weights stored as float16 (half the size), float compute.
    - `"dynamic"`: weights stored as int8, activations quantized on the fly.
    - `"int8"`: weights and activations int8 (Jacob et al., CVPR 2018),
      calibrated on `representative_data`; input and output stay float32
      unless `integer_io` is set.

    Args:
        model: A built Keras model with one input and one output.
        path: The file to write, conventionally ending in `.tflite`.
        quantization: One of `QUANTIZATIONS`. Defaults to None.
        representative_data: For `"int8"` only (and then required): an array
            of input examples (a few hundred suffice) or an iterable of input
            batches (or a callable returning one). Defaults to None.
        integer_io: For `"int8"` only: make the input and output int8
            tensors (read their scale and zero point from the interpreter's
            `quantization` details) for integer-only accelerators. Defaults
            to False.
        input_shape: The input shape without the batch dimension, to fix
            dimensions the model leaves free; `None` uses the model's.
            Defaults to None.
        input_name: The signature's input name. Defaults to `"images"`.
        output_name: The signature's output name. Defaults to `"logits"`.
        overwrite: Whether to replace an existing file at `path`. Defaults
            to False.

    Returns:
        `path`, as a string.

    Raises:
        TypeError: If `model` is not a Keras model or `representative_data`
            is of an unusable kind.
        ValueError: If `quantization` is unknown, `"int8"` lacks
            `representative_data` or it holds or yields no batch (nothing
            is written then), an int8-only option is given for another
            mode, the input has free dimensions besides the batch (TFLite's
            builtin kernels need them static: pass `input_shape`), `path`
            exists and `overwrite` is False, or the model has several inputs
            or outputs.

    Example:
    >>> inputs = keras.Input((28, 28, 1))
    >>> x = keras.layers.Conv2D(4, 3)(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(10)(x))
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "model.tflite")
    >>> calibration = np.random.default_rng(0).random((16, 28, 28, 1))
    >>> path == export_tflite(
    ...     model, path, quantization="int8", representative_data=calibration
    ... )
    True
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"`quantization` must be one of {QUANTIZATIONS}. "
            f"Received: quantization={quantization!r}"
        )
    if quantization == "int8" and representative_data is None:
        raise ValueError(
            "`quantization='int8'` needs `representative_data` to calibrate the "
            "activation ranges. Received: representative_data=None"
        )
    if quantization != "int8" and (representative_data is not None or integer_io):
        raise ValueError(
            "`representative_data` and `integer_io` apply to quantization='int8' "
            f"only. Received: quantization={quantization!r} with "
            f"representative_data of type {type(representative_data).__name__} and "
            f"integer_io={integer_io!r}"
        )
    check_name("input_name", input_name)
    check_name("output_name", output_name)
    spec = serving_spec(model, input_name, input_shape)
    if any(dim is None for dim in spec.shape[1:]):
        raise ValueError(
            "TFLite needs every input dimension but the batch to be static; pass "
            "`input_shape` to fix them. Received: a model with input shape "
            f"{tuple(model.inputs[0].shape)}"
        )
    representative_dataset = None
    if quantization == "int8":
        representative_dataset = _representative_dataset(representative_data, spec)
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise ValueError(
            f"`path` exists; pass overwrite=True to replace it. Received: path={path!r}"
        )
    directory = os.path.dirname(os.path.abspath(path))
    with staging_dir(directory) as staging:
        saved_model_dir = os.path.join(staging, "saved_model")
        write_saved_model(model, saved_model_dir, spec, output_name)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model_dir, signature_keys=[SERVING_SIGNATURE]
        )
        if quantization is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.representative_dataset = representative_dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if integer_io:
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
        try:
            # The converter prints (`fully_quantize: 0, ...`) to descriptor 2.
            with quiet_info_logs(), quiet_native_logs():
                flatbuffer = converter.convert()
        except Exception as error:
            # A conversion that drew no batch fails for want of one, unless
            # the data itself raised (its own error is then the clearer one).
            calibration = representative_dataset
            if (
                calibration
                and calibration.calls
                and not calibration.batches
                and not calibration.failed
            ):
                raise calibration.empty_error() from error
            raise
        if representative_dataset is not None and not representative_dataset.batches:
            raise representative_dataset.empty_error()
        staged = os.path.join(staging, "model.tflite")
        with open(staged, "wb") as f:
            f.write(flatbuffer)
        apply_umask(staged)
        os.replace(staged, path)
    return path
