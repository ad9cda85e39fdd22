"""SavedModel export for TF Serving; the traced function TFLite converts too.

Pruning exists to ship something smaller and faster, so the artifact must
compute what the Keras model computes. Both exporters trace one function,
`{output_name: model(images, training=False)}`, with an explicit input
`tf.TensorSpec` named `input_name`, so the SavedModel's `serving_default`
signature and the TFLite signature have the same meaningful names
(`images` in, `logits` out by default) and the same dynamic batch dimension.

`export_saved_model` writes the directory layout TF Serving polls,
`<export_dir>/<version>/saved_model.pb` with integer versions, optionally with
warmup requests (`assets.extra/tf_serving_warmup_requests`, a TFRecord of
`tensorflow.serving.PredictionLog`) so the server runs each request once
before it reports the model as available. `export_tflite` converts that same
SavedModel with `tf.lite.TFLiteConverter`, in float32, float16,
dynamic-range int8 or full-integer int8 (calibrated on representative data).

Every artifact is written to a temporary name next to its destination and
renamed into place when complete, so a failed export leaves nothing half
written (and TF Serving never loads a partial version). Before the rename the
artifact gets the permissions any file the user creates gets (folders
`0o777 & ~umask`, files `0o666 & ~umask`, not tempfile's owner-only 0o700 and
0o600), so a server running as another user can load it. A staging name
(`.tmp-[<version>-]sfp-<host>-<pid>-<random>`) records which process writes
it: the staging folders of exports that were killed (SIGKILL, power loss) are
removed by the next export into the same directory, once their process is
gone (or, for another host's or an older release's, after a day); a running
export's folder is kept (`keras_sfp.export._staging`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from absl import logging

from keras_sfp import _checks
from keras_sfp._tensorflow import (
    import_tensorflow,
    quiet_info_logs,
    require_tensorflow_backend,
)
from keras_sfp.export._staging import (
    apply_umask,
    remove_stale_staging,
    staging_prefix,
)
from keras_sfp.graph import fold

tf = import_tensorflow("SavedModel and TFLite export (keras_sfp.export.saved_model)")

SERVING_SIGNATURE = "serving_default"
"""The signature TF Serving uses when a request names none."""

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
"""Warmup records' path inside a SavedModel version directory."""

MAX_WARMUP_RECORDS = 1000
"""TF Serving reads at most this many warmup records and fails beyond."""

"""The `quantization` modes of `export_tflite`."""

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def check_name(argument: str, value: Any) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"`{argument}` must be an identifier (a letter, then letters, digits "
            f"or underscores). Received: {argument}={value!r}"
        )


def serving_spec(
    model: Any, input_name: str, input_shape: Sequence[int | None] | None = None
) -> tf.TensorSpec:
    """The signature's input spec: the model's input, batch dimension free."""
    require_tensorflow_backend("SavedModel and TFLite export")
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r} of type "
            f"{type(model).__name__}"
        )
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(
            "`model` must be built with known inputs (a functional or Sequential "
            f"model with an Input). Received: model={model.name!r} without inputs"
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            "`model` must have exactly one input and one output. Received: "
            f"model={model.name!r} with {len(inputs)} inputs and {len(outputs)} "
            "outputs"
        )
    shape = tuple(inputs[0].shape[1:]) if input_shape is None else tuple(input_shape)
    if input_shape is not None and len(shape) != len(inputs[0].shape) - 1:
        raise ValueError(
            f"`input_shape` must have the rank of the model's input without the "
            f"batch dimension, {tuple(inputs[0].shape[1:])}. "
            f"Received: input_shape={input_shape!r}"
        )
    return tf.TensorSpec((None, *shape), tf.as_dtype(inputs[0].dtype), input_name)


