"""ONNX and OpenVINO IR through Keras's own `model.export`.

`export_onnx` and `export_openvino` call `model.export(path, format="onnx")`
and `model.export(path, format="openvino")` (Keras traces the model in a
`tf.function`; `tf2onnx` converts it to ONNX, OpenVINO's converter to its
IR) and add what Keras leaves out, with the conventions of
`export_saved_model` and `export_tflite`:

- BatchNormalization folded into the convolution or dense layer before it
  (`fold_batch_norm`, `keras_sfp.graph.fold`);
- one input named `images` with a free batch dimension, one output named
  `logits` (Keras names them after the traced function: `Identity:0`);
- the artifact written under a staging name next to its destination, given
  the permissions of newly created files (the umask's) and renamed into
  place when complete (`keras_sfp.export._staging`);
- arguments checked before anything is written, and a missing package
  (`onnx`, `tf2onnx`, `openvino`) named with the command that installs it
  (`pip install keras-sfp[runtimes]` installs them all).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from types import ModuleType

import keras
from absl import logging

from keras_sfp import _checks
from keras_sfp._tensorflow import (
    import_tensorflow,
    keep_logging_state,
    quiet_info_logs,
    quiet_native_logs,
)
from keras_sfp.export._staging import (
    apply_umask,
    staging_dir,
)
from keras_sfp.export.saved_model import check_name, serving_spec
from keras_sfp.graph import fold

tf = import_tensorflow("ONNX and OpenVINO export (keras_sfp.export.onnx)")

RUNTIMES_EXTRA = "keras-sfp[runtimes]"
"""The extra that installs every package of the ONNX and OpenVINO paths."""


def require_module(module: str, package: str, feature: str) -> ModuleType:
    """Imports `module` for `feature`, or says which pip package provides it.

    Raises:
        ImportError: If `module` cannot be imported; the message names
            `feature`, `package` and the `runtimes` extra.
    """
    try:
        # tf2onnx configures logging when imported (a root handler, levels).
        with keep_logging_state(), quiet_native_logs():
            return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{feature} needs the `{module}` module, which is not installed: "
            f"pip install {package} (or pip install {RUNTIMES_EXTRA} for every "
            f"runtime). Received: ImportError({error})"
        ) from error


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")


def _prepare(
    model: keras.Model,
    path: str | os.PathLike,
    input_shape: Sequence[int] | None,
    input_name: str,
    output_name: str,
    fold_batch_norm: bool,
    overwrite: bool,
    paths_of,
    function: str,
):
    """Checks the arguments; returns (model, spec, path, directory)."""
    check_name("input_name", input_name)
    check_name("output_name", output_name)
    if input_name == output_name:
        raise ValueError(
            "`input_name` and `output_name` must differ. Received: "
            f"input_name={input_name!r}, output_name={output_name!r}"
        )
    _check_bool("fold_batch_norm", fold_batch_norm)
    _check_bool("overwrite", overwrite)
    spec = serving_spec(model, input_name, input_shape)
    if spec.dtype != tf.float32:
        raise ValueError(
            f"{function} writes float32 models; the model's input is "
            f"{spec.dtype.name} (its dtype policy must be 'float32'). "
            f"Received: model={model.name!r}"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`path` must be a str or os.PathLike. Received: path={path!r} of type "
            f"{type(path).__name__}"
        )
    path = os.fspath(path)
    existing = [p for p in paths_of(path) if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(
            f"`path` exists ({', '.join(existing)}); pass overwrite=True to replace "
            f"it. Received: path={path!r}"
        )
    if any(os.path.isdir(p) for p in existing):
        raise ValueError(f"`path` is a directory, not a file. Received: path={path!r}")
    if fold_batch_norm and fold.can_fold(model):
        model = fold.fold_batch_norm(model)
    elif fold_batch_norm:
        logging.info(
            "%s: nothing to fold in %r (no foldable BatchNormalization, pruning "
            "wrappers, or a Model subclass); exported as it is.",
            function,
            model.name,
        )
    directory = os.path.dirname(os.path.abspath(path))
    return model, spec, path, directory


def _keras_export(model: keras.Model, path: str, fmt: str, spec, **kwargs) -> None:
    """`model.export(path, format=fmt)`, its logs and prints kept inside."""
    with (
        keep_logging_state(),
        warnings.catch_warnings(),
        quiet_info_logs(),
        quiet_native_logs(),
    ):
        # Keras patches tf2onnx for NumPy 2 with `np.object`, which NumPy
        # warns about; tf2onnx and OpenVINO's converter log INFO lines and
        # reconfigure logging (undone by keep_logging_state).
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model.export(path, format=fmt, input_signature=[spec], verbose=False, **kwargs)


def _rename_onnx(path: str, input_name: str, output_name: str, onnx) -> None:
    """Names the output `output_name` and the batch dimensions `batch`."""
    proto = onnx.load(path)
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise RuntimeError(
            "tf2onnx wrote a graph with "
            f"{len(graph.input)} inputs and {len(graph.output)} outputs; expected 1 "
            "and 1"
        )
    old = graph.output[0].name
    if old != output_name:
        taken = {o for node in graph.node for o in node.output}
        taken |= {t.name for t in graph.initializer} | {graph.input[0].name}
        if output_name in taken:
            raise ValueError(
                f"`output_name` names another tensor of the ONNX graph. "
                f"Received: output_name={output_name!r}"
            )
        for node in graph.node:
            for field in (node.input, node.output):
                for i, name in enumerate(field):
                    if name == old:
                        field[i] = output_name
        for info in graph.value_info:
            if info.name == old:
                info.name = output_name
        graph.output[0].name = output_name
    for value in (graph.input[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    if graph.input[0].name != input_name:  # Keras names it after the spec
        raise RuntimeError(
            f"The ONNX graph's input is {graph.input[0].name!r}, not {input_name!r}"
        )
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def export_onnx(
    model: keras.Model,
    path: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
    input_name: str = "images",
    output_name: str = "logits",
    fold_batch_norm: bool = True,
    opset: int | None = None,
    overwrite: bool = False,
) -> str:
    """Writes `model` as an ONNX file with Keras's `model.export(format="onnx")`.

    The graph has one float32 input named `input_name` (the model's input
    shape, batch dimension `batch`, free) and one output named
    `output_name`: `model(images, training=False)`, with every foldable
    BatchNormalization folded first. It runs in ONNX Runtime
    (`onnxruntime.InferenceSession(path)`) and, through ONNX, TensorRT and
    OpenVINO. Needs `onnx` and `tf2onnx` (`pip install keras-sfp[runtimes]`)
    and the TensorFlow backend.

    Args:
        model: A built Keras model with one input and one output.
        path: The file to write, conventionally ending in `.onnx`.
        input_shape: The input shape without the batch dimension, to fix
            dimensions the model leaves free; `None` uses the model's.
            Defaults to None.
        input_name: The graph's input name. Defaults to `"images"`.
        output_name: The graph's output name. Defaults to `"logits"`.
        fold_batch_norm: Fold BatchNormalization into the layer before it,
            as `export_saved_model` does. Defaults to True.
        opset: The ONNX opset; `None` uses tf2onnx's default. Defaults to
            None.
        overwrite: Whether to replace an existing file at `path`. Defaults
            to False.

    Returns:
        `path`, as a string.

    Raises:
        ImportError: If `onnx` or `tf2onnx` is missing (the message names
            the pip package).
        TypeError: If `model` is not a Keras model or `path` not a path.
        ValueError: If a name is not an identifier (or both are the same),
            `opset` is not a positive integer, a flag is not a bool, `path`
            exists and `overwrite` is False, or the model has several inputs
            or outputs or a non-float32 input.

    Example:
    >>> inputs = keras.Input((28, 28, 1))
    >>> x = keras.layers.Conv2D(4, 3)(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(10)(x))
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    >>> path == export_onnx(model, path)
    True
    """
    opset = _checks.optional_int_at_least("opset", opset, 1)
    onnx = require_module("onnx", "onnx", "ONNX export")
    require_module("tf2onnx", "tf2onnx", "ONNX export")
    model, spec, path, directory = _prepare(
        model,
        path,
        input_shape,
        input_name,
        output_name,
        fold_batch_norm,
        overwrite,
        lambda p: [p],
        "export_onnx",
    )
    with staging_dir(directory) as staging:
        staged = os.path.join(staging, "model.onnx")
        _keras_export(model, staged, "onnx", spec, opset_version=opset)
        _rename_onnx(staged, input_name, output_name, onnx)
        apply_umask(staged)
        os.replace(staged, path)
    return path


def openvino_weights_path(path: str | os.PathLike) -> str:
    """The `.bin` file of an OpenVINO IR `.xml` file."""
    return os.path.splitext(os.fspath(path))[0] + ".bin"


def export_openvino(
    model: keras.Model,
    path: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
    input_name: str = "images",
    output_name: str = "logits",
    fold_batch_norm: bool = True,
    overwrite: bool = False,
) -> str:
    """Writes `model` as OpenVINO IR with Keras's `model.export(format="openvino")`.

    Two files: `path` (`.xml`, the graph) and the `.bin` beside it (the
    float32 weights). The model has one float32 input named `input_name`
    (the model's input shape, batch dimension free) and one output named
    `output_name`: `model(images, training=False)`, with every foldable
    BatchNormalization folded first. It runs in OpenVINO
    (`openvino.Core().compile_model(path, "CPU")`). Needs `openvino`
    (`pip install keras-sfp[runtimes]`) and the TensorFlow backend.

    Both files are written to a staging folder and renamed into place, the
    `.bin` first: an existing IR is replaced file by file (a reader that
    opens the `.xml` in between may pair the old graph with the new weights).

    Args:
        model: A built Keras model with one input and one output.
        path: The `.xml` file to write.
        input_shape: The input shape without the batch dimension, to fix
            dimensions the model leaves free; `None` uses the model's.
            Defaults to None.
        input_name: The model's input name. Defaults to `"images"`.
        output_name: The model's output name. Defaults to `"logits"`.
        fold_batch_norm: Fold BatchNormalization into the layer before it,
            as `export_saved_model` does. Defaults to True.
        overwrite: Whether to replace an existing IR at `path`. Defaults to
            False.

    Returns:
        `path`, as a string.

    Raises:
        ImportError: If `openvino` is missing (the message names the pip
            package).
        TypeError: If `model` is not a Keras model or `path` not a path.
        ValueError: If `path` does not end in `.xml`, a name is not an
            identifier (or both are the same), a flag is not a bool, the
            `.xml` or `.bin` exists and `overwrite` is False, or the model
            has several inputs or outputs or a non-float32 input.

    Example:
    >>> inputs = keras.Input((28, 28, 1))
    >>> x = keras.layers.Conv2D(4, 3)(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(10)(x))
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "model.xml")
    >>> path == export_openvino(model, path)
    True
    >>> os.path.exists(openvino_weights_path(path))
    True
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".xml"):
        raise ValueError(
            "`path` must name the IR's .xml file (the weights go to the .bin "
            f"beside it). Received: path={path!r}"
        )
    ov = require_module("openvino", "openvino", "OpenVINO export")
    model, spec, path, directory = _prepare(
        model,
        path,
        input_shape,
        input_name,
        output_name,
        fold_batch_norm,
        overwrite,
        lambda p: [p, openvino_weights_path(p)],
        "export_openvino",
    )
    with staging_dir(directory) as staging:
        keras_xml = os.path.join(staging, "keras.xml")
        _keras_export(model, keras_xml, "openvino", spec)
        with quiet_native_logs():
            ir = ov.Core().read_model(keras_xml)
            if len(ir.inputs) != 1 or len(ir.outputs) != 1:
                raise RuntimeError(
                    f"OpenVINO's converter wrote a model with {len(ir.inputs)} "
                    f"inputs and {len(ir.outputs)} outputs; expected 1 and 1"
                )
            ir.inputs[0].get_tensor().set_names({input_name})
            ir.outputs[0].get_tensor().set_names({output_name})
            staged = os.path.join(staging, "model.xml")
            ov.serialize(ir, staged)  # float32 weights (save_model would halve them)
        weights = openvino_weights_path(staged)
        for staged_path in (staged, weights):
            apply_umask(staged_path)
        os.replace(weights, openvino_weights_path(path))
        os.replace(staged, path)
    return path
