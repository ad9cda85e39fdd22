"""Per-layer latency lookup tables and the latency of candidate channel counts.

The approach of NVIDIA's HALP (Shen et al., NeurIPS 2022): instead of
trusting MACs, time each convolution or dense layer of the model, alone, at a
grid of input and output channel counts on the device and runtime the model
will run on, and predict the latency of a pruned model as the sum of its
layers' interpolated entries. Measuring is slow (a compilation and a few
timed calls per entry), so the entries are cached in a JSON file per device
and runtime (`LatencyTable.for_device`) and measured only when missing.

A table knows the device and runtime it was measured on. Entries of a table
from another device (a phone's, say) can be used, but missing ones cannot be
measured here: that raises instead of mixing two devices' timings.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence

import keras
import numpy as np

from keras_sfp import _checks
from keras_sfp.core.wrapper import unwrap
from keras_sfp.latency import timing as latency

# Configuration keys that do not change how long a layer takes.
_IGNORED = {
    "name",
    "filters",
    "units",
    "trainable",
    "dtype",
    "kernel_initializer",
    "bias_initializer",
    "depthwise_initializer",
    "pointwise_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "depthwise_regularizer",
    "pointwise_regularizer",
    "kernel_constraint",
    "bias_constraint",
    "depthwise_constraint",
    "pointwise_constraint",
    "lora_rank",
    "lora_alpha",
    "quantization_config",
}

Timer = Callable[[keras.layers.Layer, tuple], float]


def runtime_name() -> str:
    """The runtime the current process times: `keras-<backend>`."""
    return f"keras-{keras.backend.backend()}"


def _time_layer(layer: keras.layers.Layer, input_shape: tuple, runs: int) -> float:
    """Milliseconds `layer` adds to a compiled call on a random batch.

    The layer and an identity model on the same batch are timed alternately
    (`keras_sfp.latency.timing`), and the identity's time is subtracted: a compiled
    call costs a fixed dispatch time (tenths of a millisecond on a CPU) that
    a whole model pays once, not once per layer, and that pruning does not
    change. Both are each one's fastest call: the two times can be close
    (a 37M-MAC convolution takes half a millisecond on a modern CPU), and
    on a busy machine a median can take a stall of the identity's calls
    for a difference, and a large layer measure as free.
    """
    inputs = keras.Input(batch_shape=input_shape)
    model = keras.Model(inputs, layer(inputs))
    identity = keras.Model(inputs, keras.layers.Identity()(inputs))
    batch = np.random.default_rng(0).random(input_shape, dtype=np.float32)
    times = latency.time_alternately(
        {
            "layer": latency.keras_runner(model, batch),
            "identity": latency.keras_runner(identity, batch),
        },
        runs=runs,
        warmup=2,
        statistic="min",
    )
    return max(times["layer"] - times["identity"], 0.0)


def _check_time(value, what: str) -> None:
    """A ValueError unless `value` is a finite number of milliseconds >= 0."""
    try:
        ok = math.isfinite(float(value)) and float(value) >= 0.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"Latency table times must be finite milliseconds >= 0. "
            f"Received: {value!r} from {what}"
        )


class LayerSpec:
    """One layer call of a model, with its channel counts left free.

    Args:
        layer: A convolution or dense layer (wrappers are unwrapped).
        input_shape: The call's input shape; its batch size is replaced by
            the table's.
    """

    def __init__(self, layer: keras.layers.Layer, input_shape: Sequence):
        layer = unwrap(layer)
        self.cls = type(layer)
        config = layer.get_config()
        cin = int(input_shape[-1])
        # Depthwise convolutions (and depthwise-form grouped Conv2D, which
        # `shrink` keeps depthwise): the output count follows the input's.
        groups = config.get("groups", 1)
        depthwise = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
        self.tied = isinstance(layer, depthwise) or (
            1 < groups == cin == config.get("filters")
        )
        self.step = 1 if self.tied else groups  # input counts divide by groups
        self.config = config
        self.spatial = tuple(int(d) for d in input_shape[1:-1])
        self.key = json.dumps(
            {
                "class": self.cls.__name__,
                "config": {k: v for k, v in config.items() if k not in _IGNORED},
                "input": self.spatial,
            },
            sort_keys=True,
            default=str,
        )

    def build(self, cin: int, cout: int | None) -> keras.layers.Layer:
        """A fresh layer of this kind for `cin` inputs and `cout` outputs."""
        config = dict(self.config, name=None)
        config.pop("name")
        if self.tied and "groups" in config:
            config.update(groups=cin, filters=cin)
        elif "filters" in config:
            config["filters"] = cout
        elif "units" in config:
            config["units"] = cout
        return self.cls.from_config(config)


class LatencyTable:
    """Milliseconds of single layers at given channel counts, on one device.

    Args:
        path: The JSON file the table is saved to and loaded from, or None
            for a table kept in memory. Defaults to None.
        batch_size: The batch size the layers are timed at (an integer
            >= 1). Defaults to 1.
        device: The device the entries were measured on. Defaults to the
            current backend's (`keras_sfp.latency.timing.device_name()`).
        runtime: The runtime they were measured with. Defaults to
            `keras-<current backend>`.
        runs: Timed calls per entry. Defaults to 20.
        timer: `(layer, input_shape) -> milliseconds`, replacing the default
            measurement (a compiled call of the layer alone, timed by
            `keras_sfp.latency.timing`). Defaults to None.

    Example:
    >>> table = LatencyTable(timer=lambda layer, shape: 0.01 * shape[-1])
    >>> spec = LayerSpec(keras.layers.Conv2D(8, 3), (1, 8, 8, 4))
    >>> table.lookup(spec, 16, 8), table.measured
    (0.16, 1)
    """

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 1,
        device: str | None = None,
        runtime: str | None = None,
        runs: int = 20,
        timer: Timer | None = None,
    ):
        _checks.int_at_least("batch_size", batch_size, 1)
        _checks.int_at_least("runs", runs, 1)
        self.path = path
        self.batch_size = batch_size
        self.device = latency.device_name() if device is None else str(device)
        self.runtime = runtime_name() if runtime is None else str(runtime)
        self.runs = runs
        self.timer = timer
        self.entries: dict[str, float] = {}
        self.measured = 0  # entries measured by this object

    @classmethod
    def for_device(
        cls, cache_dir: str | None = None, batch_size: int = 1, **kwargs
    ) -> LatencyTable:
        """The cached table of the current device and runtime (loaded or new).

        Args:
            cache_dir: Where tables are cached. Defaults to
                `$KERAS_SFP_CACHE/latency`, or `~/.cache/keras_sfp/latency`.
            batch_size: The batch size. Defaults to 1.
            **kwargs: Passed to `LatencyTable`.
        """
        if cache_dir is None:
            root = os.environ.get("KERAS_SFP_CACHE") or os.path.join(
                os.path.expanduser("~"), ".cache", "keras_sfp"
            )
            cache_dir = os.path.join(root, "latency")
        runtime = kwargs.pop("runtime", None) or runtime_name()
        device = kwargs.pop("device", None) or latency.device_name()
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{runtime}_{device}_b{batch_size}")
        path = os.path.join(cache_dir, name + ".json")
        if os.path.exists(path):
            return cls.load(path, **kwargs)
        return cls(path, batch_size, device, runtime, **kwargs)

    @classmethod
    def load(cls, path: str, **kwargs) -> LatencyTable:
        """Reads a table written by `save`.

        Raises:
            ValueError: If the file is not such a table (corrupt, truncated,
                or with entries that are not finite non-negative times).
        """
        try:
            with open(path) as f:
                data = json.load(f)
            batch_size = int(data["batch_size"])
            device, runtime = str(data["device"]), str(data["runtime"])
            entries = {str(k): float(v) for k, v in data["entries"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"`path` is not a latency table written by LatencyTable.save "
                f"({type(error).__name__}: {error}); delete it to measure the "
                f"table again. Received: path={path!r}"
            ) from None
        for key, value in entries.items():
            _check_time(value, f"entry {key!r} of {path!r}")
        table = cls(path, batch_size, device, runtime, **kwargs)
        table.entries = entries
        return table

    def save(self, path: str | None = None) -> str:
        """Writes the table as JSON (to `path`, or the table's own) atomically."""
        path = path or self.path
        if path is None:
            raise ValueError(
                "`path` is needed to save a table created without one. "
                "Received: path=None"
            )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        data = {
            "device": self.device,
            "runtime": self.runtime,
            "batch_size": self.batch_size,
            "entries": dict(sorted(self.entries.items())),
        }
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump(data, f, indent=0)
        os.replace(temporary, path)
        self.path = path
        return path

    def is_local(self) -> bool:
        """Whether the table's device and runtime are this process's."""
        return (self.device, self.runtime) == (latency.device_name(), runtime_name())

    def lookup(self, spec: LayerSpec, cin: int, cout: int | None) -> float:
        """Milliseconds of `spec` at `cin` -> `cout` channels, measured if new."""
        cout = None if spec.tied else int(cout)
        key = f"{spec.key}|b{self.batch_size}|{int(cin)}|{cout}"
        if key not in self.entries:
            if self.timer is None and not self.is_local():
                raise ValueError(
                    f"`latency_table` was measured on {self.device} "
                    f"({self.runtime}) and lacks an entry this model needs; it "
                    f"cannot be measured on {latency.device_name()} "
                    f"({runtime_name()}). Measure the table on its device with "
                    f"this model first. Received: latency_table at {self.path!r}"
                )
            shape = (self.batch_size, *spec.spatial, int(cin))
            layer = spec.build(int(cin), cout)
            if self.timer is not None:
                value = self.timer(layer, shape)
                _check_time(value, f"`timer` for {spec.cls.__name__} at {shape}")
            else:
                value = _time_layer(layer, shape, self.runs)
            self.entries[key] = float(value)
            self.measured += 1
        return self.entries[key]
