"""Time keras-sfp's own work on ResNet50 at 224x224: analysis, a prune event, shrink.

Measures, on the machine it runs on (the target is a 2-core CPU), the median
over `--repeats` runs of each step:

- `analysis`: building the channel graph (`ChannelGraph(model)`);
- `prune_filters`: analysis plus cloning the model with wrapped layers;
- `prune_event`: one `SoftFilterPrune` event (scoring every group, writing
  masks, zeroing filters);
- `shrink`: stripping the wrappers and rebuilding the smaller model.

The budget for analysis + one prune event + shrink is 10 s; `total` counts
`prune_filters` (analysis and cloning) + `prune_event` + `shrink`.

    python -m bench.resnet50_speed --repeats=3
"""

from __future__ import annotations

import os
import statistics
import time

import keras
from absl import app, flags

import keras_sfp  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs; the median is reported.")


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run_once(model) -> dict:
    _, analysis = _timed(lambda: keras_sfp.ChannelGraph(model))
    pruned, prune_filters = _timed(lambda: keras_sfp.prune_filters(model, rate=0.3))
    _, event = _timed(lambda: keras_sfp.FilterPruner(pruned).prune(0))
    small, shrink = _timed(lambda: keras_sfp.shrink(pruned))
    return {
        "analysis": analysis,
        "prune_filters": prune_filters,
        "prune_event": event,
        "shrink": shrink,
        "total": prune_filters + event + shrink,
        "macs_kept": keras_sfp.count_flops(small) / keras_sfp.count_flops(model),
    }


def main(argv):
    del argv
    model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    runs = [run_once(model) for _ in range(_REPEATS.value)]
    print(f"ResNet50 224x224, {os.cpu_count()} CPUs, median of {len(runs)} runs")
    for key in runs[0]:
        values = [r[key] for r in runs]
        unit = "" if key == "macs_kept" else " s"
        print(
            f"{key:>14}: {statistics.median(values):.3f}{unit}  (all: "
            + ", ".join(f"{v:.3f}" for v in values)
            + ")"
        )


if __name__ == "__main__":
    app.run(main)
