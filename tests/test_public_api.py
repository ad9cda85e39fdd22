import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import keras_sfp

_ROOT = str(Path(__file__).resolve().parents[1])


def test_every_published_name_resolves():
    names = set(keras_sfp.__all__)
    assert {"prune_filters", "SoftFilterPrune", "strip_pruning", "shrink"} <= names
    assert {"count_flops", "describe", "register_layer"} <= names
    assert {"export_saved_model", "export_tflite"} <= names
    assert names <= set(dir(keras_sfp))
    for name in names - {"export_saved_model", "export_tflite"}:
        assert getattr(keras_sfp, name) is not None


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="export needs TensorFlow"
)
def test_export_functions_import_on_first_use():
    from keras_sfp import export

    assert keras_sfp.export_tflite is export.export_tflite
    assert keras_sfp.export_saved_model is export.export_saved_model


def test_unknown_attributes_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        keras_sfp.nothing  # noqa: B018


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="the notices are TF's"
)
@pytest.mark.parametrize(
    "command",
    [
        ["-c", "import keras_sfp"],
        [os.path.join(_ROOT, "train.py"), "--helpshort"],
    ],
    ids=["import", "train_help"],
)
def test_start_up_prints_no_native_notices(command):
    # TensorFlow's C++ start-up lines (absl's notice, oneDNN and CUDA-driver
    # INFO lines, the CUDA probe's cuInit error without a GPU) are dropped;
    # `_tensorflow.is_native_noise` names them.
    done = subprocess.run(
        [sys.executable, *command],
        cwd=_ROOT,
        env=dict(os.environ, KERAS_BACKEND="tensorflow"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    # absl's --helpshort exits with status 1 after printing the flags.
    assert done.returncode == 0 or "--round_to" in done.stdout, done.stderr[-2000:]
    noise = [
        line
        for line in done.stderr.splitlines(keepends=True)
        if keras_sfp._tensorflow.is_native_noise(line)
    ]
    assert not noise, noise
