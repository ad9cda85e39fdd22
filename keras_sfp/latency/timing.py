"""Inference latency: compiled calls on the current backend, timed alternately.

Every latency figure keras-sfp reports comes from `time_alternately`: after
untimed warm-up calls, the candidates are called in turn, so a slow phase of a
shared machine hits them alike, and the median of each one's times is
reported. `keras_runner` prepares one Keras model for it the way the current
backend runs a model fastest: a `tf.function` on TensorFlow; on JAX a jitted
`stateless_call` on device-resident inputs, blocking on the result; on
PyTorch a call under `torch.no_grad()` on a tensor already on the device,
synchronising CUDA. Artifact runners (SavedModel, TFLite) from
`keras_sfp.export.measure` are timed the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np

from keras_sfp import _checks


def device_name() -> str:
    """The device the current backend computes on: "CPU" or the accelerator.

    Example:
    >>> isinstance(device_name(), str)
    True
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return "CPU" if device.platform == "cpu" else device.device_kind
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return "GPU" if gpus else "CPU"
    return "CPU"


STATISTICS = {"median": np.median, "min": np.min}


def time_alternately(
    runners: Mapping[Any, Callable[[], Any]],
    runs: int,
    warmup: int = 5,
    statistic: str = "median",
) -> dict[Any, float]:
    """Milliseconds of one call of each runner, timed in alternation.

    Args:
        runners: `{key: callable}`; each callable runs one inference and
            returns only when its result is complete (see `keras_runner`).
        runs: Timed calls per runner (>= 1).
        warmup: Untimed calls per runner first (compilation included), >= 0.
            Defaults to 5.
        statistic: How each runner's `runs` times are summarised: "median"
            (the default; what the reports give) or "min" (the call least
            disturbed by other work on the machine, since noise only adds
            time: used where two small times are subtracted).

    Returns:
        `{key: milliseconds per call}`.

    Raises:
        ValueError: If `runs`, `warmup` or `statistic` is out of range.

    Example:
    >>> times = time_alternately({"a": lambda: None, "b": lambda: None}, runs=3)
    >>> sorted(times), all(t >= 0 for t in times.values())
    (['a', 'b'], True)
    """
    _checks.int_at_least("runs", runs, 1)
    _checks.int_at_least("warmup", warmup, 0)
    if statistic not in STATISTICS:
        raise ValueError(
            f"`statistic` must be one of {sorted(STATISTICS)}. "
            f"Received: statistic={statistic!r}"
        )
    summarise = STATISTICS[statistic]
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {key: [] for key in runners}
    for _ in range(runs):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return {key: 1000.0 * float(summarise(t)) for key, t in times.items()}


def compiled_predict(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """`images -> NumPy outputs` through a compiled inference call of `model`.

    `model(images, training=False)` compiled for the current backend (a
    `tf.function`, a `jax.jit` of `stateless_call` with the variables' values
    at the time of this call; PyTorch runs eagerly under `torch.no_grad()`).
    One compilation per input shape.

    Args:
        model: A Keras model with one output.

    Returns:
        The function.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # Batches of several sizes (accuracy, then latency) share one trace.
        function = tf.function(
            lambda x: model(x, training=False), reduce_retracing=True
        )
        return lambda images: function(tf.constant(images)).numpy()
    if backend == "jax":
        forward = _jax_forward(model)
        return lambda images: np.asarray(forward(images))
    if backend == "torch":
        import torch

        def run(images):
            with torch.no_grad():
                return keras.ops.convert_to_numpy(model(images, training=False))

        return run
    return lambda images: keras.ops.convert_to_numpy(model(images, training=False))


def _jax_forward(model: keras.Model):
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    jitted = jax.jit(
        lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0]
    )
    return lambda x: jitted(trainable, non_trainable, x)


def keras_runner(model: keras.Model, batch: np.ndarray) -> Callable[[], None]:
    """A callable that runs `model` on `batch` once and waits for the result.

    The batch is put on the backend's device first, so the time is the
    model's alone: no host-to-device copy on JAX and PyTorch; on TensorFlow
    the (small) output is copied to NumPy, which waits for it.

    Args:
        model: A Keras model.
        batch: The input batch.

    Returns:
        A no-argument callable for `time_alternately`.

    Example:
    >>> inputs = keras.Input((4, 4, 1))
    >>> model = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
    >>> run = keras_runner(model, np.zeros((1, 4, 4, 1), "float32"))
    >>> run()  # compiles on the first call
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        forward = _jax_forward(model)
        x = jax.device_put(batch)

        def run() -> None:
            jax.block_until_ready(forward(x))

        return run
    if backend == "torch":
        import torch

        x = keras.ops.convert_to_tensor(batch)

        def run() -> None:
            with torch.no_grad():
                model(x, training=False)
            if x.is_cuda:
                torch.cuda.synchronize()

        return run
    predict = compiled_predict(model)
    if backend == "tensorflow":
        import tensorflow as tf

        batch = tf.constant(batch)

    def run() -> None:
        predict(batch)

    return run


def measure_keras(
    named_models: Mapping[str, keras.Model],
    batch: np.ndarray,
    runs: int,
    warmup: int = 5,
) -> dict[str, float]:
    """Median milliseconds of one inference call on `batch`, per model.

    The models are prepared with `keras_runner` and timed with
    `time_alternately`.

    Args:
        named_models: `{name: model}` to time.
        batch: The input batch.
        runs: Timed calls per model.
        warmup: Untimed calls per model first (compilation included).
            Defaults to 5.

    Returns:
        `{name: median milliseconds per call}`.
    """
    return time_alternately(
        {name: keras_runner(model, batch) for name, model in named_models.items()},
        runs,
        warmup,
    )
