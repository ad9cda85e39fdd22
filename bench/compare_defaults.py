"""Compare SFP training options on the default run, to choose train.py's defaults.

Runs `train.train_and_evaluate` once per option set (same model, data, epochs
and seed) and prints a Markdown table of the soft-masked accuracy (the paper's
figure), the shrunk model's accuracy (what is deployed), the MACs kept and the
wall time. Long: about 8-10 minutes per option set on a 2-core CPU.

    python bench/compare_defaults.py --options=paper,hard1,asfp_hard1 \
        --table=bench/results/defaults.md
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

OPTIONS = {
    "unpruned": {"rate": 0.0, "hard_epochs": 0},
    "paper": {"hard_epochs": 0, "schedule": "constant"},
    "hard1": {"hard_epochs": 1, "schedule": "constant"},
    "asfp": {"hard_epochs": 0, "schedule": "asymptotic"},
    "asfp_hard1": {"hard_epochs": 1, "schedule": "asymptotic"},
    "layer_hard1": {"hard_epochs": 1, "coupling": "layer"},
}

_OPTIONS = flags.DEFINE_list("options", ["paper", "hard1", "asfp_hard1"], "Sets.")
_OUTPUT = flags.DEFINE_string("table", None, "Also write the table here.")


def main(argv):
    del argv
    rows = []
    for name in _OPTIONS.value:
        overrides = dict(OPTIONS[name])
        config = dataclasses.replace(
            train.TrainConfig(),
            output_dir=os.path.join("runs", "compare_defaults", name),
            verbose=2,
            **overrides,
        )
        start = time.perf_counter()
        results = train.train_and_evaluate(config)
        rows.append((name, overrides, results, time.perf_counter() - start))
        print(json.dumps({"option": name, **{k: v for k, v in overrides.items()}}))
    lines = [
        "| option | settings | soft-masked acc | shrunk acc | MACs kept | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, overrides, results, seconds in rows:
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items())
        lines.append(
            f"| {name} | {settings} | {results['soft_masked']['accuracy']:.4f} | "
            f"{results['shrunk']['accuracy']:.4f} | "
            f"{results['kept_mac_fraction']:.3f} | {seconds:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
