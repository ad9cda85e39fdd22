"""Robustness of `keras_sfp.export`: readable modes, no silent float int8, no leftovers.

Issue 22, items 2, 3 and 7: a SavedModel version (and a TFLite file) gets the
permissions any file the user creates gets (the umask's, not tempfile's
0700/0600), so TF Serving running as another user can load it; an int8
export with no calibration batch is a `ValueError` that writes nothing
(TFLite would otherwise write a float32 model without a word); the staging
folder of a killed export is removed at the next export into the same base
directory, while a running export's is kept.

TensorFlow only, like tests/test_export.py (not in the Makefile's JAX core).
"""

import contextlib
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sfp import export as export_lib
from keras_sfp.export import _staging

pytestmark = [
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow", reason="export needs TensorFlow"
    ),
    # tf.lite.Interpreter warns that LiteRT replaces it; it is what TF ships.
    pytest.mark.filterwarnings(
        "ignore::UserWarning:tensorflow.lite.python.interpreter"
    ),
]

L = keras.layers
NOBODY = 65534  # the conventional uid and gid of `nobody`


def _tiny():
    inputs = keras.Input((6, 6, 1))
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name="tiny")


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root):
    """{relative path: permission bits} of `root` and everything under it."""
    modes = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            modes[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return modes


def _kind(root, relative):
    return "dir" if os.path.isdir(os.path.join(root, relative)) else "file"


# --- Item 2: permissions follow the umask -----------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_saved_model_modes_follow_the_umask(tmp_path, mask):
    with _umask(mask):
        version_dir = export_lib.export_saved_model(
            _tiny(), tmp_path / "serving", warmup_inputs=np.zeros((1, 6, 6, 1))
        )
    modes = _modes(version_dir)
    expected = {"dir": 0o777 & ~mask, "file": 0o666 & ~mask}
    wrong = {
        path: oct(mode)
        for path, mode in modes.items()
        if mode != expected[_kind(version_dir, path)]
    }
    assert wrong == {}, f"expected {oct(expected['dir'])}/{oct(expected['file'])}"
    # Every part of the artifact was checked, the version folder included.
    assert {".", "saved_model.pb", "variables", "assets.extra"} <= set(modes)
    assert any(path.startswith("variables" + os.sep) for path in modes)
    assert modes["."] == 0o777 & ~mask  # 0o755 under 0o022, not mkdtemp's 0o700


def test_tflite_file_mode_follows_the_umask(tmp_path):
    with _umask(0o022):
        path = export_lib.export_tflite(_tiny(), tmp_path / "out" / "m.tflite")
        replaced = export_lib.export_tflite(_tiny(), path, overwrite=True)
    assert stat.S_IMODE(os.stat(replaced).st_mode) == 0o644
    assert os.listdir(tmp_path / "out") == ["m.tflite"]  # no staging left


def _run_as_nobody(args, **kwargs):
    return subprocess.run(
        args,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        cwd="/",
        **kwargs,
    )


@pytest.fixture
def shared_dir():
    """A folder outside pytest's 0o700 tmp root that other users can enter."""
    root = tempfile.mkdtemp(prefix="sfp-shared-")
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="reading as another user needs root to switch to uid nobody",
)
def test_saved_model_is_readable_by_another_user(shared_dir):
    with _umask(0o022):
        version_dir = export_lib.export_saved_model(
            _tiny(), os.path.join(shared_dir, "serving")
        )
    dirs, files = [version_dir], []
    for dirpath, dirnames, filenames in os.walk(version_dir):
        dirs += [os.path.join(dirpath, name) for name in dirnames]
        files += [os.path.join(dirpath, name) for name in sorted(filenames)]
    listed = _run_as_nobody(["ls", "-A", "--", *dirs])
    assert listed.returncode == 0, listed.stderr.decode()
    read = _run_as_nobody(["cat", "--", *files])
    assert read.returncode == 0, read.stderr.decode()
    expected = b"".join(open(path, "rb").read() for path in files)
    assert len(read.stdout) == len(expected) > 0
    assert read.stdout == expected


