"""Several processes, one SFP run: JAX's `jax.distributed` on localhost.

The runs happen in worker processes (`tests/_distributed_worker.py`, JAX on
the CPU, gloo collectives, one device each) on free ports, and are always
killed at the end.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_sfp.training import distributed, pipeline
from keras_sfp.training.data import ArraySplit

_HERE = os.path.dirname(os.path.abspath(__file__))
_WORKER = os.path.join(_HERE, "_distributed_worker.py")
_TIMEOUT = 240

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="multi-process runs use JAX"
)


def _launch(out, num_processes, *extra, crashing=False):
    """Runs the worker in `num_processes` processes; returns their exit codes.

    When one process fails (or, with `crashing`, process 1 exits), the others
    wait on it forever: they are killed.
    """
    port = distributed.free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    logs = [
        open(os.path.join(out, f"stderr_{k}.txt"), "w") for k in range(num_processes)
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, _WORKER, str(out), str(k), str(num_processes), str(port)]
            + list(extra),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        for k, log in enumerate(logs)
    ]
    deadline = time.monotonic() + _TIMEOUT
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if not crashing:
        for k, code in enumerate(codes):
            with open(os.path.join(out, f"stderr_{k}.txt")) as f:
                assert code == 0, f"process {k} exited with {code}: {f.read()[-3000:]}"
    return codes


def _load(out, process_id=0) -> dict:
    with np.load(os.path.join(out, f"process_{process_id}.npz")) as f:
        return dict(f)


def _weights(result) -> list:
    return [result[f"w{i}"] for i in range(sum(k.startswith("w") for k in result))]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    _launch(out, 2)
    return [_load(out, 0), _load(out, 1)]


def test_processes_agree_and_match_one_process_fed_the_same_batches(
    two_processes, tmp_path
):
    first, second = two_processes
    np.testing.assert_array_equal(first["masks"], second["masks"])
    for a, b in zip(_weights(first), _weights(second), strict=True):
        np.testing.assert_array_equal(a, b)  # replicated: bit for bit
    # `shrink` in each process: the same model.
    assert first["shrunk_params"] == second["shrunk_params"]
    np.testing.assert_array_equal(first["shrunk_outputs"], second["shrunk_outputs"])
    assert 0 < first["masks"].mean() < 1  # something was pruned
    _launch(tmp_path, 1)
    single = _load(tmp_path)
    np.testing.assert_array_equal(single["masks"], first["masks"])
    for a, b in zip(_weights(single), _weights(first), strict=True):
        # Same global batches; only the order of the all-reduce differs.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_killed_run_resumes_and_ends_with_the_same_masks(two_processes, tmp_path):
    backup = tmp_path / "backup"
    codes = _launch(
        tmp_path, 2, "--backup_dir", str(backup), "--crash_in_epoch", "1", crashing=True
    )
    assert codes[1] == 3 and not (tmp_path / "process_0.npz").exists()
    assert (backup / "process_0").exists() and (backup / "process_1").exists()
    _launch(tmp_path, 2, "--backup_dir", str(backup))
    resumed = _load(tmp_path)
    assert resumed["epochs_run"].tolist() == [1, 2]  # from the epoch-0 backup
    np.testing.assert_array_equal(resumed["masks"], two_processes[0]["masks"])
    for a, b in zip(_weights(resumed), _weights(two_processes[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_process_ahead_of_the_others_falls_back_to_its_previous_backup(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(model.get_weights())
    )
    backup = distributed.BackupAndRestore(str(tmp_path), delete_checkpoint=False)
    x, y = np.ones((8, 3), "float32"), np.zeros((8, 2), "float32")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[record, backup])
    with open(tmp_path / "training_metadata.json") as f:
        assert json.load(f)["epoch"] == 2
    restarted = keras.models.clone_model(model)
    restarted.compile(keras.optimizers.SGD(0.1), "mse")
    again = distributed.BackupAndRestore(str(tmp_path), delete_checkpoint=False)
    again.set_model(restarted)
    again._fall_back(0)  # the previous backup is of epoch 1, not 0: unchanged
    with open(tmp_path / "training_metadata.json") as f:
        assert json.load(f)["epoch"] == 2
    again._fall_back(1)
    with open(tmp_path / "training_metadata.json") as f:
        assert json.load(f)["epoch"] == 1
    assert again._restored_epoch() == 1
    for got, want in zip(restarted.get_weights(), seen[0], strict=True):
        np.testing.assert_array_equal(got, want)


def test_train_py_runs_on_two_processes_and_writes_once(tmp_path):
    port = distributed.free_port()
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    args = [
        sys.executable,
        os.path.join(os.path.dirname(_HERE), "train.py"),
        "--distribute=multi_process",
        "--model=vgg_small",
        "--train_limit=64",
        "--test_limit=32",
        "--epochs=1",
        "--batch_size=32",
        "--latency_runs=0",
        "--verbose=0",
        f"--output_dir={tmp_path / 'run'}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            [*args, f"--process_id={k}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=_TIMEOUT) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert "kept MACs" in outputs[0][0] and "kept MACs" not in outputs[1][0]
    with open(tmp_path / "run" / "results.json") as f:
        results = json.load(f)
    assert results["config"]["processes"] == 2
    assert results["dataset"]["num_train"] == 64
    assert 0.4 < results["kept_mac_fraction"] < 0.7


def test_shards_cut_each_global_batch_into_equal_parts():
    rng = np.random.default_rng(0)
    split = ArraySplit(rng.integers(0, 256, (40, 4, 4, 1), np.uint8), np.arange(40))
    whole = pipeline.make_pipeline(split, 16, training=True, seed=3)
    parts = [
        pipeline.make_pipeline(
            split, 16, training=True, seed=3, num_shards=2, shard_index=k
        )
        for k in range(2)
    ]
    assert len(whole) == 3 and len(parts[0]) == 2  # the last 8 are dropped
    for index in range(2):
        images = np.concatenate([p[index][0] for p in parts])
        labels = np.concatenate([p[index][1] for p in parts])
        np.testing.assert_array_equal(images, whole[index][0])
        np.testing.assert_array_equal(labels, whole[index][1])
    parts[0].set_epoch(2)
    whole.set_epoch(2)
    np.testing.assert_array_equal(parts[0][1][1], whole[1][1][:8])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_shards": 3}, "multiple of the number of shards"),
        ({"num_shards": 2, "shard_index": 2}, "shard_index"),
        ({"num_shards": 0}, "num_shards"),
        ({"num_shards": 2, "seed": None}, "`seed` must be set"),
    ],
)
def test_bad_shards_are_rejected(kwargs, match):
    split = ArraySplit(np.zeros((8, 4, 4, 1), np.uint8), np.zeros(8))
    with pytest.raises(ValueError, match=match):
        pipeline.make_pipeline(split, 16, training=True, **{"seed": 0, **kwargs})


def test_single_process_helpers_without_jax_distributed():
    assert distributed.process_index() == 0 and distributed.process_count() == 1
    assert distributed.is_chief()
    if keras.backend.backend() != "jax":
        with pytest.raises(ValueError, match="needs the JAX backend"):
            distributed.initialize("localhost:1234", 2, 0)
    else:
        with pytest.raises(ValueError, match="process_id"):
            distributed.initialize("localhost:1234", 2, 5)


def test_process_settings_need_multi_process():
    import train

    with pytest.raises(ValueError, match="only apply with distribute='multi_process'"):
        train.TrainConfig(num_processes=2)


_MWMS = """
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras, keras_sfp
inputs = keras.Input((8, 8, 3))
x = keras.layers.Conv2D(4, 3)(inputs)
model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
with strategy.scope():
    try:
        keras_sfp.prune_filters(model)
    except RuntimeError as error:
        print("RAISED", error)
"""


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="a TensorFlow strategy"
)
def test_multi_worker_mirrored_strategy_gets_a_clear_error():
    done = subprocess.run(
        [sys.executable, "-c", _MWMS],
        env=dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        cwd=os.path.dirname(_HERE),
    )
    assert "RAISED" in done.stdout, done.stderr[-3000:]
    assert "keras-team/keras#20585" in done.stdout
    assert "--distribute=multi_process" in done.stdout
