"""The accuracy benchmark's tables and plot (`bench/accuracy.py` runs it).

From the logged runs (one dict per run: `start`, `name`, `rate`, `seed`,
`deployed` and `soft_masked` accuracy, `kept_macs`, `revived`, `seconds`):
mean and standard deviation over seeds, paired differences from baselines,
the tfmot comparison, the markdown report and the accuracy-against-MACs plot.
"""

from __future__ import annotations

import numpy as np

from bench import tables
from bench.tfmot_baseline import NAME as TFMOT
from keras_sfp.training import config as config_lib


def aggregate(rows, order) -> list[dict]:
    """Mean and std over seeds per (start, configuration, rate); rows sorted
    by start, rate and `order[start]` (the configurations' names)."""
    groups = {}
    for row in rows:
        rate = 0.0 if row["name"] == "unpruned" else row["rate"]
        groups.setdefault((row["start"], row["name"], rate), []).append(row)
    table = []
    for (start, name, rate), members in groups.items():
        deployed = np.array([m["deployed"] for m in members]) * 100
        soft = np.array([m["soft_masked"] for m in members]) * 100
        # Filters brought back, summed over the run's logged events.
        revived = [float(np.sum(m["revived"])) for m in members]
        table.append(
            {
                "start": start,
                "name": name,
                "rate": rate,
                "seeds": len(members),
                "deployed_mean": float(deployed.mean()),
                "deployed_std": float(deployed.std(ddof=1))
                if len(members) > 1
                else 0.0,
                "soft_mean": float(soft.mean()),
                "gap": float((soft - deployed).mean()),
                "kept_macs": float(np.mean([m["kept_macs"] for m in members])),
                "revived": float(np.mean(revived)),
                "seconds": float(np.mean([m["seconds"] for m in members])),
            }
        )
    table.sort(
        key=lambda r: (
            r["start"] != "scratch",
            r["rate"],
            order[r["start"]].index(r["name"]),
        )
    )
    return table


def _mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def tfmot_comparison(rows) -> list[dict]:
    """`prune_low_magnitude` against its SFP reference, per start and rate.

    Each tfmot run is paired with the `REFERENCE` run it took its non-zero
    count from (same start, rate and seed): accuracies in %, the paired
    difference (tfmot - SFP) with its standard deviation over seeds, non-zero
    kernel weights, gzipped float TFLite sizes in KB and batch-1 TFLite
    milliseconds (medians, timed alternately, averaged over seeds).
    """
    rows = list(rows)
    by_key = {row["key"]: row for row in rows}
    groups = {}
    for row in rows:
        if row["name"] == TFMOT:
            reference = by_key[row["options"]["reference"]]
            groups.setdefault((row["start"], row["rate"]), []).append((row, reference))
    table = []
    for (start, rate), pairs in sorted(
        groups.items(), key=lambda g: g[0][0] != "scratch"
    ):
        ours = [100 * t["deployed"] for t, _ in pairs]
        theirs = [100 * r["deployed"] for _, r in pairs]
        tfmot_mean, tfmot_std = _mean_std(ours)
        sfp_mean, sfp_std = _mean_std(theirs)
        diff_mean, diff_std = _mean_std(np.subtract(ours, theirs))
        table.append(
            {
                "start": start,
                "rate": rate,
                "seeds": len(pairs),
                "tfmot_mean": tfmot_mean,
                "tfmot_std": tfmot_std,
                "sfp_mean": sfp_mean,
                "sfp_std": sfp_std,
                "diff_mean": diff_mean,
                "diff_std": diff_std,
                "nonzero": float(np.mean([t["nonzero"] for t, _ in pairs])),
                "target_nonzero": float(
                    np.mean([t["target_nonzero"] for t, _ in pairs])
                ),
                "sparsity": float(np.mean([t["sparsity"] for t, _ in pairs])),
                "gzip_kb": float(np.mean([t["gzip_bytes"] for t, _ in pairs])) / 1024,
                "sfp_gzip_kb": float(np.mean([t["ref_gzip_bytes"] for t, _ in pairs]))
                / 1024,
                "tflite_kb": float(np.mean([t["tflite_bytes"] for t, _ in pairs]))
                / 1024,
                "sfp_tflite_kb": float(
                    np.mean([t["ref_tflite_bytes"] for t, _ in pairs])
                )
                / 1024,
                "tflite_ms": float(np.mean([t["tflite_ms"] for t, _ in pairs])),
                "sfp_tflite_ms": float(np.mean([t["ref_tflite_ms"] for t, _ in pairs])),
                "sfp_kept_macs": float(np.mean([r["kept_macs"] for _, r in pairs])),
            }
        )
    return table


