"""`bench.fine_tune`'s bookkeeping (which network runs start from, run
folders) and `bench.fine_tune_summary`: every rate's results in one table
and plot."""

import json

import keras
import numpy as np
import pytest

from bench import fine_tune, fine_tune_summary, tables


def _runs(recipe, deployed, macs, seconds=10.0):
    return [
        {"recipe": recipe, "seed": seed, "deployed": d, "kept_macs": macs}
        | {"seconds": seconds}
        for seed, d in enumerate(deployed)
    ]


def test_every_rate_is_paired_with_its_seeds_unpruned_fine_tune(tmp_path):
    unpruned = _runs("unpruned", [0.90, 0.80], 1.0)
    files = {
        "fine_tune_reduced.json": unpruned + _runs("global_recal", [0.89, 0.81], 0.52),
        "fine_tune_reduced_r0.5.json": unpruned
        + _runs("global_recal", [0.85, 0.79], 0.25, seconds=30.0),
        # Another setting whose name starts the same way, and other
        # fine-tune epochs: not gathered.
        "fine_tune_reduced_long.json": _runs("global_recal", [0.1], 0.5),
        "fine_tune_reduced_r0.5_e6.json": _runs("global_recal", [0.1], 0.25),
    }
    for name, runs in files.items():
        recipes = dict.fromkeys(r["recipe"] for r in runs)
        (tmp_path / name).write_text(json.dumps({"recipes": recipes, "runs": runs}))
    by_rate = fine_tune_summary.gather("reduced", str(tmp_path))
    assert sorted(by_rate) == [0.3, 0.5]
    entries = fine_tune_summary.summarise(by_rate)
    # The unpruned fine-tune once, then the recipe at each rate.
    assert [(e["recipe"], e["rate"]) for e in entries] == [
        ("unpruned", 0.0),
        ("global_recal", 0.3),
        ("global_recal", 0.5),
    ]
    np.testing.assert_allclose(entries[1]["paired"], [-1.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(entries[2]["paired"], [-5.0, -1.0], atol=1e-9)
    assert entries[2]["kept_macs"] == 25.0 and entries[2]["seconds"] == 30.0
    path = str(tmp_path / "summary")
    fine_tune_summary.write(entries, path, "title")
    text = (tmp_path / "summary.md").read_text()
    assert (
        "| global_recal | 0.5 | 2 | 25.0 % | 82.00 +- 4.24 | -3.00 +- 2.83 | 30 |"
        in text
    )
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_pair_only_with_baselines_that_started_from_the_same_network():
    # Seed 0's unpruned fine-tune was run again from another trained network
    # (another machine): the run that started from the old one does not
    # pair with it; rows that log no network pair with each other.
    baselines = [
        {"seed": 0, "deployed": 0.90, "trained": "new"},
        {"seed": 1, "deployed": 0.80},
    ]
    runs = [
        {"seed": 0, "deployed": 0.85, "trained": "old"},
        {"seed": 0, "deployed": 0.88, "trained": "new"},
        {"seed": 1, "deployed": 0.83},
        {"seed": 2, "deployed": 0.83},
    ]
    np.testing.assert_allclose(
        tables.paired_differences(runs, baselines), [-0.02, 0.03], atol=1e-12
    )


def test_a_start_network_other_than_the_logged_runs_is_refused(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    value = fine_tune.fingerprint(model, 0)
    assert len(value) == 16 and fine_tune.fingerprint(model, 0) == value
    logged = [{"seed": 0, "trained": value}, {"seed": 1, "trained": "0123"}]
    assert fine_tune.fingerprint(model, 0, logged + [{"seed": 0}]) == value
    model.layers[-1].bias.assign([1.0, 0.0])
    changed = fine_tune.fingerprint(model, 1)
    assert changed != value
    with pytest.raises(ValueError, match=rf"Seed 0's .*\({changed}\).*\({value}\)"):
        fine_tune.fingerprint(model, 0, logged)
    # A start file that is gone is not trained again while runs of its
    # seed are logged (before any training: x and y are not even data).
    path = str(tmp_path / "trained_s0.keras")
    with pytest.raises(ValueError, match="is gone, but the log holds 1 runs of seed 0"):
        fine_tune.trained_network(path, 0, None, None, 1, logged=logged)
    model.save(path)
    loaded = fine_tune.trained_network(path, 0, None, None, 1, logged=logged)
    assert fine_tune.fingerprint(loaded, 1) == changed


def test_run_folders_keep_settings_tags_rates_and_epochs_apart():
    names = {
        fine_tune._name("reduced", 0.3),
        fine_tune._name("reduced", 0.5),
        fine_tune._name("reduced", 0.3, 6),
        fine_tune._name("reduced", 0.3, tag="amd"),
        fine_tune._name("reduced", 0.5, 6, tag="amd"),
    }
    assert names == {
        "reduced",
        "reduced_r0.5",
        "reduced_e6",
        "reduced_amd",
        "reduced_amd_r0.5_e6",
    }
