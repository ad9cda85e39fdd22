"""Every rate of `bench.fine_tune` in one table and one plot.

Reads `bench/results/fine_tune_<setting>.json` and its `_r<rate>` siblings
(written by `python -m bench.fine_tune [--rate=...]`) and writes
`bench/results/fine_tune_<setting>_summary.{md,png}`: per recipe and rate,
the MACs kept, the deployed test accuracy and its paired difference from
the same seed's unpruned fine-tune (mean +- std over seeds), and the median
wall time of a fine-tune; the plot shows deployed accuracy against MACs
kept, and the wall time of each recipe.

    python -m bench.fine_tune_summary
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
from absl import app, flags

from bench import tables

_SETTING = flags.DEFINE_string("summary_setting", "reduced", "The setting to gather.")
_RESULTS = "bench/results"


def gather(setting: str, results: str = _RESULTS) -> dict:
    """`{rate: {"recipes": ..., "runs": ...}}` from every results file of
    `setting` (`recipes` in `bench.fine_tune.RECIPES`'s order)."""
    by_rate = {}
    for path in sorted(glob.glob(os.path.join(results, f"fine_tune_{setting}*.json"))):
        suffix = os.path.basename(path)[len(f"fine_tune_{setting}") : -len(".json")]
        if suffix and not re.fullmatch(r"_r[0-9.]+", suffix):
            continue  # another setting, or other fine-tune epochs
        rate = float(suffix[2:]) if suffix else 0.3
        with open(path) as f:
            by_rate[rate] = json.load(f)
    return by_rate


def summarise(by_rate: dict) -> list[dict]:
    """One entry per (recipe, rate) with seeds, in `bench.fine_tune.RECIPES`
    order (as each results file lists its recipes), each paired with the
    unpruned fine-tune of its seed and start (`tables.paired_differences`)."""
    entries = []
    names = dict.fromkeys(n for data in by_rate.values() for n in data["recipes"])
    for name in names:
        for rate in sorted(by_rate):
            rows = by_rate[rate]["runs"]
            runs = [r for r in rows if r["recipe"] == name]
            if not runs or (name == "unpruned" and rate != min(by_rate)):
                continue
            base = [r for r in rows if r["recipe"] == "unpruned"]
            paired = tables.paired_differences(runs, base)
            deployed = 100 * np.array([r["deployed"] for r in runs])
            entries.append(
                {
                    "recipe": name,
                    "rate": 0.0 if name == "unpruned" else rate,
                    "seeds": len(runs),
                    "kept_macs": 100 * float(np.mean([r["kept_macs"] for r in runs])),
                    "deployed": deployed,
                    "paired": 100 * np.array(paired),
                    "seconds": float(np.median([r["seconds"] for r in runs])),
                }
            )
    return entries


def _stats(values) -> str:
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} +- {std:.2f}"


def write(entries: list[dict], path: str, title: str) -> None:
    """The markdown table at `path.md` and the plot at `path.png`."""
    cells = [
        [
            e["recipe"],
            f"{e['rate']:g}",
            e["seeds"],
            f"{e['kept_macs']:.1f} %",
            _stats(e["deployed"]),
            _stats(e["paired"]) if len(e["paired"]) else "-",
            f"{e['seconds']:.0f}",
        ]
        for e in entries
    ]
    columns = ["recipe", "rate", "seeds", "MACs kept", "deployed (test)"]
    columns += ["paired vs unpruned", "median seconds"]
    lines = [title, "", *tables.markdown_table(columns, cells)]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(entries, path + ".png", title)
    print("\n".join(lines))


def _plot(entries: list[dict], path: str, title: str) -> None:
    import matplotlib  # noqa: PLC0415 (optional dependency, bench only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(e["recipe"] for e in entries))
    colors = plt.get_cmap("tab20")
    floor = 75.0  # the collapse rows would flatten the rest: named below it
    below = []
    for i, name in enumerate(names):
        mine = sorted(
            (e for e in entries if e["recipe"] == name), key=lambda e: e["rate"]
        )
        x = [e["kept_macs"] for e in mine]
        y = [e["deployed"].mean() for e in mine]
        err = [e["deployed"].std(ddof=1) if e["seeds"] > 1 else 0.0 for e in mine]
        below += [f"{name} {v:.1f}" for v in y if v < floor]
        marker = "*" if name == "unpruned" else "o-"
        left.errorbar(
            x, y, yerr=err, fmt=marker, capsize=3, label=name, color=colors(i)
        )
    left.set_ylim(floor, None)
    if below:
        left.text(
            0.02,
            0.02,
            "below the axis: " + ", ".join(below),
            transform=left.transAxes,
            fontsize=7,
        )
    left.set_xlabel("MACs kept (%)")
    left.set_ylabel("deployed test accuracy (%)")
    left.set_title("Accuracy against MACs (mean +- std over seeds)")
    left.legend(fontsize=7)
    first = {}
    for e in entries:  # wall time at the first rate each recipe ran
        first.setdefault(e["recipe"], e)
    right.barh(list(first), [e["seconds"] for e in first.values()], color="C0")
    right.invert_yaxis()
    right.set_xlabel("median wall time of a fine-tune (s, 2 CPU cores)")
    right.set_title("Cost of each recipe (first rate it ran)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv) -> None:
    del argv
    setting = _SETTING.value
    entries = summarise(gather(setting))
    title = (
        f"bench.fine_tune, setting {setting!r}: a trained ResNet-20 pruned at each "
        "rate and fine-tuned 2 epochs; accuracy in %, paired against the same "
        "seed's unpruned fine-tune."
    )
    write(entries, os.path.join(_RESULTS, f"fine_tune_{setting}_summary"), title)


if __name__ == "__main__":
    app.run(main)
