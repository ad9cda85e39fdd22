"""The accuracy benchmark's bookkeeping: job order, statistics, table, plot;
and its tfmot baseline (`bench/tfmot_baseline.py`)."""

import keras
import numpy as np
import pytest
import tf_keras
from tensorflow_model_optimization.sparsity import keras as tfmot_sparsity

import keras_sfp
import models
from bench import accuracy, tfmot_baseline


def _row(start, name, rate, seed, deployed, soft=None, revived=(0, 0, 0)):
    return {
        "start": start,
        "name": name,
        "rate": rate,
        "seed": seed,
        "deployed": deployed,
        "soft_masked": deployed if soft is None else soft,
        "kept_macs": 0.5,
        "revived": list(revived),
        "seconds": 10.0,
    }


def test_aggregate_reports_mean_and_sample_std_over_seeds():
    rows = [
        _row("scratch", "sfp_v1", 0.3, 0, 0.80, revived=(0, 4, 2)),
        _row("scratch", "sfp_v1", 0.3, 1, 0.82, soft=0.83, revived=(0, 6, 0)),
        _row("scratch", "sfp_v1", 0.3, 2, 0.84),
        _row("scratch", "unpruned", 0.0, 0, 0.90),
    ]
    table = {(r["start"], r["name"]): r for r in accuracy.aggregate(rows)}
    v1 = table["scratch", "sfp_v1"]
    assert v1["seeds"] == 3
    np.testing.assert_allclose(v1["deployed_mean"], 82.0)
    np.testing.assert_allclose(v1["deployed_std"], np.std([80, 82, 84], ddof=1))
    np.testing.assert_allclose(v1["gap"], 1.0 / 3)  # soft - deployed, in points
    # Revivals summed over each run's events, averaged over seeds.
    np.testing.assert_allclose(v1["revived"], (6 + 6 + 0) / 3)
    assert table["scratch", "unpruned"]["deployed_std"] == 0.0


def test_markdown_and_plot_are_written(tmp_path):
    rows = [
        _row(start, name, rate, seed, 0.8 + 0.01 * seed)
        for start, name in [("scratch", "sfp_v1"), ("trained", "hard_once")]
        for rate in (0.3, 0.5)
        for seed in (0, 1)
    ]
    table = accuracy.aggregate(rows)
    text = accuracy.markdown(table, "smoke", accuracy.SETTINGS["smoke"], "CPU")
    assert "| scratch | sfp_v1 | 0.3 | 2 | 80.50 +- 0.71 |" in text
    path = tmp_path / "plot.png"
    accuracy.plot(table, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jobs_run_the_default_choosing_comparisons_first_without_repeats():
    first, rest = accuracy.jobs(accuracy.SETTINGS["reduced"])
    assert ("scratch", "unpruned", 0.0) == first[0]
    assert ("trained", "hard_once", 0.3) in first
    both = first + rest
    assert len(both) == len(set(both))
    assert ("scratch", "sfp_v1", 0.7) in rest  # the rate sweep
    every = {(s, n) for s, n, _ in both}
    assert every == {("scratch", n) for n in accuracy.SCRATCH} | {
        ("trained", n) for n in accuracy.TRAINED
    } | {("scratch", accuracy.TFMOT), ("trained", accuracy.TFMOT)}
    # ASFP from a trained network too, and tfmot after its SFP reference.
    assert ("trained", "asfp", 0.3) in rest
    assert both.index(("trained", accuracy.TFMOT, 0.3)) > both.index(
        ("trained", accuracy.REFERENCE, 0.3)
    )


def test_uniform_width_matches_the_requested_macs_fraction():
    width = accuracy._width_for(0.5, (28, 28, 1), 10)
    full = models.cifar_resnet(20, (28, 28, 1), 10)
    narrow = models.cifar_resnet(20, (28, 28, 1), 10, width=width)
    fraction = keras_sfp.count_flops(narrow) / keras_sfp.count_flops(full)
    assert abs(fraction - 0.5) < 0.03


def _tfmot_row(start, seed, deployed, reference_deployed, ms, ref_ms):
    reference = _row(start, accuracy.REFERENCE, 0.3, seed, reference_deployed)
    reference["key"] = f"{start}/{accuracy.REFERENCE}/r0.3/s{seed}"
    row = _row(start, accuracy.TFMOT, 0.3, seed, deployed)
    row.update(
        key=f"{start}/{accuracy.TFMOT}/r0.3/s{seed}",
        options={"reference": reference["key"]},
        kept_macs=1.0,
        nonzero=1000,
        target_nonzero=1000,
        sparsity=0.6,
        tflite_bytes=4096,
        ref_tflite_bytes=2048,
        gzip_bytes=2048,
        ref_gzip_bytes=1024 + 512 * seed,
        tflite_ms=ms,
        ref_tflite_ms=ref_ms,
    )
    return [reference, row]


def test_tfmot_comparison_pairs_each_run_with_its_sfp_reference():
    rows = _tfmot_row("scratch", 0, 0.80, 0.83, 2.0, 1.0) + _tfmot_row(
        "scratch", 1, 0.84, 0.83, 4.0, 1.5
    )
    (c,) = accuracy.tfmot_comparison(rows)
    np.testing.assert_allclose(c["tfmot_mean"], 82.0)
    np.testing.assert_allclose(c["sfp_mean"], 83.0)
    # Paired: (80 - 83, 84 - 83) -> mean -1, std of (-3, 1).
    np.testing.assert_allclose(c["diff_mean"], -1.0)
    np.testing.assert_allclose(c["diff_std"], np.std([-3, 1], ddof=1))
    np.testing.assert_allclose([c["gzip_kb"], c["sfp_gzip_kb"]], [2.0, 1.25])
    np.testing.assert_allclose([c["tflite_ms"], c["sfp_tflite_ms"]], [3.0, 1.25])
    table = accuracy.aggregate(rows)
    text = accuracy.markdown(table, "smoke", accuracy.SETTINGS["smoke"], "CPU", [c])
    assert "| scratch | tfmot_plm | 0.3 | 2 | 82.00 +- 2.83 |" in text
    assert "| scratch | 0.3 | 2 | 82.00 +- 2.83 | 83.00 +- 0.00 | -1.00 +- 2.83 |" in (
        text
    )


def _tiny_resnet(weight_decay=1e-3):
    keras.utils.set_random_seed(1)
    model = models.cifar_resnet(8, (12, 12, 1), 3, weight_decay, width=0.25)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
            # Non-trivial statistics, so that a swapped weight shows.
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, w.shape).astype("float32")
                    if i in (0, 3)
                    else rng.normal(0, 0.3, w.shape).astype("float32")
                    for i, w in enumerate(layer.get_weights())
                ]
            )
    return model


