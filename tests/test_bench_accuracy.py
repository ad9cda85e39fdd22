"""The accuracy benchmark's bookkeeping: job order, statistics, table, plot."""

import numpy as np

import keras_sfp
import models
from bench import accuracy


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
    }


def test_uniform_width_matches_the_requested_macs_fraction():
    width = accuracy._width_for(0.5, (28, 28, 1), 10)
    full = models.cifar_resnet(20, (28, 28, 1), 10)
    narrow = models.cifar_resnet(20, (28, 28, 1), 10, width=width)
    fraction = keras_sfp.count_flops(narrow) / keras_sfp.count_flops(full)
    assert abs(fraction - 0.5) < 0.03
