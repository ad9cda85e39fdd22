"""keras-sfp across Keras backends: `.keras` files move, TensorFlow is optional.

Each backend runs in a process of its own (Keras fixes its backend at
import), through `tests/_backend_worker.py`. JAX is a test dependency and
runs with TensorFlow hidden; PyTorch joins where it is installed.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_backend_worker.py")
OTHERS = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None or not OTHERS,
    reason="compares TensorFlow with another installed backend",
)


def _run(backend: str, out, *args: str) -> None:
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        # Two host devices for train.py's data parallelism on JAX.
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    done = subprocess.run(
        [sys.executable, _WORKER, str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each backend trains and saves a model and checks the others' files.

    The other backends run without TensorFlow: they load a file written on
    TensorFlow, train their own, and (the first of them) run `train.py` end
    to end, on JAX with `--distribute=data_parallel` over two host devices.
    """
    dirs = {b: tmp_path_factory.mktemp(b) for b in ["tensorflow", *OTHERS]}
    _run("tensorflow", dirs["tensorflow"], "--train")
    for backend in OTHERS:
        extra = ["--train_py"] if backend == OTHERS[0] else []
        _run(
            backend,
            dirs[backend],
            "--no_tensorflow",
            "--train",
            "--check",
            str(dirs["tensorflow"]),
            *extra,
        )
    _run("tensorflow", dirs["tensorflow"], "--check", *(str(dirs[b]) for b in OTHERS))
    return dirs


@pytest.mark.parametrize(
    "source,target",
    [("tensorflow", b) for b in OTHERS] + [(b, "tensorflow") for b in OTHERS],
)
def test_keras_file_trained_on_one_backend_shrinks_the_same_on_another(
    runs, source, target
):
    want = np.load(runs[source] / "train.npz")
    got = np.load(runs[source] / f"check_{target}.npz")
    np.testing.assert_array_equal(got["masks"], want["masks"])
    assert 0 < want["masks"].sum() < want["masks"].size
    assert int(got["macs"]) == int(want["macs"])
    scale = np.abs(want["shrunk"]).max()
    np.testing.assert_allclose(got["shrunk"], want["shrunk"], atol=1e-5 * scale)
    # The file keeps the hard state: the wrapped model is the deployed one.
    np.testing.assert_allclose(got["pruned"], got["shrunk"], atol=1e-5 * scale)


def test_train_py_runs_on_another_backend_without_tensorflow(runs):
    with open(runs[OTHERS[0]] / "run" / "results.json") as f:
        results = json.load(f)
    assert results["config"]["backend"] == OTHERS[0]
    parallel = "data_parallel" if OTHERS[0] == "jax" else "none"
    assert results["config"]["distribute"] == parallel
    assert results["config"]["export"] == ""
    assert results["artifacts"]["saved_model"] is None
    assert results["artifacts"]["tensorboard"] is None
    assert 0.4 < results["kept_mac_fraction"] < 0.6
    # One hard epoch: the wrapped model computes what the shrunk model does.
    assert results["shrunk"]["accuracy"] == pytest.approx(
        results["soft_masked"]["accuracy"], abs=1.5 / 128
    )
    loss = results["history"]["loss"]  # (too few steps for test accuracy)
    assert len(loss) == 2 and loss[1] < loss[0]
    assert results["shrunk"]["speedup"] > 0
    assert os.path.isfile(runs[OTHERS[0]] / "run" / "shrunk.keras")
