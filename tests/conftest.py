"""Shared fixtures: two CPU devices, tiny models, backend helpers.

The suite runs on the Keras backend of `KERAS_BACKEND` (the Makefile runs the
backend-neutral modules on JAX too).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Two host devices for the data-parallel tests on JAX (read when JAX starts
# its CPU backend, after this import).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

if BACKEND == "jax":
    import tempfile

    import jax

    # Tests build many small models: share XLA compilations between the
    # test processes (pytest-xdist workers) and runs.
    jax.config.update(
        "jax_compilation_cache_dir",
        os.path.join(tempfile.gettempdir(), "keras_sfp_jax_cache"),
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # Exact float32 on GPUs too (JAX's default there is TF32 for matmuls and
    # convolutions, 10-bit mantissas): the tests compare outputs closely.
    jax.config.update("jax_default_matmul_precision", "highest")

if BACKEND == "tensorflow":
    import tensorflow as tf

    # MirroredStrategy tests need two devices; logical devices must be
    # configured before TensorFlow initialises its runtime, so this runs at
    # import time. (JAX gets two from XLA_FLAGS, above.)
    _cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0],
            [
                tf.config.LogicalDeviceConfiguration(),
                tf.config.LogicalDeviceConfiguration(),
            ],
        )
    except RuntimeError:  # already initialised by an earlier import
        pass

import keras_sfp  # noqa: E402
from bench import applications  # noqa: E402  (after the devices are set)

L = keras.layers


def tiny_resnet(input_shape=(12, 12, 3), widths=(8, 16), blocks=1, classes=5):
    """A two-stage residual net with a projection shortcut."""
    inputs = keras.Input(input_shape)
    x = L.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for s, width in enumerate(widths):
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            p = f"s{s}b{b}"
            y = L.Conv2D(width, 3, stride, "same", use_bias=False, name=p + "_c1")(x)
            y = L.BatchNormalization(name=p + "_bn1")(y)
            y = L.ReLU(name=p + "_r1")(y)
            y = L.Conv2D(width, 3, padding="same", use_bias=False, name=p + "_c2")(y)
            y = L.BatchNormalization(name=p + "_bn2")(y)
            shortcut = x
            if stride != 1 or x.shape[-1] != width:
                shortcut = L.Conv2D(width, 1, stride, use_bias=False, name=p + "_proj")(
                    x
                )
                shortcut = L.BatchNormalization(name=p + "_pbn")(shortcut)
            x = L.ReLU(name=p + "_out")(L.Add(name=p + "_add")([shortcut, y]))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name="tiny_resnet")


def tiny_vgg(input_shape=(12, 12, 1), classes=5):
    """Conv-BN-ReLU blocks with biases, then Flatten -> Dense."""
    inputs = keras.Input(input_shape)
    x = inputs
    for i, width in enumerate((6, 10)):
        x = L.Conv2D(width, 3, padding="same", name=f"conv{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
        x = L.MaxPooling2D(name=f"pool{i}")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(12, activation="relu", name="fc")(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name="tiny_vgg")


def randomize_batch_norm(model, seed=0):
    """Random BN gamma and beta, statistics from 64 inputs in [0, 1)."""
    return applications.randomize_batch_norm(model, seed, n=64, scale=1.0)


def calibrate_batch_norm(model, seed=0):
    """BN statistics from 64 inputs in [0, 1) (realistic logits)."""
    return applications.calibrate(model, seed, n=64, scale=1.0)


def prune_once(model, rate=0.5, **kwargs):
    """`prune_filters(model, ...)` after one prune event, before any training."""
    pruned = keras_sfp.prune_filters(model, rate=rate, **kwargs)
    keras_sfp.FilterPruner(pruned).prune(0)
    return pruned


def assert_shrink_exact(pruned, x, floor=0.0, err_msg=""):
    """Shrinks `pruned`; its outputs on `x` must be `strip_pruning`'s.

    They must agree to 1e-5 of the largest output magnitude (or of `floor`,
    if larger). Returns the shrunk model.
    """
    small = keras_sfp.shrink(pruned)
    got = keras.tree.flatten(small.predict(x, verbose=0))
    want = keras.tree.flatten(keras_sfp.strip_pruning(pruned).predict(x, verbose=0))
    for a, b in zip(got, want, strict=True):
        atol = 1e-5 * max(np.abs(b).max(), floor)
        np.testing.assert_allclose(a, b, atol=atol, err_msg=err_msg)
    return small


def random_data(model, n=32, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, *model.inputs[0].shape[1:])
    return rng.random(shape, dtype=np.float32), rng.integers(0, classes, n)


def deterministic() -> None:
    """Makes training bit-reproducible on this backend (TensorFlow's ops)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def compile_sgd(model, lr=0.05):
    model.compile(
        keras.optimizers.SGD(lr, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class Interrupt(keras.callbacks.Callback):
    """Raises at the end of epoch `epoch`, as a killed run would stop there."""

    def __init__(self, epoch=1):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


# Run by tests in a process of its own, never imported here.
collect_ignore = ["_backend_worker.py", "_distributed_worker.py"]