def paired_differences(rows, baselines, order) -> list[dict]:
    """Each configuration minus its baselines, seed by seed, in points.

    `baselines[start]` names each start's baselines (the benchmark's: from
    scratch `scratch_arch`, at equal MACs and the same rate, and the unpruned
    network; from a trained network `hard_once` and the fine-tuned unpruned
    network). Mean and sample standard deviation
    of the paired differences over the seeds both ran.
    """
    by_key = {}
    for row in rows:
        rate = 0.0 if row["name"] == "unpruned" else row["rate"]
        by_key[row["start"], row["name"], rate, tables.pairing(row)] = row
    groups = {}
    for (start, name, rate, pair), row in by_key.items():
        if name in ("unpruned", TFMOT):
            continue
        for baseline in baselines[start]:
            other = by_key.get(
                (start, baseline, 0.0 if baseline == "unpruned" else rate, pair)
            )
            if name != baseline and other is not None:
                difference = 100 * (row["deployed"] - other["deployed"])
                groups.setdefault((start, name, rate, baseline), []).append(difference)
    table = []
    for (start, name, rate, baseline), differences in sorted(
        groups.items(),
        key=lambda g: (
            g[0][0] != "scratch",
            g[0][2],
            g[0][3] == "unpruned",
            order[g[0][0]].index(g[0][1]),
        ),
    ):
        mean, std = _mean_std(differences)
        table.append(
            {
                "start": start,
                "name": name,
                "rate": rate,
                "baseline": baseline,
                "seeds": len(differences),
                "mean": mean,
                "std": std,
            }
        )
    return table


def _paired_markdown(paired) -> list[str]:
    lines = [
        "",
        "## Paired differences",
        "",
        "Deployed accuracy minus the baseline's, seed by seed (same initial or "
        "trained weights), in points: mean +- standard deviation over the seeds "
        "both ran.",
        "",
        "| start | configuration | rate | baseline | seeds | difference |",
        "|---|---|---:|---|---:|---:|",
    ]
    for p in paired:
        lines.append(
            f"| {p['start']} | {p['name']} | {p['rate']:.1f} | {p['baseline']} | "
            f"{p['seeds']} | {p['mean']:+.2f} +- {p['std']:.2f} |"
        )
    return lines


