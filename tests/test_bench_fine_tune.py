"""`bench.fine_tune_summary`: every rate's results in one table and plot."""

import json

import numpy as np

from bench import fine_tune_summary


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
