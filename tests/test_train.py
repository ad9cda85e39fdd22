"""End-to-end smoke test of `train.py` on a tiny Fashion-MNIST subset."""

import contextlib
import csv
import glob
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from absl import app, flags

import keras_sfp
import models
from conftest import BACKEND
from keras_sfp.cli import train as cli
from keras_sfp.training import config as config_lib
from keras_sfp.training import inputs as inputs_lib
from keras_sfp.training import run as run_lib

_ROOT = str(Path(__file__).resolve().parents[1])

TRAIN_LIMIT, TEST_LIMIT, EPOCHS, BATCH = 256, 128, 2, 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run shared by the tests: `(config, results, printed output)`."""
    keras.utils.set_random_seed(0)
    config = config_lib.TrainConfig(
        model="resnet20",
        epochs=EPOCHS,
        batch_size=BATCH,
        hard_epochs=1,
        train_limit=TRAIN_LIMIT,
        test_limit=TEST_LIMIT,
        latency_runs=3,
        verbose=0,
        export="",  # exporting has tests of its own
        output_dir=str(tmp_path_factory.mktemp("run")),
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results = run_lib.train_and_evaluate(config)
    return config, results, stdout.getvalue()


@pytest.fixture(scope="module")
def test_images():
    rng = np.random.default_rng(1)
    return rng.random((16, 28, 28, 1), dtype=np.float32)


def test_results_json_is_what_train_and_evaluate_returns(run):
    config, results, _ = run
    with open(os.path.join(config.output_dir, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    assert saved["config"]["model"] == "resnet20"
    assert saved["config"]["hard_epochs"] == 1
    assert saved["dataset"]["num_train"] == TRAIN_LIMIT
    assert saved["dataset"]["num_test"] == TEST_LIMIT
    assert saved["dataset"]["input_shape"] == [28, 28, 1]


def test_results_counts_are_consistent(run):
    config, results, _ = run
    original, shrunk = results["original"], results["shrunk"]
    fresh = models.get_model("resnet20", (28, 28, 1), 10)
    assert original["macs"] == keras_sfp.count_flops(fresh)
    assert original["params"] == fresh.count_params()
    assert shrunk["macs"] < original["macs"]
    assert shrunk["params"] < original["params"]
    assert results["kept_mac_fraction"] == pytest.approx(
        shrunk["macs"] / original["macs"]
    )
    assert results["kept_param_fraction"] == pytest.approx(
        shrunk["params"] / original["params"]
    )
    # Group coupling removes 30% of every group: about (1 - 0.3)^2 of the MACs.
    assert 0.4 < results["kept_mac_fraction"] < 0.6
    for name, (before, kept) in results["filters"].items():
        # round_to=8: multiples of 8 (or all channels; 8 or fewer: unrounded).
        assert kept % 8 == 0 or kept == before or before <= 8, (name, kept)
    for accuracy in (results["soft_masked"]["accuracy"], shrunk["accuracy"]):
        assert 0.0 <= accuracy <= 1.0
    assert original["ms_per_batch"] > 0 and shrunk["ms_per_batch"] > 0
    assert shrunk["speedup"] == pytest.approx(
        original["ms_per_batch"] / shrunk["ms_per_batch"]
    )
    assert len(results["history"]["loss"]) == EPOCHS


def test_hard_epochs_make_soft_masked_and_shrunk_accuracy_agree(run):
    # In the hard state the wrapped model computes what the shrunk model does.
    _, results, _ = run
    soft = results["soft_masked"]["accuracy"]
    assert results["shrunk"]["accuracy"] == pytest.approx(soft, abs=1.5 / TEST_LIMIT)


def test_printed_table_has_original_and_shrunk_rows(run):
    _, results, printed = run
    assert results["table"] in printed
    rows = {line.split()[0]: line.split() for line in results["table"].splitlines()}
    original, shrunk = rows["original"], rows["shrunk"]
    assert original[1:3] == ["-", "-"]
    assert original[3] == f"{results['original']['params']:,}"
    assert original[4] == f"{results['original']['macs']:,}"
    assert original[6] == "1.00x"
    assert shrunk[1] == f"{results['soft_masked']['accuracy']:.4f}"
    assert shrunk[2] == f"{results['shrunk']['accuracy']:.4f}"
    assert shrunk[3] == f"{results['shrunk']['params']:,}"
    assert shrunk[4] == f"{results['shrunk']['macs']:,}"
    # Aligned columns: every table row is as wide as the header.
    lines = results["table"].splitlines()
    assert len(lines[0]) == len(lines[2]) == len(lines[3])


def test_csv_log_has_sfp_entries_for_every_epoch(run):
    config, results, _ = run
    with open(os.path.join(config.output_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    for row in rows:
        assert float(row["sfp_rate"]) == pytest.approx(0.3)
        assert float(row["sfp_pruned"]) > 0
        assert "sfp_revived" in row
    assert results["history"]["sfp_pruned"] == [float(r["sfp_pruned"]) for r in rows]


def test_tensorboard_logs_exactly_when_its_package_is_installed(run):
    _, results, _ = run
    logs = results["artifacts"]["tensorboard"]
    needs = ("tensorboard", "tensorflow")  # Keras writes with tf.summary
    if any(importlib.util.find_spec(name) is None for name in needs):
        assert logs is None
    else:
        assert glob.glob(os.path.join(logs, "train", "events.out.tfevents.*"))


def test_keras_artifacts_reload_and_compute_the_same(run, test_images):
    config, results, _ = run
    pruned = keras.saving.load_model(results["artifacts"]["pruned"])
    shrunk = keras.saving.load_model(results["artifacts"]["shrunk"])
    assert any(isinstance(layer, keras_sfp.FilterPruning) for layer in pruned.layers)
    assert not any(
        isinstance(layer, keras_sfp.FilterPruning) for layer in shrunk.layers
    )
    assert shrunk.count_params() == results["shrunk"]["params"]
    assert keras_sfp.count_flops(shrunk) == results["shrunk"]["macs"]
    assert keras_sfp.count_flops(keras_sfp.shrink(pruned)) == results["shrunk"]["macs"]
    # The reloaded wrapped model is still in the hard state of its last epoch.
    np.testing.assert_allclose(
        shrunk(test_images, training=False),
        pruned(test_images, training=False),
        atol=1e-4,
        rtol=1e-4,
    )


def test_saved_model_serves_the_shrunk_model(run, test_images):
    _, results, _ = run
    if BACKEND != "tensorflow":  # Keras exports through tf.function only there
        assert results["artifacts"]["saved_model"] is None
        assert results["config"]["export"] == ""
        return
    import tensorflow as tf

    shrunk = keras.saving.load_model(results["artifacts"]["shrunk"])
    expected = keras.ops.convert_to_numpy(shrunk(test_images, training=False))
    loaded = tf.saved_model.load(results["artifacts"]["saved_model"])
    np.testing.assert_allclose(loaded.serve(test_images), expected, atol=1e-4)
    signature = loaded.signatures["serving_default"]
    (output,) = signature(tf.constant(test_images)).values()
    np.testing.assert_allclose(output, expected, atol=1e-4)


def test_main_builds_config_from_flags(monkeypatch):
    seen = []
    monkeypatch.setattr(run_lib, "train_and_evaluate", seen.append)
    values = flags.FlagValues()
    cli.define_flags(values)
    argv = [
        "train.py",
        "--model=vgg_small",
        "--epochs=3",
        "--hard_epochs=2",
        "--schedule=asymptotic",
        "--criterion=l2_bn",
        "--prune_at_start=false",
        "--reset_momentum",
        "--coupling=layer",
        "--lr_schedule=step",
        "--augment",
        "--train_limit=100",
        "--output_dir=/tmp/out",
        "--sparse_epochs=1",
        "--sparsity=0.001",
        "--recalibration_steps=5",
        "--distill",
        "--round_to=16",
    ]
    remaining = values(argv)
    cli.main(remaining, values)
    with pytest.raises(app.UsageError, match="extra"):
        cli.main(["train.py", "extra"], values)
    (config,) = seen
    assert config == config_lib.TrainConfig(
        model="vgg_small",
        epochs=3,
        hard_epochs=2,
        schedule="asymptotic",
        criterion="l2_bn",
        prune_at_start="false",
        reset_momentum=True,
        coupling="layer",
        lr_schedule="step",
        augment=True,
        train_limit=100,
        output_dir="/tmp/out",
        sparse_epochs=1,
        sparsity=0.001,
        recalibration_steps=5,
        distill=True,
        round_to=16,
    )


def test_flag_defaults_are_the_config_defaults():
    values = flags.FlagValues()
    cli.define_flags(values)
    values(["train.py"])
    assert cli.config_from_flags(values) == config_lib.TrainConfig()
    assert config_lib.TrainConfig().resolved_output_dir() == os.path.join(
        "runs", "resnet20_fashion_mnist"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "resnet18"}, "`model` must be one of"),
        ({"epochs": 2, "hard_epochs": 3}, "hard_epochs=3 with epochs=2"),
        ({"rate": 1.0}, r"`rate` must be in \[0, 1\)"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"distribute": "tpu"}, "distribute='tpu'"),
        ({"prune_at_start": "sometimes"}, "prune_at_start='sometimes'"),
        ({"hard_epochs": -1}, "hard_epochs=-1"),
        ({"reset_momentum": "yes"}, "reset_momentum='yes'"),
        ({"recalibration_steps": -1}, "recalibration_steps=-1"),
        ({"distill": "yes"}, "distill='yes'"),
        ({"distill": None}, "distill=None"),
        ({"allocation": "best"}, "allocation='best'"),
        ({"allocation": "global", "coupling": "layer"}, "coupling='layer'"),
        ({"sparse_epochs": 4, "epochs": 4}, "sparse_epochs=4"),
        ({"sparsity": 0}, "sparsity=0"),
        ({"init_from": "missing.keras"}, "init_from='missing.keras'"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0"),
        ({"target_macs": 0.0}, "target_macs=0.0"),
        ({"target_macs": True}, "target_macs=True"),
        ({"rate": 0.3, "target_macs": 0.5}, "rate=0.3, target_macs=0.5"),
        ({"target_latency": 1.5}, "target_latency=1.5"),
        (
            {"target_macs": 0.5, "target_latency": 0.5},
            "target_macs=0.5, target_latency=0.5",
        ),
        ({"latency_table": "t.json"}, "latency_table='t.json', target_latency=None"),
        ({"target_latency": 1.0}, "target_latency=1.0"),
        ({"round_to": "fast"}, "round_to='fast'"),
        ({"round_to": "0"}, "positive integer or 'auto'. Received: round_to='0'"),
        ({"round_to": 0}, "round_to=0"),
        ({"round_to": 2.5}, "round_to=2.5"),
        (
            {"target_latency": 0.5, "distribute": "multi_process"},
            "distribute='multi_process'",
        ),
    ],
)
def test_invalid_config_says_what_was_received(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config_lib.TrainConfig(**kwargs)


def test_round_to_is_auto_or_a_number():
    assert config_lib.TrainConfig().round_to == "auto"
    assert config_lib.TrainConfig(round_to="16").round_to == 16
    assert config_lib.TrainConfig(round_to=np.int64(4)).round_to == 4


def test_pruning_schedule_flag_maps_to_prune_filters_argument():
    asymptotic = config_lib.TrainConfig(schedule="asymptotic")
    assert inputs_lib.pruning_schedule(asymptotic) == "asymptotic"
    assert inputs_lib.pruning_schedule(config_lib.TrainConfig()) is None


def test_step_schedule_divides_by_five_at_30_60_80_percent():
    config = config_lib.TrainConfig(lr_schedule="step", epochs=10, learning_rate=0.1)
    lr = run_lib.learning_rate_schedule(config, steps_per_epoch=10)
    got = [float(lr(step)) for step in (0, 30, 31, 60, 61, 80, 81, 99)]
    np.testing.assert_allclose(
        got, [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008], rtol=1e-6
    )


DATA_PARALLEL = {"tensorflow": "mirrored", "jax": "data_parallel"}


@pytest.mark.skipif(
    BACKEND not in DATA_PARALLEL, reason=f"no data parallelism on {BACKEND}"
)
def test_command_line_data_parallel_vgg_run_trains_and_shrinks(tmp_path):
    # A fresh process: MirroredStrategy objects of other tests in this one
    # would share collective instance keys with it. Model, wrappers and
    # optimizer are created in the strategy's scope; the shrunk model is built
    # from the distributed variables outside it. Two devices either way: two
    # logical CPUs (TensorFlow) or XLA host devices (JAX, from XLA_FLAGS).
    distribute = DATA_PARALLEL[BACKEND]
    command = [
        sys.executable,
        os.path.join(_ROOT, "train.py"),
        "--model=vgg_small",
        f"--distribute={distribute}",
        "--epochs=2",
        "--hard_epochs=1",
        "--batch_size=32",
        "--train_limit=128",
        "--test_limit=64",
        "--latency_runs=2",
        "--verbose=0",
        "--export=",
        "--round_to=8",  # "auto" would follow this machine's CPU
        f"--output_dir={tmp_path}",
    ]
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_BACKEND=BACKEND,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    done = subprocess.run(
        command, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["table"] in done.stdout
    assert results["config"]["distribute"] == distribute
    assert results["shrunk"]["macs"] < results["original"]["macs"]
    # round_to=8 keeps multiples of 8 (90 unrounded).
    before, kept = results["filters"]["conv5"]
    assert before == 128 and kept % 8 == 0 and kept < 128
    assert results["shrunk"]["accuracy"] == pytest.approx(
        results["soft_masked"]["accuracy"], abs=1.5 / 64
    )
    images = np.random.default_rng(2).random((8, 28, 28, 1), dtype=np.float32)
    pruned = keras.saving.load_model(tmp_path / "pruned.keras")
    shrunk = keras.saving.load_model(tmp_path / "shrunk.keras")
    np.testing.assert_allclose(
        shrunk(images, training=False),
        pruned(images, training=False),
        atol=1e-4,
        rtol=1e-4,
    )


needs_tensorflow_backend = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="the exporters trace a tf.function"
)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="exports on TensorFlow")
def test_export_on_another_backend_says_how_to_export():
    with pytest.raises(ValueError, match="`export` needs the TensorFlow backend"):
        config_lib.TrainConfig(export="saved_model")
    assert config_lib.TrainConfig().resolved_export() == ""
    assert config_lib.TrainConfig(export="").resolved_export() == ""


@needs_tensorflow_backend
def test_export_flag_writes_artifacts_and_metrics_beside_results(tmp_path):
    config = config_lib.TrainConfig(
        epochs=1,
        batch_size=64,
        train_limit=256,
        test_limit=128,
        latency_runs=2,
        verbose=0,
        output_dir=str(tmp_path),
        export="saved_model,tflite_int8",
    )
    results = run_lib.train_and_evaluate(config)
    with open(tmp_path / "export" / "metrics.json") as f:
        metrics = json.load(f)
    assert results["export"] == metrics
    assert results["artifacts"]["export"] == str(tmp_path / "export")
    original = metrics["models"]["original"]["artifacts"]
    shrunk = metrics["models"]["shrunk"]["artifacts"]
    assert metrics["num_test"] == 128
    for fmt in ("keras", "saved_model", "tflite_int8"):
        assert shrunk[fmt]["size_bytes"] < original[fmt]["size_bytes"]
        assert set(shrunk[fmt]["latency_ms"]) == {"1", "32"}
    # The exported models compute what train.py evaluated.
    assert shrunk["saved_model"]["accuracy"] == pytest.approx(
        results["shrunk"]["accuracy"], abs=1e-6
    )
    assert original["saved_model"]["accuracy"] == pytest.approx(
        results["soft_masked"]["accuracy"], abs=1 / 128
    )
    assert os.path.isfile(
        tmp_path / "export" / "shrunk" / "saved_model" / "1" / "saved_model.pb"
    )


@needs_tensorflow_backend
@pytest.mark.parametrize("export", ["coreml", "saved_model,tflite_int4", 3])
def test_invalid_export_formats_say_what_was_received(export):
    with pytest.raises(ValueError, match="`export` must be a comma-separated"):
        config_lib.TrainConfig(export=export)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"distribute": "mirrored"},
        {"distribute": "data_parallel"},
    ],
)
def test_distribution_needs_its_backend(kwargs):
    needed = config_lib.DISTRIBUTE_BACKEND[kwargs["distribute"]]
    if BACKEND == needed:
        assert config_lib.TrainConfig(**kwargs).distribute == kwargs["distribute"]
    else:
        with pytest.raises(ValueError, match=f"needs the {needed} backend"):
            config_lib.TrainConfig(**kwargs)


def test_learning_rate_defaults_to_a_fine_tuning_rate_with_init_from(run):
    config, results, _ = run
    assert config_lib.TrainConfig().resolved_learning_rate() == config_lib.LEARNING_RATE
    init = config_lib.TrainConfig(init_from=results["artifacts"]["shrunk"])
    assert init.resolved_learning_rate() == config_lib.FINE_TUNE_LEARNING_RATE == 0.01
    explicit = config_lib.TrainConfig(
        init_from=config.output_dir + "/shrunk.keras", learning_rate=0.05
    )
    assert explicit.resolved_learning_rate() == 0.05


def test_hard_epochs_default_to_one_or_all_epochs_with_init_from(run):
    _, results, _ = run
    path = results["artifacts"]["shrunk"]
    assert config_lib.TrainConfig(epochs=5).resolved_hard_epochs() == 1
    assert config_lib.TrainConfig(epochs=5, init_from=path).resolved_hard_epochs() == 5
    explicit = config_lib.TrainConfig(epochs=5, init_from=path, hard_epochs=2)
    assert explicit.resolved_hard_epochs() == 2


class _Data:
    name, input_shape, num_classes = "fashion_mnist", (28, 28, 1), 10


def test_init_from_prunes_a_trained_model_or_continues_a_wrapped_one(run):
    _, results, _ = run
    artifacts = results["artifacts"]
    # A plain trained model (here the shrunk one): its weights, pruned afresh.
    config = config_lib.TrainConfig(
        init_from=artifacts["shrunk"], rate=0.5, allocation="uniform"
    )
    original, pruned = inputs_lib.initial_models(config, _Data)
    loaded = keras.saving.load_model(artifacts["shrunk"], compile=False)
    assert {w.rate for w in keras_sfp.core.prune.wrappers(pruned)} == {0.5}
    # By default a trained model is pruned with global allocation: groups
    # keep different fractions, for the MACs of rate 0.5's uniform counts.
    tuned = config_lib.TrainConfig(init_from=artifacts["shrunk"], rate=0.5)
    assert tuned.resolved_allocation() == "global"
    _, global_pruned = inputs_lib.initial_models(tuned, _Data)
    rates = {
        float(r)
        for w in keras_sfp.core.prune.wrappers(global_pruned)
        for r in w.channel_rates
    }
    assert len(rates) > 1
    assert config_lib.TrainConfig().resolved_allocation() is None
    # The wrapped model starts from the file's weights.
    stripped = keras_sfp.strip_pruning(pruned)
    assert stripped.count_params() == loaded.count_params()
    for ours, theirs in zip(stripped.weights, loaded.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs)
        )
    # A pruned.keras: the same wrapped model (masks kept), and its full-width
    # architecture as the original.
    config = config_lib.TrainConfig(init_from=artifacts["pruned"], rate=0.5)
    original, pruned = inputs_lib.initial_models(config, _Data)
    saved = keras.saving.load_model(artifacts["pruned"], compile=False)
    assert {w.rate for w in keras_sfp.core.prune.wrappers(pruned)} == {0.3}
    for ours, theirs in zip(
        keras_sfp.core.prune.wrappers(pruned), keras_sfp.core.prune.wrappers(saved)
    ):
        np.testing.assert_array_equal(ours.mask, theirs.mask)
    assert original.count_params() == models.get_model("resnet20").count_params()


def test_init_from_a_model_that_does_not_fit_the_data_is_rejected(tmp_path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = str(tmp_path / "small.keras")
    keras.Model(inputs, keras.layers.Dense(10)(x)).save(path)
    config = config_lib.TrainConfig(init_from=path)
    with pytest.raises(ValueError, match="init_from=.*small.keras.*inputs"):
        inputs_lib.initial_models(config, _Data)


def test_init_from_a_model_that_outputs_probabilities_is_rejected(tmp_path):
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = str(tmp_path / "softmax.keras")
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ValueError, match="outputs logits.*softmax.keras"):
        inputs_lib.initial_models(config_lib.TrainConfig(init_from=path), _Data)


def test_fine_tuning_from_a_trained_model_runs_end_to_end(run, tmp_path):
    _, results, _ = run
    config = config_lib.TrainConfig(
        init_from=results["artifacts"]["shrunk"],
        epochs=1,
        batch_size=BATCH,
        train_limit=TRAIN_LIMIT,
        test_limit=TEST_LIMIT,
        latency_runs=0,
        verbose=0,
        export="",
        output_dir=str(tmp_path),
        distill=True,
    )
    tuned = run_lib.train_and_evaluate(config)
    assert tuned["config"]["learning_rate"] == config_lib.FINE_TUNE_LEARNING_RATE
    # The original is the trained (shrunk) model; pruning it again at 0.3
    # leaves fewer MACs still, and the deployed model is the trained one.
    assert tuned["original"]["macs"] == results["shrunk"]["macs"]
    assert tuned["shrunk"]["macs"] < tuned["original"]["macs"]
    assert tuned["shrunk"]["accuracy"] == tuned["soft_masked"]["accuracy"]
    # Distilled from the loaded model (keras.distillation).
    assert tuned["config"]["distill"] is True
    assert "distillation_loss" in tuned["history"]


def test_target_latency_builds_from_the_named_table(tmp_path, monkeypatch):
    from keras_sfp.latency import table as latency_table

    # A fake device (1 microsecond per input channel): no timing in tests.
    monkeypatch.setattr(
        latency_table, "_time_layer", lambda layer, shape, runs: 1e-3 * shape[-1]
    )
    path = str(tmp_path / "table.json")
    config = config_lib.TrainConfig(target_latency=0.7, latency_table=path)
    # The same weights both times (train_and_evaluate seeds; this does not):
    # the allocation reads their importance.
    keras.utils.set_random_seed(config.seed)
    original, pruned = inputs_lib.initial_models(config, _Data)
    table = keras_sfp.LatencyTable.load(path)  # written by prune_filters
    assert table.entries
    rates = {
        float(r) for w in keras_sfp.core.prune.wrappers(pruned) for r in w.channel_rates
    }
    assert len(rates) > 1 and max(rates) > 0
    # The second run reads the file and measures nothing.
    monkeypatch.setattr(latency_table, "_time_layer", None)
    keras.utils.set_random_seed(config.seed)
    _, again = inputs_lib.initial_models(config, _Data)
    for a, b in zip(
        keras_sfp.core.prune.wrappers(pruned), keras_sfp.core.prune.wrappers(again)
    ):
        np.testing.assert_array_equal(a.channel_rates, b.channel_rates)