def _comparison_markdown(comparison, reference) -> list[str]:
    lines = [
        "",
        f"## `prune_low_magnitude` (tfmot) against SFP's deployed model ({reference})",
        "",
        "tfmot prunes a `tf_keras` copy of the same network (same initial or "
        "trained weights, same recipe) to the non-zero kernel weights (convolutions "
        "and dense layer) of the SFP model it is paired with. Sizes: the float "
        "TFLite file, raw and gzipped (level 9); latency: median of batch-1 "
        "TFLite calls, the two models timed alternately in one process. The "
        "stripped tfmot model keeps every MAC of the dense network.",
        "",
        "| start | rate | seeds | tfmot acc | SFP acc | tfmot - SFP | non-zero "
        "(tfmot / SFP) | sparsity | TFLite KB (tfmot / SFP) | gzipped KB "
        "(tfmot / SFP) | TFLite ms (tfmot / SFP) | MACs kept (tfmot / SFP) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in comparison:
        lines.append(
            f"| {c['start']} | {c['rate']:.1f} | {c['seeds']} | "
            f"{c['tfmot_mean']:.2f} +- {c['tfmot_std']:.2f} | "
            f"{c['sfp_mean']:.2f} +- {c['sfp_std']:.2f} | "
            f"{c['diff_mean']:+.2f} +- {c['diff_std']:.2f} | "
            f"{c['nonzero']:.0f} / {c['target_nonzero']:.0f} | "
            f"{100 * c['sparsity']:.1f}% | "
            f"{c['tflite_kb']:.0f} / {c['sfp_tflite_kb']:.0f} | "
            f"{c['gzip_kb']:.0f} / {c['sfp_gzip_kb']:.0f} | "
            f"{c['tflite_ms']:.3f} / {c['sfp_tflite_ms']:.3f} | "
            f"100% / {100 * c['sfp_kept_macs']:.1f}% |"
        )
    return lines


def markdown(
    table,
    setting,
    params,
    device,
    comparison=(),
    paired=(),
    planned=None,
    reference="",
) -> str:
    """The markdown report; `reference` names the SFP configuration the
    tfmot runs of `comparison` are paired with."""
    logged = sum(r["seeds"] for r in table)
    lines = [
        f"# Accuracy at equal MACs ({setting} setting, {device})",
        "",
        f"ResNet-20, Fashion-MNIST, {params['train_limit'] or 'all'} training and "
        f"{params['test_limit'] or 'all'} test images; from scratch "
        f"{params['epochs']} epochs at lr {config_lib.LEARNING_RATE}, from a trained "
        f"network {params['finetune_epochs']} epochs at lr "
        f"{config_lib.FINE_TUNE_LEARNING_RATE} (cosine). Accuracy in %, mean +- "
        "standard deviation over seeds. `revived`: filters pruned at one event and "
        "kept at the next, summed over the run (the churn of the pruned set)."
        + (
            f" Runs: {logged} of the {planned} of every configuration."
            if planned
            else ""
        ),
        "",
        "| start | configuration | rate | seeds | deployed acc | soft-masked acc "
        "| soft - deployed | MACs kept | revived | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['start']} | {r['name']} | {r['rate']:.1f} | {r['seeds']} | "
            f"{r['deployed_mean']:.2f} +- {r['deployed_std']:.2f} | "
            f"{r['soft_mean']:.2f} | {r['gap']:+.2f} | {100 * r['kept_macs']:.1f}% | "
            f"{r['revived']:.1f} | {r['seconds']:.0f} |"
        )
    if paired:
        lines += _paired_markdown(paired)
    if comparison:
        lines += _comparison_markdown(comparison, reference)
    return "\n".join(lines) + "\n"


def plot(table, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = ("scratch", "trained")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, start in zip(axes, starts):
        names = sorted({r["name"] for r in table if r["start"] == start})
        for name in names:
            rows = sorted(
                (r for r in table if r["start"] == start and r["name"] == name),
                key=lambda r: r["kept_macs"],
            )
            x = [100 * r["kept_macs"] for r in rows]
            y = [r["deployed_mean"] for r in rows]
            e = [r["deployed_std"] for r in rows]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
        # Collapsed runs would flatten the rest: the axis shows the top 8
        # points and names what falls below it.
        values = [r["deployed_mean"] for r in table if r["start"] == start]
        if values and max(values) - min(values) > 8:
            floor = max(values) - 8
            ax.set_ylim(bottom=floor, top=max(values) + 1)
            below = sorted(
                {
                    f"{r['name']} {100 * r['kept_macs']:.0f}%"
                    for r in table
                    if r["start"] == start and r["deployed_mean"] < floor
                }
            )
            ax.text(
                0.01,
                0.01,
                "below the axis: " + ", ".join(below),
                transform=ax.transAxes,
                fontsize=7,
                wrap=True,
            )
        ax.set_title(
            f"from {start}" if start == "scratch" else "from a trained network"
        )
        ax.set_xlabel("MACs kept (%)")
        ax.set_ylabel("deployed test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