def test_tf_keras_copy_reproduces_the_keras_model():
    model = _tiny_resnet()
    copy = tfmot_baseline.tf_keras_copy(model)
    x = np.random.default_rng(5).random((6, 12, 12, 1)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(copy(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-4,
        atol=1e-5,
    )
    assert copy.count_params() == model.count_params()
    assert copy.get_layer("stage2_block0_bn1").momentum == 0.9
    # Keras 3 and tf_keras penalise the same `1e-3 * sum(w**2)` per kernel.
    np.testing.assert_allclose(
        float(tf_keras.backend.sum(copy.losses)),
        float(sum(keras.ops.convert_to_numpy(loss) for loss in model.losses)),
        rtol=1e-5,
    )


def test_tf_keras_copy_rejects_other_models():
    inputs = keras.Input((4, 4, 1))
    other = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="`model` must be a models.cifar_resnet"):
        tfmot_baseline.tf_keras_copy(other)


@pytest.mark.parametrize("schedule", ["polynomial", "constant"])
def test_pruning_keeps_exactly_the_target_nonzero_weights(schedule):
    copy = tfmot_baseline.tf_keras_copy(_tiny_resnet())
    sizes = tfmot_baseline.prunable_sizes(copy)
    # Of 4852: one uniform sparsity would keep 2706 (rounded per layer).
    target = 2707
    assert sum(sizes.values()) == 4852
    sparsities = tfmot_baseline.layer_sparsities(sizes, target)
    pruned = tfmot_baseline.prune(copy, sparsities, schedule, steps=4)
    pruned.compile(
        optimizer="sgd",
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.random((16, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 3, 16)
    pruned.fit(
        x,
        y,
        batch_size=4,
        epochs=1,
        verbose=0,
        callbacks=[tfmot_sparsity.UpdatePruningStep()],
    )
    stripped = tfmot_sparsity.strip_pruning(pruned)
    assert tfmot_baseline.nonzero_kernel_weights(stripped) == target


def test_layer_sparsities_stay_near_uniform_and_check_the_target():
    sizes = {"a": 7, "b": 100, "c": 3}
    sparsities = tfmot_baseline.layer_sparsities(sizes, 55)
    kept = {n: round(sizes[n] * (1 - s)) for n, s in sparsities.items()}
    assert sum(kept.values()) == 55
    assert all(abs(kept[n] - sizes[n] * 0.5) < 1 for n in sizes)
    with pytest.raises(ValueError, match="Received: target_nonzero=111"):
        tfmot_baseline.layer_sparsities(sizes, 111)
    with pytest.raises(ValueError, match="Received: target_nonzero=2"):
        tfmot_baseline.layer_sparsities(sizes, 2)


def test_tfmot_jobs_are_skipped_with_a_message_without_tensorflow(monkeypatch, capsys):
    monkeypatch.setattr(accuracy.tfmot_baseline, "missing", lambda: "tensorflow")
    monkeypatch.setattr(accuracy, "_wanted", lambda start, name: name == accuracy.TFMOT)

    class Runner:
        params = accuracy.SETTINGS["smoke"]

        def run_tfmot(self, *args):
            raise AssertionError("ran without TensorFlow")

    accuracy.run_all(Runner(), seeds=[0])
    out = capsys.readouterr().out
    assert "Not run: scratch/tfmot_plm, trained/tfmot_plm" in out
    assert "no tensorflow" in out
