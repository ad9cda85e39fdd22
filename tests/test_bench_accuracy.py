"""The accuracy benchmark's bookkeeping: job order, statistics, table, plot;
and its tfmot baseline (`bench/tfmot_baseline.py`)."""

import functools
import json

import keras
import numpy as np
import pytest
import tf_keras
from tensorflow_model_optimization.sparsity import keras as tfmot_sparsity

import keras_sfp
import models
from bench import accuracy, accuracy_report, tfmot_baseline


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
    table = {
        (r["start"], r["name"]): r
        for r in accuracy_report.aggregate(rows, accuracy.ORDER)
    }
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
    table = accuracy_report.aggregate(rows, accuracy.ORDER)
    text = accuracy_report.markdown(table, "smoke", accuracy.SETTINGS["smoke"], "CPU")
    assert "| scratch | sfp_v1 | 0.3 | 2 | 80.50 +- 0.71 |" in text
    path = tmp_path / "plot.png"
    accuracy_report.plot(table, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_differences_pair_each_seed_with_its_baselines():
    rows = [
        _row("scratch", "sfp_v1", 0.3, 0, 0.80),
        _row("scratch", "sfp_v1", 0.3, 1, 0.82),
        _row("scratch", "scratch_arch", 0.3, 0, 0.79),
        _row("scratch", "scratch_arch", 0.3, 1, 0.83),
        _row("scratch", "scratch_arch", 0.5, 0, 0.70),  # another rate: unpaired
        _row("scratch", "unpruned", 0.0, 0, 0.90),
        _row("trained", "sfp_v1", 0.3, 0, 0.85),
        _row("trained", "hard_once", 0.3, 0, 0.86),
        _row("trained", "unpruned", 0.0, 0, 0.88),
    ]
    paired = {
        (p["start"], p["name"], p["rate"], p["baseline"]): p
        for p in accuracy_report.paired_differences(
            rows, accuracy.BASELINES, accuracy.ORDER
        )
    }
    v1 = paired["scratch", "sfp_v1", 0.3, "scratch_arch"]
    assert v1["seeds"] == 2
    np.testing.assert_allclose([v1["mean"], v1["std"]], [0.0, np.sqrt(2)], atol=1e-9)
    np.testing.assert_allclose(
        paired["scratch", "sfp_v1", 0.3, "unpruned"]["mean"], -10
    )
    np.testing.assert_allclose(
        paired["scratch", "scratch_arch", 0.5, "unpruned"]["mean"], -20
    )
    np.testing.assert_allclose(
        paired["trained", "sfp_v1", 0.3, "hard_once"]["mean"], -1
    )
    np.testing.assert_allclose(
        paired["trained", "hard_once", 0.3, "unpruned"]["mean"], -2
    )
    assert ("scratch", "scratch_arch", 0.3, "scratch_arch") not in paired
    assert not any(p["name"] == "unpruned" for p in paired.values())
    text = accuracy_report.markdown(
        accuracy_report.aggregate(rows, accuracy.ORDER),
        "smoke",
        accuracy.SETTINGS["smoke"],
        "CPU",
        paired=accuracy_report.paired_differences(
            rows, accuracy.BASELINES, accuracy.ORDER
        ),
        planned=40,
    )
    assert "| scratch | sfp_v1 | 0.3 | scratch_arch | 2 | +0.00 +- 1.41 |" in text
    assert "Runs: 9 of the 40 of every configuration." in text


def test_trained_runs_pair_only_with_runs_from_the_same_network(tmp_path):
    # Seed 0's trained network was trained again (another machine): a run
    # from the new one does not pair with the unpruned fine-tune of the old
    # one; runs that log no network pair with each other.
    rows = [
        dict(_row("trained", "unpruned", 0.0, 0, 0.88)),
        dict(_row("trained", "hard_once", 0.5, 0, 0.80), trained="new"),
        dict(_row("trained", "global", 0.5, 0, 0.81), trained="new"),
        _row("trained", "hard_once", 0.3, 0, 0.86),
    ]
    paired = {
        (p["name"], p["rate"], p["baseline"]): p["mean"]
        for p in accuracy_report.paired_differences(
            rows, accuracy.BASELINES, accuracy.ORDER
        )
    }
    assert paired.keys() == {
        ("global", 0.5, "hard_once"),
        ("hard_once", 0.3, "unpruned"),
    }
    np.testing.assert_allclose(paired["global", 0.5, "hard_once"], 1.0)
    # The runner logs the fingerprint of a trained run's start file.
    runner = accuracy.Runner("smoke", str(tmp_path))
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    path = str(tmp_path / "trained.keras")
    model.save(path)
    start = runner._start("trained", path)
    assert start == {"trained": accuracy.jobs_lib.fingerprint(model)}
    assert runner._start("scratch", path) == {}
    model.layers[-1].bias.assign([1.0, 0.0])
    assert accuracy.jobs_lib.fingerprint(model) != start["trained"]


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


def test_reduced_setting_runs_the_deciding_subset_and_only_all_runs_every_one():
    params = accuracy.SETTINGS["reduced"]
    first, rest = accuracy.jobs(params)
    wanted = {(s, n) for s, n, _ in first + rest if accuracy._wanted(params, s, n)}
    assert wanted == {tuple(o.split("/")) for o in params["only"]}
    assert ("scratch", "sfp_l2bn") in wanted and ("trained", "hard_once") in wanted
    assert not accuracy._wanted(params, "scratch", "fpgm")
    assert accuracy._wanted(params, "scratch", "fpgm", ["all"])
    assert accuracy._wanted(params, "trained", "fpgm", ["trained/fpgm"])
    assert not accuracy._wanted(params, "scratch", "sfp_v1", ["trained/fpgm"])


def test_every_pruned_trained_configuration_names_its_allocation(tmp_path):
    # `train.py --init_from` allocates globally by default, so a trained
    # configuration without `allocation` would silently be global (as
    # `hard_once` and `sfp_v1` were in commit 48ba500's table).
    from keras_sfp.training import config as config_lib

    trained = tmp_path / "trained.keras"
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(trained)
    for name, overrides in accuracy.TRAINED.items():
        if overrides.get("rate") == 0.0:
            continue
        fields = accuracy.resolve(overrides, 0.3, epochs=2)
        config = config_lib.TrainConfig(init_from=str(trained), epochs=2, **fields)
        expected = "global" if "global" in name else "uniform"
        if config.coupling == "layer":
            expected = None  # per-layer coupling: one rate everywhere
        assert config.resolved_allocation() == expected, name
        assert config.resolved_hard_epochs() + config.sparse_epochs <= 2, name


def test_parallel_jobs_wait_for_the_runs_their_start_files_need():
    needs = accuracy._needs
    assert needs("scratch", "sfp_l2bn", 0.5) == []
    assert needs("scratch", "scratch_arch", 0.5) == [("scratch", "sfp_v1", 0.5)]
    assert needs("scratch", "uniform", 0.7) == [("scratch", "sfp_v1", 0.7)]
    assert needs("trained", "hard_once", 0.3) == [("scratch", "unpruned", 0.0)]
    assert needs("trained", accuracy.TFMOT, 0.3) == [
        ("trained", "sfp_v1", 0.3),
        ("scratch", "unpruned", 0.0),
    ]
    assert accuracy._parse_job("trained/asfp/r0.5/s2") == ("trained", "asfp", 0.5, 2)
    for bad in ("trained/asfp/0.5/s2", "scratch/hard_once/r0.3/s0", "a/b"):
        with pytest.raises(ValueError, match=f"Received: job='{bad}'"):
            accuracy._parse_job(bad)


class _FakeRunner:
    """What `run_parallel` uses of a `Runner`; jobs "log" through `logged`."""

    def __init__(self, root):
        self.root = str(root)
        self.params = dict(accuracy.SETTINGS["smoke"], sweep_rates=())
        self.done, self.logged = {}, {}

    def key(self, start, name, rate, seed):
        return f"{start}/{name}/r{rate}/s{seed}"

    def initial(self, seed):
        pass

    def reload(self):
        self.done = dict(self.logged)


class _FakeJob:
    """Finishes at its second poll; fails if its key is in `failing`."""

    def __init__(self, runner, key, failing):
        self.runner, self.key, self.failing = runner, key, failing
        self.returncode, self.polls = None, 0

    def poll(self):
        self.polls += 1
        if self.polls >= 2 and self.returncode is None:
            self.returncode = 1 if self.key in self.failing else 0
            if not self.returncode:
                start = self.key.split("/")[0]
                self.runner.logged[self.key] = {
                    "key": self.key,
                    "start": start,
                    "deployed": 0.5,
                    "wall_seconds": 1.0,
                }
        return self.returncode


def _run_fake(tmp_path, monkeypatch, deadline_s, failing=(), only=()):
    monkeypatch.setattr(accuracy, "_init_for", lambda *args: None)
    monkeypatch.setattr(accuracy.tfmot_baseline, "missing", lambda: "tensorflow")
    runner, jobs = _FakeRunner(tmp_path), {}

    def launch(key, log):
        start, name, rate, seed = accuracy._parse_job(key)
        for need in accuracy._needs(start, name, rate):
            assert runner.key(*need, seed) in runner.logged, (key, need)
        assert sum(j.returncode is None for j in jobs.values()) < 3
        jobs[key] = _FakeJob(runner, key, failing)
        return jobs[key]

    accuracy.run_parallel(
        runner, [0, 1], 3, deadline_s, [], only, launch=launch, poll_s=0.001
    )
    return runner, jobs


def test_parallel_runs_start_after_their_needs_and_drop_what_a_failure_needs(
    tmp_path, monkeypatch, capsys
):
    failing = {"scratch/sfp_v1/r0.3/s0"}
    runner, jobs = _run_fake(tmp_path, monkeypatch, float("inf"), failing)
    ordered, _ = accuracy._ordered_jobs(runner, [0, 1])
    dropped = {"scratch/scratch_arch/r0.3/s0", "scratch/uniform/r0.3/s0"}
    assert set(jobs) == {runner.key(*job) for job in ordered} - dropped
    assert set(runner.done) == set(jobs) - failing
    out = capsys.readouterr().out
    assert "scratch/sfp_v1/r0.3/s0 failed (exit 1)" in out
    assert all(f"{key} dropped" in out for key in dropped)


def test_parallel_runs_also_run_what_a_wanted_job_needs(tmp_path, monkeypatch):
    _, jobs = _run_fake(tmp_path, monkeypatch, float("inf"), only=["trained/hard_once"])
    assert sorted(jobs) == [
        "scratch/unpruned/r0.0/s0",
        "scratch/unpruned/r0.0/s1",
        "trained/hard_once/r0.3/s0",
        "trained/hard_once/r0.3/s1",
    ]


def test_parallel_runs_start_nothing_that_would_end_after_the_deadline(
    tmp_path, monkeypatch, capsys
):
    runner, jobs = _run_fake(tmp_path, monkeypatch, deadline_s=0.0)
    # The first 3 jobs of each start (`scratch`, `trained`) start before any
    # job like them has a duration; nothing after them.
    assert [key.split("/")[0] for key in jobs] == ["scratch"] * 3 + ["trained"] * 3
    assert set(runner.done) == set(jobs)
    assert "Deadline: " in capsys.readouterr().out


def test_a_logged_job_needs_none_of_its_start_files(tmp_path, monkeypatch):
    # A log carried to another machine: `scratch_arch`'s start file (made
    # from `sfp_v1`'s shrunk model) is not there, and is not needed.
    runner = accuracy.Runner("smoke", str(tmp_path))
    logged = {"key": "scratch/scratch_arch/r0.3/s0", "deployed": 0.8}
    with open(runner.log, "w") as f:
        f.write(json.dumps(logged) + "\n")
    runner.reload()

    def missing(*args):
        raise AssertionError("the start file was asked for")

    monkeypatch.setattr(accuracy, "_init_for", missing)
    assert accuracy.run_job(runner, "scratch", "scratch_arch", 0.3, 0) == logged


def test_a_logged_run_whose_needed_file_is_gone_trains_again(
    tmp_path, monkeypatch, capsys
):
    # A log carried to another machine: a new trained configuration needs
    # the unpruned run's `pruned.keras`, which is not in this runner's
    # folder. It trains again (overwriting the folder), replaces its row and
    # says whether it is the same run; a run whose file is here (wherever
    # it was logged), or a caller that needs none, keeps the logged row.
    runner = accuracy.Runner("smoke", str(tmp_path))
    key = "scratch/unpruned/r0.0/s0"
    output_dir = tmp_path / "smoke" / "scratch_unpruned_r0.0_s0"
    logged = {"key": key, "output_dir": "elsewhere", "deployed": 0.4}
    with open(runner.log, "w") as f:
        f.write(json.dumps(logged) + "\n")
    runner.reload()
    configs = []

    def train(config):
        configs.append(config)
        return {}

    monkeypatch.setattr(accuracy.run_lib, "train_and_evaluate", train)
    monkeypatch.setattr(
        accuracy, "_summary", lambda results, macs: {"deployed": 0.5, "kept_macs": 1.0}
    )
    monkeypatch.setattr(runner, "full_macs", lambda: 1)
    run = functools.partial(runner.run, "scratch", "unpruned", 0.0, 0, {"rate": 0.0})
    assert run() == logged and run(needs=None) == logged and not configs
    row = run(needs="pruned.keras")
    assert len(configs) == 1 and configs[0].overwrite and configs[0].seed == 0
    assert configs[0].output_dir == str(output_dir)
    assert row["deployed"] == 0.5 and accuracy.jobs_lib.read_log(runner.log)[-1] == row
    assert "0.5000 now, 0.4000 logged. Not the same run" in capsys.readouterr().out
    runner.reload()
    assert runner.done[key] == row
    output_dir.mkdir()
    (output_dir / "pruned.keras").write_text("")
    runner.done[key] = dict(row, output_dir="elsewhere")
    assert run(needs="pruned.keras") == dict(row, output_dir=str(output_dir))
    assert len(configs) == 1
    # A run not logged trains whatever its folder holds (a run cut short,
    # or rows set aside): the log says what is done.
    runner.run("scratch", "unpruned", 0.0, 1, {"rate": 0.0})
    assert len(configs) == 2 and configs[1].overwrite and configs[1].seed == 1


def test_rates_run_the_configurations_at_other_rates(tmp_path):
    assert accuracy.parse_rates(["0.5", "0.7"]) == (0.5, 0.7)
    assert accuracy.parse_rates([]) == ()
    for bad in (["0"], ["1.0"], ["half"], ["0.5", "-0.1"], ["0.35"]):
        with pytest.raises(ValueError, match=r"`--rates`.*Received: rates="):
            accuracy.parse_rates(bad)
    runner = accuracy.Runner("reduced", str(tmp_path))
    only = ["trained/unpruned", "trained/hard_once"]
    ordered, _ = accuracy._ordered_jobs(runner, [0], only, rates=(0.5, 0.7))
    assert ordered == [
        ("trained", "unpruned", 0.0, 0),
        ("trained", "hard_once", 0.5, 0),
        ("trained", "hard_once", 0.7, 0),
    ]
    # The tables count the runs planned by the setting and those logged at
    # other rates (not the sweep's: the setting plans them).
    assert accuracy._extra_runs(runner) == set()
    for row in (
        _row("scratch", "sfp_v1", 0.7, 0, 0.8),  # the sweep
        _row("trained", "hard_once", 0.5, 0, 0.8),
        _row("trained", "hard_once", 0.3, 0, 0.8),  # the setting's rate
    ):
        runner.done[runner.key(row["start"], row["name"], row["rate"], 0)] = row
    assert accuracy._extra_runs(runner) == {("trained", "hard_once", 0.5)}


def test_parallel_runs_know_logged_durations_and_survive_a_cut_line(
    tmp_path, monkeypatch, capsys
):
    # A resumed run: the log says a scratch job takes 500 s on this device.
    runner = accuracy.Runner("smoke", str(tmp_path))
    logged = {
        "key": "scratch/sfp_paper/r0.3/s0",
        "start": "scratch",
        "name": "sfp_paper",
        "wall_seconds": 500.0,
        "device": accuracy._device(),
    }
    with open(runner.log, "w") as f:
        f.write(json.dumps(logged) + "\n" + '{"key": "scratch/cut')  # killed
    runner.reload()
    assert list(runner.done) == [logged["key"]]
    monkeypatch.setattr(accuracy, "_init_for", lambda *args: None)
    monkeypatch.setattr(accuracy.tfmot_baseline, "missing", lambda: "tensorflow")
    started = []
    accuracy.run_parallel(
        runner,
        [0],
        3,
        100.0,
        [],
        ["scratch/sfp_v1", "trained/hard_once"],
        launch=lambda key, log: started.append(key),
        poll_s=0.001,
    )
    # No scratch job fits in 100 s; the trained one (no duration yet) would
    # start, but needs a scratch run that did not.
    assert started == []
    # sfp_v1 at 0.3 and 0.5, the scratch/unpruned hard_once needs, hard_once.
    assert "Deadline: 4 jobs not started" in capsys.readouterr().out


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
    (c,) = accuracy_report.tfmot_comparison(rows)
    np.testing.assert_allclose(c["tfmot_mean"], 82.0)
    np.testing.assert_allclose(c["sfp_mean"], 83.0)
    # Paired: (80 - 83, 84 - 83) -> mean -1, std of (-3, 1).
    np.testing.assert_allclose(c["diff_mean"], -1.0)
    np.testing.assert_allclose(c["diff_std"], np.std([-3, 1], ddof=1))
    np.testing.assert_allclose([c["gzip_kb"], c["sfp_gzip_kb"]], [2.0, 1.25])
    np.testing.assert_allclose([c["tflite_ms"], c["sfp_tflite_ms"]], [3.0, 1.25])
    table = accuracy_report.aggregate(rows, accuracy.ORDER)
    text = accuracy_report.markdown(
        table, "smoke", accuracy.SETTINGS["smoke"], "CPU", [c], reference="sfp_v1"
    )
    assert "| scratch | tfmot_plm | 0.3 | 2 | 82.00 +- 2.83 |" in text
    assert "against SFP's deployed model (sfp_v1)" in text
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


def test_tf_keras_batch_norm_is_re_estimated_as_keras_sfp_does():
    copy = tfmot_baseline.tf_keras_copy(_tiny_resnet())
    rng = np.random.default_rng(6)
    x = rng.normal(3.0, 2.0, (64, 12, 12, 1)).astype("float32")
    bn = next(
        layer
        for layer in copy.layers
        if isinstance(layer, tf_keras.layers.BatchNormalization)
    )
    features = np.asarray(tf_keras.Model(copy.inputs, bn.input)(x))
    # 64 rows in batches of 32: 2 batches of the 5 asked for.
    used = tfmot_baseline.recalibrate_batch_norm(copy, (x, np.zeros(64)), steps=5)
    assert used == 2
    np.testing.assert_allclose(
        np.asarray(bn.moving_mean), features.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    expected_variance = np.mean(
        [features[i : i + 32].var(axis=(0, 1, 2)) for i in (0, 32)], axis=0
    )
    np.testing.assert_allclose(
        np.asarray(bn.moving_variance), expected_variance, rtol=1e-3, atol=1e-5
    )
    assert bn.momentum == 0.9  # restored

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
    monkeypatch.setattr(
        accuracy, "_wanted", lambda params, start, name, only: name == accuracy.TFMOT
    )

    class Runner:
        params = accuracy.SETTINGS["smoke"]

        def run_tfmot(self, *args):
            raise AssertionError("ran without TensorFlow")

    accuracy.run_all(Runner(), seeds=[0])
    out = capsys.readouterr().out
    assert "Not run: scratch/tfmot_plm, trained/tfmot_plm" in out
    assert "no tensorflow" in out


def test_a_run_folder_of_other_settings_is_refused(tmp_path):
    accuracy.Runner("smoke", str(tmp_path))
    accuracy.Runner("smoke", str(tmp_path))  # the same setting: resumes
    path = tmp_path / "smoke" / "setting.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps(dict(stored, bn_momentum=0.9)))
    with pytest.raises(ValueError, match=r"bn_momentum differ: \{'bn_momentum': 0.9"):
        accuracy.Runner("smoke", str(tmp_path))