_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    signature = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    logits = signature(images=tf.zeros((2, 6, 6, 1)))["logits"].numpy()
    np.save(sys.stdout.buffer, logits)
    """
)


def test_saved_model_loads_as_another_user(shared_dir):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("loading as another user needs root to switch to uid nobody")
    probe = [
        sys.executable,
        "-c",
        "import importlib.util, sys; "
        "sys.exit(importlib.util.find_spec('tensorflow') is None)",
    ]
    try:
        usable = _run_as_nobody(probe, timeout=60).returncode == 0
    except OSError:  # the interpreter itself cannot be executed
        usable = False
    if not usable:
        pytest.skip(
            f"user nobody cannot run this interpreter ({sys.executable} or its "
            "TensorFlow lies under a folder only root can enter); "
            "test_saved_model_is_readable_by_another_user reads every file as "
            "nobody instead"
        )
    model = _tiny()
    with _umask(0o022):
        version_dir = export_lib.export_saved_model(
            model, os.path.join(shared_dir, "serving")
        )
    env = {"HOME": shared_dir, "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"}
    loaded = _run_as_nobody(
        [sys.executable, "-c", _LOAD_SCRIPT, version_dir], env=env, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr.decode()[-3000:]
    logits = np.load(io.BytesIO(loaded.stdout))
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    expected = model.predict(np.zeros((2, 6, 6, 1), np.float32), verbose=0)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


# --- Item 3: int8 without calibration batches --------------------------------


def _empty_generator():
    return
    yield


@pytest.mark.parametrize(
    "data, received",
    [
        ([], r"representative_data=\[\]"),
        ((), r"representative_data=\(\)"),
        (np.zeros((0, 6, 6, 1), np.float32), r"shape \(0, 6, 6, 1\)"),
        (lambda: iter([]), "function"),
        (_empty_generator, "_empty_generator"),
        ("generator object", "generator"),
        ("dataset", "Dataset"),
    ],
    ids=["list", "tuple", "array", "lambda", "generator_function", "generator", "ds"],
)
def test_int8_without_calibration_batches_is_refused(tmp_path, data, received):
    if isinstance(data, str) and data == "generator object":
        data = (x for x in [])
    elif isinstance(data, str) and data == "dataset":
        data = tf.data.Dataset.from_tensor_slices(np.zeros((0, 1, 6, 6, 1)))
    path = tmp_path / "m.tflite"
    with pytest.raises(ValueError, match="`representative_data`") as error:
        export_lib.export_tflite(
            _tiny(), path, quantization="int8", representative_data=data
        )
    assert re.search(received, str(error.value)), error.value
    assert os.listdir(tmp_path) == []  # nothing written, no staging left


def _tensor_dtypes(path):
    interpreter = tf.lite.Interpreter(model_path=str(path))
    details = interpreter.get_tensor_details()
    by_name = {d["name"]: d for d in details}
    return interpreter, details, by_name


def test_int8_from_a_one_shot_generator_is_int8(tmp_path):
    rng = np.random.default_rng(0)
    batches = (rng.random((1, 6, 6, 1), dtype=np.float32) for _ in range(8))
    path = export_lib.export_tflite(
        _tiny(), tmp_path / "m.tflite", quantization="int8", representative_data=batches
    )
    float_path = export_lib.export_tflite(_tiny(), tmp_path / "f.tflite")
    _, details, _ = _tensor_dtypes(path)
    _, float_details, _ = _tensor_dtypes(float_path)
    int8 = [d for d in details if d["dtype"] == np.int8]
    # Both kernels, the quantized input and every activation: int8, each
    # with calibrated scales; the float model has no int8 tensor.
    assert len(int8) == 6
    assert all(
        len(d["quantization_parameters"]["scales"])
        and np.all(d["quantization_parameters"]["scales"] > 0)
        for d in int8
    )
    assert sorted(tuple(d["shape"]) for d in int8 if len(d["shape"]) == 4) == [
        (1, 4, 4, 4),  # the conv output
        (1, 6, 6, 1),  # the quantized input
        (4, 3, 3, 1),  # the conv kernel
    ]
    # The input's range was calibrated on the batches: [0, 1) in 255 steps.
    (quantized_input,) = [d for d in int8 if tuple(d["shape"]) == (1, 6, 6, 1)]
    np.testing.assert_allclose(quantized_input["quantization"][0], 1 / 255, rtol=0.01)
    assert not any(d["dtype"] == np.int8 for d in float_details)
    (float_kernel,) = [d for d in float_details if tuple(d["shape"]) == (4, 3, 3, 1)]
    assert float_kernel["dtype"] == np.float32


# --- Item 7: staging folders of killed exports -------------------------------


_KILLED_EXPORT = textwrap.dedent(
    """
    import os, signal, sys

    import keras

    from keras_sfp.export import saved_model

    write = saved_model.write_saved_model

    def write_then_wait(model, directory, spec, output_name):
        write(model, directory, spec, output_name)
        print("staged", flush=True)
        if sys.stdin.readline().strip() == "kill":
            os.kill(os.getpid(), signal.SIGKILL)

    saved_model.write_saved_model = write_then_wait
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    saved_model.export_saved_model(model, sys.argv[1], version=7)
    """
)


def _staging_names(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith(".tmp-"))


def test_killed_export_staging_is_removed_at_next_export(tmp_path):
    base = tmp_path / "serving"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_EXPORT, str(base)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        assert child.stdout.readline().strip() == "staged", child.stderr.read()[-3000:]
        running = _staging_names(base)
        assert len(running) == 1 and running[0].startswith(".tmp-7-")
        assert os.listdir(base / running[0])  # a SavedModel half way
        # An export while the other one runs keeps its staging folder.
        assert export_lib.export_saved_model(_tiny(), base).endswith("1")
        assert _staging_names(base) == running
        child.stdin.write("kill\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _staging_names(base) == running  # left behind by SIGKILL
    assert export_lib.export_saved_model(_tiny(), base).endswith("2")
    assert _staging_names(base) == []
    assert sorted(os.listdir(base)) == ["1", "2"]


def _dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()  # reaped: the pid names no process now
    return process.pid


def test_stale_tflite_staging_is_removed_and_others_kept(tmp_path):
    dead = tmp_path / (_staging.staging_prefix(pid=_dead_pid()) + "abcd1234")
    (dead / "saved_model").mkdir(parents=True)
    (dead / "saved_model" / "saved_model.pb").write_bytes(b"partial")
    alive = tmp_path / (_staging.staging_prefix() + "efgh5678")
    alive.mkdir()
    # Another host's staging: its pid means nothing here, only its age does.
    other_host = tmp_path / (
        _staging.staging_prefix(pid=_dead_pid(), host="0" * 8) + "ijkl9012"
    )
    other_host.mkdir()
    old_other_host = tmp_path / (
        _staging.staging_prefix(pid=_dead_pid(), host="f" * 8) + "mnop3456"
    )
    old_other_host.mkdir()
    # Staging folders of earlier versions (tempfile's names, no pid): by age.
    old_legacy, new_legacy = tmp_path / ".tmp-q1w2e3r4", tmp_path / ".tmp-a1s2d3f4"
    for folder in (old_legacy, new_legacy):
        (folder / "saved_model").mkdir(parents=True)
    users = tmp_path / ".tmp-notes"  # not a staging name: never touched
    users.mkdir()
    day_and_more = time.time() - _staging.STALE_AFTER_S - 60
    for folder in (old_other_host, old_legacy, users):
        os.utime(folder, (day_and_more, day_and_more))
    export_lib.export_tflite(_tiny(), tmp_path / "m.tflite")
    assert sorted(os.listdir(tmp_path)) == sorted(
        [alive.name, other_host.name, new_legacy.name, users.name, "m.tflite"]
    )


def test_a_damaged_keras_file_is_named_by_the_export_command(tmp_path):
    # Before: Keras's "File not found" for a file that exists.
    from keras_sfp.export import measure

    bad = tmp_path / "shrunk.keras"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a valid .keras file") as error:
        measure.export_model_files({"shrunk": str(bad)}, tmp_path / "out")
    assert str(bad) in str(error.value)
    assert not (tmp_path / "out").exists()