def write_saved_model(
    model: keras.Model, directory: str, spec: tf.TensorSpec, output_name: str
) -> None:
    def serve(images):
        # A signature call does not check shapes, and a wrong-rank batch can
        # abort the process inside a oneDNN kernel; EnsureShape makes it a
        # clean InvalidArgumentError (HTTP 400 from TF Serving).
        images = tf.ensure_shape(images, spec.shape)
        return {output_name: model(images, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SERVING_SIGNATURE, serve, input_signature=[spec])
    with quiet_info_logs():
        archive.write_out(directory, verbose=False)


def _next_version(export_dir: str) -> int:
    versions = [int(name) for name in os.listdir(export_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def _warmup_batches(
    warmup_inputs: np.ndarray | Sequence[np.ndarray], spec: tf.TensorSpec
) -> list[np.ndarray]:
    """One array per warmup request, each checked against `spec`."""
    if isinstance(warmup_inputs, (list, tuple)):
        batches = list(warmup_inputs)
    else:
        batches = [warmup_inputs]
    if not 1 <= len(batches) <= MAX_WARMUP_RECORDS:
        raise ValueError(
            f"`warmup_inputs` must hold 1 to {MAX_WARMUP_RECORDS} request batches "
            f"(TF Serving's limit). Received: {len(batches)} batches"
        )
    arrays = []
    for i, batch in enumerate(batches):
        array = np.asarray(batch, dtype=spec.dtype.as_numpy_dtype)
        if array.shape[:1] == (0,) or not spec.shape.is_compatible_with(array.shape):
            raise ValueError(
                f"Each `warmup_inputs` batch must have shape {tuple(spec.shape)} "
                f"(batch of at least 1). Received: batch {i} of shape {array.shape}"
            )
        arrays.append(array)
    return arrays


def _write_warmup(directory: str, batches: list[np.ndarray], input_name: str) -> None:
    # Imported here: only warmup records need the TF Serving protos.
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = os.path.join(directory, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for batch in batches:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(signature_name=SERVING_SIGNATURE)
            )
            request.inputs[input_name].CopyFrom(tf.make_tensor_proto(batch))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def export_saved_model(
    model: keras.Model,
    export_dir: str | os.PathLike,
    version: int | None = None,
    warmup_inputs: np.ndarray | Sequence[np.ndarray] | None = None,
    input_name: str = "images",
    output_name: str = "logits",
    fold_batch_norm: bool = True,
) -> str:
    """Writes `model` as a SavedModel version in the layout TF Serving loads.

    The SavedModel goes to `<export_dir>/<version>/` and has one signature,
    `serving_default`, mapping a float batch named `input_name` (the model's
    input shape with a free batch dimension) to a dict with one entry,
    `output_name`: `model(images, training=False)`. TF Serving serves the
    highest version in `export_dir`, so each export adds a version and never
    replaces one. The version is written to a temporary directory inside
    `export_dir` (its name is not an integer, so TF Serving ignores it),
    given the permissions of newly created files (the umask's) and renamed
    when complete. Staging folders that killed exports left in `export_dir`
    are removed first (`keras_sfp.export._staging.remove_stale_staging`).

    Args:
        model: A built Keras model with one input and one output.
        export_dir: The model's base directory (what TF Serving's
            `--model_base_path` points to); created if missing.
        version: A positive integer; `None` takes the next free one (1 in an
            empty directory). Defaults to None.
        warmup_inputs: Inputs for warmup requests: one array (one request) or
            a list of arrays (one request each), each of the input's shape
            with any batch size. They are stored as `PredictionLog` records in
            `assets.extra/tf_serving_warmup_requests`, which needs the
            `tensorflow-serving-api` package. `None` writes none. Defaults to
            None.
        input_name: The signature's input name. Defaults to `"images"`.
        output_name: The signature's output name. Defaults to `"logits"`.
        fold_batch_norm: Fold every BatchNormalization that follows a linear
            convolution or dense layer into it (`keras_sfp.graph.fold`): the same
            outputs up to float rounding, fewer kernels per request. A model
            with nothing to fold, with pruning wrappers, or of a `Model`
            subclass (whose own `call` a rebuild would lose) is exported as
            it is (logged). Defaults to True.

    Returns:
        The path of the version directory, `<export_dir>/<version>`.

    Raises:
        TypeError: If `model` is not a Keras model.
        ValueError: If `model` does not have exactly one input and output, if
            `version` is not a positive integer or already exists, if a
            warmup batch does not fit the input, or if a name is not an
            identifier.

    Example:
    >>> inputs = keras.Input((28, 28, 1))
    >>> x = keras.layers.Conv2D(4, 3)(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(10)(x))
    >>> export_dir = tempfile.mkdtemp()
    >>> warmup = np.zeros((1, 28, 28, 1))
    >>> path = export_saved_model(model, export_dir, warmup_inputs=warmup)
    >>> sorted(os.listdir(path))
    ['assets', 'assets.extra', 'fingerprint.pb', 'saved_model.pb', 'variables']
    >>> os.path.basename(export_saved_model(model, export_dir))
    '2'
    """
    check_name("input_name", input_name)
    check_name("output_name", output_name)
    if not isinstance(fold_batch_norm, bool):
        raise ValueError(
            "`fold_batch_norm` must be True or False. "
            f"Received: fold_batch_norm={fold_batch_norm!r}"
        )
    spec = serving_spec(model, input_name)
    _checks.optional_int_at_least("version", version, 1)
    batches = None
    if warmup_inputs is not None:
        batches = _warmup_batches(warmup_inputs, spec)
    export_dir = os.fspath(export_dir)
    os.makedirs(export_dir, exist_ok=True)
    remove_stale_staging(export_dir)
    if version is None:
        version = _next_version(export_dir)
    version_dir = os.path.join(export_dir, str(version))
    if os.path.exists(version_dir):
        raise ValueError(
            f"`version` {version} already exists in {export_dir!r}; versions are "
            "never overwritten: pass version=None for the next free one. "
            f"Received: version={version!r}"
        )
    if fold_batch_norm and fold.can_fold(model):
        model = fold.fold_batch_norm(model)
    elif fold_batch_norm:
        logging.info(
            "export_saved_model: nothing to fold in %r (no foldable "
            "BatchNormalization, pruning wrappers, or a Model subclass); "
            "exported as it is.",
            model.name,
        )
    staging = tempfile.mkdtemp(prefix=staging_prefix(version), dir=export_dir)
    try:
        write_saved_model(model, staging, spec, output_name)
        if batches is not None:
            _write_warmup(staging, batches, input_name)
        apply_umask(staging)
        os.rename(staging, version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return version_dir
